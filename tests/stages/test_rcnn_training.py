"""Fine-tuning labels, window sampling and the two R-CNN training loops on tiny toy data."""

import numpy as np
import pytest
import torch

from stages.training.context import LocalTrainContext
from stages.training.rcnn import (
    WindowSampler,
    assign_labels,
    finetune_train_fn,
    pretrain_train_fn,
)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # Thousands of tiny ops: with two OpenMP threads on a busy 2-core box every op waits for a
    # descheduled peer, and the toy runs took 1-40 s; one thread takes ~1 s every time.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_assign_labels_at_the_half_iou_boundary():
    gt = np.array([[1, 1, 10, 10], [1, 1, 100, 1]], dtype=float)  # classes 4 and 0
    gt_classes = np.array([4, 0])
    proposals = np.array(
        [
            [1, 1, 5, 10],  # 50 of 100 pixels of gt 0: IoU exactly 0.5 -> foreground
            [1, 1, 49, 1],  # 49 of 100 pixels of gt 1: IoU 0.49 -> background
            [1, 1, 50, 1],  # 50 of 100: IoU 0.5 -> class 0 + 1
            [200, 200, 210, 210],  # no overlap
        ],
        dtype=float,
    )
    labels, max_iou = assign_labels(proposals, gt, gt_classes)
    np.testing.assert_allclose(max_iou, [0.5, 0.49, 0.5, 0.0])
    np.testing.assert_array_equal(labels, [5, 0, 1, 0])
    assert labels.dtype == np.int64
    # ground-truth boxes themselves are positives of their own class
    labels, max_iou = assign_labels(gt, gt, gt_classes)
    np.testing.assert_array_equal(labels, [5, 1])
    np.testing.assert_array_equal(max_iou, [1.0, 1.0])
    # a stricter threshold and an image without objects
    assert assign_labels(proposals, gt, gt_classes, fg_iou=0.6)[0].tolist() == [0, 0, 0, 0]
    labels, max_iou = assign_labels(proposals, np.zeros((0, 4)), np.zeros(0, dtype=int))
    assert labels.tolist() == [0, 0, 0, 0] and max_iou.tolist() == [0, 0, 0, 0]


def test_sampler_composition_and_determinism():
    labels = np.array([0] * 50 + [1] * 5 + [3] * 2)
    windows = np.arange(100, 157)  # ids need not be positions
    sampler = WindowSampler(windows, labels, seed=7)
    is_fg = dict(zip(windows.tolist(), (labels > 0).tolist(), strict=True))
    for batch in sampler.batches(20):
        assert batch.shape == (128,)
        assert sum(is_fg[w] for w in batch.tolist()) == 32  # R-CNN §2.3: 32 fg + 96 bg
    # with replacement: 32 draws from a pool of 7 foreground windows
    assert len(set(sampler.sample(0)[:32].tolist())) <= 7
    # proportional for other sizes (truncated as Caffe's window_data_layer)
    small = WindowSampler(windows, labels, batch_size=10, seed=0)
    assert (small.num_fg, small.num_bg) == (2, 8)
    assert WindowSampler(windows, labels, batch_size=64).num_fg == 16
    # deterministic per (seed, batch number), independent of what was drawn before
    again = WindowSampler(windows, labels, seed=7)
    np.testing.assert_array_equal(again.sample(5), sampler.sample(5))
    np.testing.assert_array_equal(again.sample(), sampler.sample(6))
    assert not np.array_equal(WindowSampler(windows, labels, seed=8).sample(5), sampler.sample(5))
    # uniform: every background window turns up over many draws
    drawn = np.concatenate(list(sampler.batches(50)))
    assert set(windows[labels == 0].tolist()) <= set(drawn.tolist())


