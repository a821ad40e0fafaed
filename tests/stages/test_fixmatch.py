"""FixMatch pieces (REFERENCE §5) and the training loop: pseudo-labels and the weighted loss by hand,
seeded augmentations, MC-dropout weights, the nets, splits, outer lr 0 = plain FixMatch bit for bit,
and λ kept identical across two gloo workers."""

from __future__ import annotations

import copy
import dataclasses
import math
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from data.digits import load_digits
from stages.models.registry import create
from stages.ssl.augment import (
    CUTOUT_FILL,
    RA_OPS,
    apply_rand_augment,
    cutout,
    draw_rand_augment,
    ra_magnitudes,
    strong_augment,
    weak_augment,
)
from stages.ssl.fixmatch import fixmatch_loss, mc_dropout_confidence, pseudo_labels
from stages.ssl.train import (
    TrainSettings,
    allreduce_weight_grads,
    split_pool,
    ssl_train_fn,
    train_run,
)
from stages.training.context import LocalTrainContext


def test_pseudo_labels_mask_and_weighted_loss_by_hand():
    logits_w = torch.tensor([[4.0, 0.0, 0.0], [1.0, 0.9, 0.0], [0.0, 0.0, 9.0]], requires_grad=True)
    pl = pseudo_labels(logits_w, threshold=0.95)
    assert pl.targets.tolist() == [0, 0, 2]
    p0 = math.exp(4) / (math.exp(4) + 2)  # 0.9647: confident; row 1 is not
    assert pl.confidence[0].item() == pytest.approx(p0, rel=1e-6)
    assert pl.mask.tolist() == [1.0, 0.0, 1.0]
    logits_s = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    logits_l, y = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0])
    lam = torch.tensor([0.5, 2.0, 1.5])
    total, loss_s, loss_u = fixmatch_loss(logits_l, y, logits_s, pl, lam, unlabeled_coef=1.0)
    ce0 = -math.log(1 / (2 + math.e))  # strong view of row 0 against class 0
    ce2 = math.log(3)  # uniform logits against class 2
    assert loss_u.item() == pytest.approx((0.5 * ce0 + 1.5 * ce2) / 3, rel=1e-6)  # mean over all 3
    assert loss_s.item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 2)), rel=1e-6)
    total.backward()
    assert logits_w.grad is None  # stop-gradient through the pseudo-label
    assert torch.all(logits_s.grad[1] == 0)  # masked row: no gradient whatever its λ


def test_augmentations_are_seeded_shape_preserving_and_leave_global_rng_alone():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=g)
    state = torch.get_rng_state()
    a, b = strong_augment(x, 5), strong_augment(x, 5)
    assert torch.equal(torch.get_rng_state(), state)  # every draw from the function's own seed
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == x.shape
    assert not torch.equal(a, strong_augment(x, 6))
    # weak: a flip or not, no translation at translate 0; constant images stay constant
    w = weak_augment(x, 3, translate_frac=0.0)
    assert all(torch.equal(w[i], x[i]) or torch.equal(w[i], x[i].flip(-1)) for i in range(6))
    flat = torch.full((4, 1, 16, 16), 77, dtype=torch.uint8)
    assert torch.equal(weak_augment(flat, 1), flat)
    # cutout: a grey square of side 8 when its centre lies inside, here on a black image
    c = cutout(torch.zeros(200, 1, 16, 16, dtype=torch.uint8), 0, size_frac=0.5)
    grey = (c == CUTOUT_FILL).sum((1, 2, 3))
    assert grey.max() == 64 and grey.min() >= 16 and set(c.unique().tolist()) <= {0, CUTOUT_FILL}


def test_weak_augment_crops_as_a_per_image_loop():
    x = torch.randint(0, 256, (9, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator())
    g = torch.Generator().manual_seed(4)  # the draws weak_augment makes, replayed per image
    flipped = torch.rand(9, generator=g) < 0.5
    dy, dx = torch.randint(0, 5, (2, 9), generator=g)
    want = []
    for i in range(9):
        img = x[i].flip(-1) if flipped[i] else x[i]
        padded = F.pad(img[None].float(), (2, 2, 2, 2), mode="reflect")[0].to(torch.uint8)
        want.append(padded[:, dy[i] : dy[i] + 16, dx[i] : dx[i] + 16])
    assert torch.equal(weak_augment(x, 4), torch.stack(want))


def _torchvision_op(img: torch.Tensor, op: str, m: float) -> torch.Tensor:
    """One RandAugment op on one image through torchvision's functional API, with the arguments
    torchvision's own v2.RandAugment passes (nearest interpolation, zero fill)."""
    shear = math.degrees(math.atan(m))
    return {
        "Identity": lambda: img,
        "ShearX": lambda: TF.affine(img, 0.0, [0, 0], 1.0, [shear, 0.0], center=[0, 0]),
        "ShearY": lambda: TF.affine(img, 0.0, [0, 0], 1.0, [0.0, shear], center=[0, 0]),
        "TranslateX": lambda: TF.affine(img, 0.0, [int(m), 0], 1.0, [0.0, 0.0]),
        "TranslateY": lambda: TF.affine(img, 0.0, [0, int(m)], 1.0, [0.0, 0.0]),
        "Rotate": lambda: TF.rotate(img, m),
        "Brightness": lambda: TF.adjust_brightness(img, 1.0 + m),
        "Color": lambda: TF.adjust_saturation(img, 1.0 + m),
        "Contrast": lambda: TF.adjust_contrast(img, 1.0 + m),
        "Sharpness": lambda: TF.adjust_sharpness(img, 1.0 + m),
        "Posterize": lambda: TF.posterize(img, int(m)),
        "Solarize": lambda: TF.solarize(img, 255.0 * m),
        "AutoContrast": lambda: TF.autocontrast(img),
        "Equalize": lambda: TF.equalize(img),
    }[op]()


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 16, 16), (3, 20, 28)])
def test_batched_rand_augment_gives_torchvisions_pixels_image_by_image(shape):
    """Each image of the batch draws its own ops, magnitude and signs (every op and bin occurs);
    replaying its draw through torchvision's per-image functional gives the same pixels."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (400, *shape), dtype=torch.uint8, generator=g)
    x[:5] = x[:5] // 4 + 60  # low-contrast images, where AutoContrast and Equalize move pixels
    draw = draw_rand_augment(400, 7, num_ops=2, bins=10)
    out = apply_rand_augment(x, draw, magnitude_bins=10)
    assert set(draw.ops.flatten().tolist()) == set(range(len(RA_OPS)))
    table = ra_magnitudes(10, *shape[1:])
    signed = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color"}
    signed |= {"Contrast", "Sharpness"}
    mismatched = 0
    for i in range(400):
        img = x[i]
        for k, sign in zip(draw.ops[:, i].tolist(), draw.signs[:, i].tolist(), strict=True):
            m = float(table[k, draw.bins[i]]) * (sign if RA_OPS[k] in signed else 1.0)
            img = _torchvision_op(img, RA_OPS[k], m)
        mismatched += int((img != out[i]).sum())
    assert mismatched <= 1e-4 * out.numel()  # rounding ties in float32 math, if any
    assert (out != x).float().mean() > 0.5  # and the augmentation did something


def test_rand_augment_draws_ops_magnitudes_and_signs_uniformly():
    from scipy.stats import chisquare

    n = 20000
    draw = draw_rand_augment(n, 3, num_ops=2, bins=10)
    op_counts = torch.bincount(draw.ops.flatten(), minlength=len(RA_OPS))
    bin_counts = torch.bincount(draw.bins, minlength=10)
    assert chisquare(op_counts.numpy()).pvalue > 1e-3 and len(op_counts) == 14
    assert chisquare(bin_counts.numpy()).pvalue > 1e-3 and len(bin_counts) == 10
    assert abs((draw.signs > 0).double().mean() - 0.5) < 4 * 0.5 / math.sqrt(2 * n)
    # the two ops of an image are independent draws (with replacement), as torchvision's
    same = (draw.ops[0] == draw.ops[1]).double().mean()
    assert abs(same - 1 / 14) < 4 * math.sqrt(1 / 14 * 13 / 14 / n)
    # and a sampler that favoured one op would fail the same check
    biased = torch.cat([op_counts[:1] + 400, op_counts[1:]])
    assert chisquare(biased.numpy()).pvalue < 1e-3


def test_mc_dropout_confidence_without_dropout_is_the_softmax_probability():
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(5, 3)
    feats, targets = torch.randn(4, 5, generator=g), torch.tensor([0, 1, 2, 1])
    exact = torch.softmax(head(feats), 1).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(mc_dropout_confidence(feats, head, targets, p=0.0), exact.detach())
    state = torch.get_rng_state()
    conf = mc_dropout_confidence(feats, head, targets, samples=16, p=0.5, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert conf.shape == (4,) and conf.min() >= 0 and conf.max() <= 1
    assert not torch.allclose(conf, exact)


def test_nets_expose_features_and_head_with_known_sizes():
    wrn = create("wrn_28_2")
    assert sum(p.numel() for p in wrn.parameters()) == 1_467_610  # FixMatch's WRN-28-2 (1.5 M)
    x = torch.randn(2, 3, 32, 32)
    assert wrn.features(x).shape == (2, 128)
    torch.testing.assert_close(wrn.head(wrn.features(x)), wrn(x))
    small = create("ssl_convnet", in_channels=1)
    assert small.features(torch.randn(3, 1, 16, 16)).shape == (3, small.feature_dim) == (3, 64)


def test_split_pool_carves_a_fixed_validation_set_and_balanced_labels():
    labels = np.repeat(np.arange(10), 30)
    lab, val, unl = split_pool(labels, 4, 5, seed=0)
    lab1, val1, _ = split_pool(labels, 4, 5, seed=1)
    assert np.array_equal(val, val1) and not np.array_equal(lab, lab1)  # val fixed across seeds
    assert np.bincount(labels[lab]).tolist() == [4] * 10 and len(val) == 50
    assert not set(val) & set(lab) and not set(val) & set(unl) and set(lab) <= set(unl)
    assert len(unl) == 300 - 50
    with pytest.raises(ValueError, match="class 0"):
        split_pool(labels, 26, 5, seed=0)


def test_allreduce_weight_grads_in_one_process_sums_per_index():
    idx, g = allreduce_weight_grads(
        6, torch.tensor([4, 1, 4]), torch.tensor([1.0, 2.0, 3.0]), 1, "cpu"
    )
    assert idx.tolist() == [1, 4] and g.tolist() == [2.0, 4.0]


@pytest.fixture(scope="module")
def digits():
    images, labels = load_digits(16)
    perm = np.random.default_rng(0).permutation(len(labels))
    tr, te = perm[:500], perm[500:700]
    return {
        "train_images": images[tr, None],
        "train_labels": labels[tr],
        "test_images": images[te, None],
        "test_labels": labels[te],
    }


SETTINGS = TrainSettings(
    model="ssl_convnet",
    steps=6,
    batch_size=8,
    mu=2,
    threshold=0.0,  # every pseudo-label counts, so λ enters the loss from the first step
    ema_decay=0.9,
    inner_steps=2,
    eval_every=1,
    last_k=2,
    flip=False,
)


def _run(digits, **changes):
    s = dataclasses.replace(SETTINGS, **changes)
    return train_run(LocalTrainContext(), digits, s, labels_per_class=2, val_per_class=3, seed=0)


def test_outer_lr_zero_is_plain_fixmatch_bit_for_bit(digits):
    plain = _run(digits, method="uniform")
    frozen = _run(digits, method="learned", outer_lr=0.0)
    moving = _run(digits, method="learned", outer_lr=0.5)
    assert frozen["outer_steps"] == 3 and moving["outer_steps"] == 3
    for key in ("loss", "test_accuracy", "val_accuracy"):  # every step, exactly
        assert [c[key] for c in frozen["curve"]] == [c[key] for c in plain["curve"]]
    assert torch.equal(frozen["lambda_snapshots"][-1]["weights"], torch.ones(500 - 30))
    # the control: a moving λ does change training, so equality above is not vacuous
    assert [c["loss"] for c in moving["curve"]] != [c["loss"] for c in plain["curve"]]
    final = moving["lambda_snapshots"][-1]["weights"]
    assert 0 <= final.min() and final.max() <= 2 and (final != 1).sum() == 3 * 16


class _CrashingContext(LocalTrainContext):
    """The in-process context, whose model raises in its ``crash_at``-th training forward pass:
    a worker lost between two checkpoints."""

    def __init__(self, checkpoint_dir, crash_at: int):
        super().__init__(checkpoint_dir)
        self.crash_at, self.forwards = crash_at, 0
        self.states = {}  # (run, step) -> the mid-run state reported there

    def report(self, metrics, checkpoint=None):
        super().report(metrics, checkpoint)
        if checkpoint and "partial" in checkpoint:
            key = (metrics["run_index"], metrics["run_step"])
            self.states[key] = copy.deepcopy(checkpoint["partial"]["state"])

    def prepare_model(self, model):
        ctx = self

        class Crashing(torch.nn.Module):
            def __init__(self, net):
                super().__init__()
                self.module = net  # train_run unwraps .module, as from DDP

            def forward(self, x):
                ctx.forwards += 1
                if ctx.forwards == ctx.crash_at:
                    raise RuntimeError("injected worker loss")
                return self.module(x)

        return Crashing(super().prepare_model(model))


def test_run_killed_mid_way_resumes_from_its_checkpoint_bit_for_bit(digits, tmp_path):
    """Two 7-step runs checkpointing every 3 steps; the second dies in its step 5, after the
    checkpoint at step 3. A new attempt on the same checkpoint directory skips the first run,
    resumes the second at step 3 and ends with the uninterrupted job's λ, curves and accuracy."""
    np.savez(tmp_path / "data.npz", **digits)
    s = dataclasses.replace(SETTINGS, method="learned", outer_lr=0.5, steps=7, inner_steps=2)
    config = {
        "settings": dataclasses.asdict(s),
        "runs": [{"labels_per_class": 2, "seed": 0}, {"labels_per_class": 2, "seed": 1}],
        "val_per_class": 3,
        "checkpoint_every": 3,
        "data_path": str(tmp_path / "data.npz"),
    }
    whole = _CrashingContext(None, crash_at=0)
    ssl_train_fn(whole, config)
    crashed = _CrashingContext(tmp_path / "ckpt", crash_at=7 + 5)
    with pytest.raises(RuntimeError, match="injected"):
        ssl_train_fn(crashed, config)
    assert [(h["run_index"], h["run_step"]) for h in crashed.history if "run_step" in h] == [
        (0, 3), (0, 6), (1, 3)
    ]  # fmt: skip
    saved = crashed.load_checkpoint()
    assert len(saved["results"]) == 1 and saved["partial"]["state"]["step"] == 3
    resumed = _CrashingContext(tmp_path / "ckpt", crash_at=0)
    ssl_train_fn(resumed, config)
    assert resumed.forwards == 7 - 3  # only the second run's last 4 steps ran again
    # the state at the next checkpoint (θ, EMA, optimizer, schedule, λ and its Adam moments,
    # statistics, RNG) equals the uninterrupted job's, timings aside
    assert list(resumed.states) == [(1, 6)]
    _assert_same(
        whole.states[1, 6], resumed.states[1, 6], skip={"elapsed_s", "inner_total_s", "outer_s"}
    )
    want, got = whole.last_checkpoint["results"], resumed.last_checkpoint["results"]
    for a, b in zip(want, got, strict=True):
        for key in ("accuracy", "val_accuracy", "final_accuracy", "mask_rate", "lambda_mean"):
            assert a[key] == b[key], key
        assert a["curve"] == b["curve"] and a["outer_steps"] == b["outer_steps"] == 4
        assert torch.equal(
            a["lambda_snapshots"][-1]["weights"], b["lambda_snapshots"][-1]["weights"]
        )
        assert torch.equal(a["last_weight"].nan_to_num(-1), b["last_weight"].nan_to_num(-1))
    # not vacuous: λ moved after the checkpoint the second run resumed from
    at_3 = saved["partial"]["state"]["weights"]["weights"]
    assert not torch.equal(at_3, got[1]["lambda_snapshots"][-1]["weights"])