def test_sampler_falls_back_to_the_non_empty_pool():
    only_bg = WindowSampler(np.arange(5), np.zeros(5), batch_size=8)
    assert (only_bg.num_fg, only_bg.num_bg) == (0, 8) and only_bg.sample().shape == (8,)
    only_fg = WindowSampler(np.arange(5), np.ones(5), batch_size=8)
    assert (only_fg.num_fg, only_fg.num_bg) == (8, 0) and only_fg.sample().shape == (8,)
    with pytest.raises(ValueError, match="at least one window"):
        WindowSampler(np.arange(0), np.zeros(0))


class ColourWindows:
    """Toy window source: a window's mean colour encodes its class (0 = grey background)."""

    def __init__(self, num_windows: int = 200, num_classes: int = 3, size: int = 32, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.labels = np.where(
            rng.random(num_windows) < 0.3, rng.integers(1, num_classes + 1, num_windows), 0
        )
        self.size, self.seed, self.signal = size, seed, 1.5
        self.calls = 0

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, indices: np.ndarray) -> torch.Tensor:
        self.calls += 1
        g = torch.Generator().manual_seed(int(indices.sum()) + self.seed)
        crops = torch.randn(len(indices), 3, self.size, self.size, generator=g)  # (B, 3, S, S)
        for row, label in enumerate(self.labels[indices]):
            if label > 0:
                crops[row, label - 1] += self.signal  # class c brightens channel c - 1
        return crops


TINY = {"input_size": 32, "widths": (16, 16, 16, 16), "fc_dim": 64}  # rcnn_small, ms per step


def finetune_config(**overrides) -> dict:
    config = {
        "model": "rcnn_small",
        "model_kwargs": TINY,
        "num_classes": 3,
        "window_source": ColourWindows(),
        "iterations": 80,
        "batch_size": 32,
        "lr": 0.03,
        "lr_step": 1000,
        "report_every": 20,
    }
    return {**config, **overrides}


def test_finetune_learns_toy_windows():
    ctx = LocalTrainContext()
    # Dropout on a 64-wide fc7 slows an 80-step toy run a lot; the resume test keeps it on.
    finetune_train_fn(ctx, finetune_config(model_kwargs={**TINY, "dropout": 0.0}))
    history = ctx.history
    assert [h["iteration"] for h in history] == [20, 40, 60, 80]
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["fg_accuracy"] > 0.8  # chance among 3 classes + background is 0.25
    assert history[-1]["bg_accuracy"] > 0.8
    state = ctx.last_checkpoint
    assert state["iteration"] == 80 and state["model"]["fc8.weight"].shape == (4, 64)
    # two param groups: backbone at lr, the new (N+1)-way head at 10× lr (R-CNN code)
    groups = state["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([0.03, 0.3])
    assert len(groups[1]["params"]) == 2  # fc8 weight and bias


def test_finetune_loads_backbone_lr_steps_and_rejects_bad_config():
    torch.manual_seed(3)
    source = ColourWindows(num_windows=40)
    from stages.models import create

    pretrained = create("rcnn_small", num_classes=10, **TINY)
    ctx = LocalTrainContext()
    cfg = finetune_config(window_source=source, iterations=4, lr_step=2, report_every=4, flip=False)
    finetune_train_fn(
        ctx, {**cfg, "init_state": pretrained.state_dict(), "lr": 0.0, "weight_decay": 0.0}
    )
    state = ctx.last_checkpoint
    # lr 0: the backbone is exactly the pretrained one (BN running stats aside); fc8 is new
    assert torch.equal(state["model"]["conv.0.weight"], pretrained.state_dict()["conv.0.weight"])
    assert state["model"]["fc8.weight"].shape == (4, 64)
    assert state["scheduler"]["last_epoch"] == 4  # ÷10 twice: stepped every iteration
    with pytest.raises(KeyError, match="unknown keys \\['iters'\\].*valid keys"):
        finetune_train_fn(LocalTrainContext(), {**cfg, "iters": 3})
    with pytest.raises(KeyError, match="window_source"):
        finetune_train_fn(LocalTrainContext(), {"model": "rcnn_small", "num_classes": 3})
    with pytest.raises(ValueError, match=r"labels must be \(W,\) in \[0, 1\]"):
        finetune_train_fn(LocalTrainContext(), {**cfg, "num_classes": 1})


def test_finetune_resumes_from_checkpoint(tmp_path):
    source = ColourWindows(num_windows=60)
    cfg = finetune_config(window_source=source, iterations=10, report_every=5)
    first = LocalTrainContext(checkpoint_dir=tmp_path)
    finetune_train_fn(first, cfg)
    assert [h["iteration"] for h in first.history] == [5, 10]
    calls = source.calls
    second = LocalTrainContext(checkpoint_dir=tmp_path)
    finetune_train_fn(second, {**cfg, "iterations": 20})
    assert [h["iteration"] for h in second.history] == [15, 20]
    assert source.calls - calls == 10  # only the remaining iterations ran
    # a resumed run ends exactly where an uninterrupted one does (same batches, flips, state)
    straight = LocalTrainContext()
    finetune_train_fn(straight, {**cfg, "iterations": 20})
    for key, value in straight.last_checkpoint["model"].items():
        torch.testing.assert_close(second.last_checkpoint["model"][key], value, msg=key)


def test_pretrain_learns_separable_images(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 256)
    images = rng.integers(0, 60, (256, 3, 32, 32)).astype(np.uint8)
    for c in range(3):
        images[labels == c, c] += 120  # class c is bright in channel c; class 3 stays dark
    cfg = {
        "model": "rcnn_small",
        "model_kwargs": TINY,
        "num_classes": 4,
        "images": torch.from_numpy(images),
        "labels": torch.from_numpy(labels),
        "epochs": 5,
        "batch_size": 32,
        "lr": 0.03,
    }
    ctx = LocalTrainContext(checkpoint_dir=tmp_path)
    pretrain_train_fn(ctx, {**cfg, "epochs": 3})
    pretrain_train_fn(ctx, cfg)  # resumes for epochs 4 and 5 only
    assert [h["epoch"] for h in ctx.history] == [1, 2, 3, 4, 5]
    assert ctx.history[-1]["train_accuracy"] > 0.9
    assert ctx.history[-1]["loss"] < ctx.history[0]["loss"]
    saved = ctx.load_checkpoint()  # weights_only round trip
    torch.testing.assert_close(
        saved["pixel_mean"], torch.from_numpy(images).float().mean((0, 2, 3))
    )
    assert saved["epoch"] == 5 and saved["model"]["fc8.weight"].shape == (4, 64)


def test_finetune_windows_warped_ahead_train_the_same_model(tmp_path):
    """Issue 19: windows are warped on background threads ahead of the model; each minibatch
    (windows and flips) depends only on (seed, rank, iteration), so the model is bit-identical
    with 0 or 3 input threads. The pretrained weights may come as a file the worker loads."""
    from stages.models import create

    torch.manual_seed(4)
    pretrained = create("rcnn_small", num_classes=10, **TINY)
    torch.save({"model": pretrained.state_dict()}, tmp_path / "model.pt")
    cfg = finetune_config(iterations=12, report_every=6)
    states = []
    for threads, init in ((0, pretrained.state_dict()), (3, tmp_path / "model.pt")):
        ctx = LocalTrainContext()
        finetune_train_fn(ctx, {**cfg, "input_threads": threads, "init_state": init})
        states.append(ctx.last_checkpoint["model"])
    assert states[0].keys() == states[1].keys()
    for key, value in states[0].items():
        assert torch.equal(states[1][key], value), key
    # the control: another seed's windows give another model
    other = LocalTrainContext()
    finetune_train_fn(other, {**cfg, "seed": 1, "init_state": tmp_path / "model.pt"})
    assert not torch.equal(other.last_checkpoint["model"]["fc8.weight"], states[0]["fc8.weight"])