def _assert_same(a, b, skip=(), path="state"):
    """Recursive bitwise equality of nested dicts/lists of tensors and numbers (NaN == NaN)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            if k not in skip:
                _assert_same(a[k], b[k], skip, f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, skip, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(
            a.nan_to_num(0), b.nan_to_num(0)
        ), path
    else:
        assert a == b or (a != a and b != b), path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _GlooContext:
    """The TrainContext a Ray Train worker would see, on a plain gloo process group."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size, self.device = rank, world_size, torch.device("cpu")

    def prepare_model(self, model):
        return torch.nn.parallel.DistributedDataParallel(model)


def _gloo_worker(rank: int, port: int, data: dict, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    s = dataclasses.replace(SETTINGS, method="learned", outer_lr=0.5, steps=4, inner_steps=1)
    row = train_run(_GlooContext(rank, 2), data, s, labels_per_class=2, val_per_class=3, seed=0)
    torch.save({"weights": row["lambda_snapshots"][-1]["weights"], "spread": row["lambda_rank_spread"]},
               f"{out}/rank{rank}.pt")  # fmt: skip
    dist.destroy_process_group()


def test_two_gloo_workers_keep_lambda_identical(digits, tmp_path):
    """Each worker sees a different slice of the unlabeled batch; the all-reduced λ update makes
    both apply the same masked-Adam step, so λ is bitwise equal on the two workers."""
    torch.multiprocessing.spawn(_gloo_worker, args=(_free_port(), digits, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["weights"], r1["weights"]) and r0["spread"] == r1["spread"] == 0.0
    assert (r0["weights"] != 1).sum() == 4 * 16  # both workers' slices (2 x 8 per step) moved
    assert F.l1_loss(r0["weights"], torch.ones_like(r0["weights"])) > 0
