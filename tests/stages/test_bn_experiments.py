"""The BN experiments' training loop: the percentile probe on known distributions, steps-to-target,
the minibatch sampler, batch-statistics evaluation, and the data-parallel train function in-process."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from stages.models.bn_nets import MnistMLP
from stages.training.bn_experiments import (
    Arrays,
    MinibatchSampler,
    accuracy,
    lr_at,
    percentiles,
    sigmoid_input_percentiles,
    steps_to_reach,
    train_classifier,
    train_data_parallel,
)
from stages.training.context import LocalTrainContext


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny nets: threads only add contention on a shared box
    yield
    torch.set_num_threads(n)


def test_percentiles_of_known_samples():
    assert percentiles(np.arange(101.0)) == [15.0, 50.0, 85.0]
    assert percentiles(torch.tensor([0.0, 10.0]), (15, 50, 85)) == pytest.approx([1.5, 5.0, 8.5])
    # N(2, 3²): the 15/50/85th percentiles are 2 ∓ 1.0364·3
    sample = np.random.default_rng(0).normal(2.0, 3.0, 200_000)
    assert percentiles(sample) == pytest.approx([2 - 3.1093, 2.0, 2 + 3.1093], abs=0.03)
    with pytest.raises(ValueError, match="1-D"):
        percentiles(np.zeros((2, 2)))


class _KnownPreactivations(nn.Module):
    """Last hidden layer's sigmoid input = the probe values themselves (unit 1 = twice unit 0)."""

    def preactivations(self, x):
        return x.sum(1), [torch.stack([x[:, 0], 2 * x[:, 0]], 1)]


def test_probe_reads_the_chosen_unit_in_inference_mode():
    model = _KnownPreactivations().train()
    probe = torch.arange(101.0).view(-1, 1)
    assert sigmoid_input_percentiles(model, probe, unit=0) == [15.0, 50.0, 85.0]
    assert sigmoid_input_percentiles(model, probe, unit=1) == [30.0, 100.0, 170.0]
    assert model.training  # restored


def test_probe_on_the_bn_network_is_gamma_beta_shaped():
    """With BN, the probed input is γx̂ + β: over a probe batch normalised by population statistics
    of that same batch, its median sits near β and its spread scales with γ."""
    torch.manual_seed(0)
    model = MnistMLP(bn=True)
    bn = model.hidden[-1][1]
    with torch.no_grad():
        bn.weight[3], bn.bias[3] = 2.0, 0.5
    x = torch.rand(4000, 784)
    from stages.models.batchnorm import estimate_population_statistics

    estimate_population_statistics(model, [x])
    p15, p50, p85 = sigmoid_input_percentiles(model, x, unit=3)
    assert p50 == pytest.approx(0.5, abs=0.15)
    assert (p85 - p15) / 2 == pytest.approx(2.0 * 1.0364, rel=0.15)  # Gaussian-like unit


def test_steps_to_reach():
    steps, acc = [0, 50, 100, 150], [0.1, 0.6, 0.9, 0.85]
    assert steps_to_reach(steps, acc, 0.9) == 100
    assert steps_to_reach(steps, acc, 0.6) == 50
    assert steps_to_reach(steps, acc, 0.95) is None
    assert steps_to_reach(steps, acc, 0.05) == 0


def test_sampler_visits_every_example_once_per_pass_and_lr_decay():
    s = MinibatchSampler(10, 3, seed=0)
    first = torch.cat([s.next() for _ in range(3)])
    assert sorted(first.tolist()) == sorted(set(first.tolist())) and len(first) == 9
    assert len(s.next()) == 3  # a new pass starts when fewer than m remain
    assert lr_at(0, 0.1, 0.5, 100) == 0.1 and lr_at(200, 0.1, 0.5, 100) == pytest.approx(0.025)
    assert lr_at(200, 0.1, 0.5, 0) == 0.1


def test_block_shuffling_keeps_minibatches_together_and_full_shuffling_does_not():
    """§4.2.1: without "more thorough" shuffling the same examples always share a minibatch."""

    def passes(shuffle):
        s = MinibatchSampler(12, 3, seed=1, shuffle=shuffle)
        return [[frozenset(s.next().tolist()) for _ in range(4)] for _ in range(5)]

    blocks = passes("blocks")
    assert all(set(p) == set(blocks[0]) for p in blocks)  # the same four minibatches every pass
    assert len({tuple(p) for p in blocks}) > 1  # in a new order
    assert sorted(i for b in blocks[0] for i in b) == list(range(12))
    full = passes("full")
    assert len({b for p in full for b in p}) > 4 * 3  # minibatches change composition
    # "full" is the sampler as before the option: same draws for the same seed
    g = torch.Generator().manual_seed(1)
    assert (
        MinibatchSampler(12, 3, seed=1).next().tolist()
        == torch.randperm(12, generator=g)[:3].tolist()
    )
    with pytest.raises(ValueError, match="shuffle"):
        MinibatchSampler(12, 3, seed=1, shuffle="none")


def test_photometric_distortion_per_image_and_strength():
    from stages.training.bn_experiments import BRIGHTNESS, CONTRAST, photometric

    x = torch.randn(64, 3, 8, 8)
    assert photometric(x, 0.0, torch.Generator().manual_seed(0)) is x
    y = photometric(x, 1.0, torch.Generator().manual_seed(0))
    # per image: y = (x − mean) · c + mean + b, with |b| ≤ 0.25 and |c − 1| ≤ 0.3
    mx, my = x.mean(dim=(1, 2, 3)), y.mean(dim=(1, 2, 3))
    c = (y - my.view(-1, 1, 1, 1)).flatten(1).std(1) / (x - mx.view(-1, 1, 1, 1)).flatten(1).std(1)
    b = my - mx
    assert ((c - 1).abs() <= CONTRAST + 1e-5).all() and ((c - 1).abs() > CONTRAST / 2).any()
    assert (b.abs() <= BRIGHTNESS + 1e-5).all() and (b.abs() > BRIGHTNESS / 2).any()
    half = photometric(x, 0.5, torch.Generator().manual_seed(0))  # same draws, half the strength
    ch = (half - half.mean(dim=(1, 2, 3), keepdim=True)).flatten(1).std(1) / (
        x - mx.view(-1, 1, 1, 1)).flatten(1).std(1)  # fmt: skip
    assert torch.allclose(ch - 1, (c - 1) / 2, atol=1e-5)
    assert torch.allclose(half.mean(dim=(1, 2, 3)) - mx, b / 2, atol=1e-5)


def _blobs(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    centres = torch.randn(10, 784, generator=torch.Generator().manual_seed(99))
    return Arrays(centres[y] * 0.3 + torch.randn(n, 784, generator=g) * 0.1 + 0.5, y)


def test_train_classifier_records_and_learns():
    torch.manual_seed(0)
    train, test = _blobs(300, 0), _blobs(100, 1)
    seen = []
    records = train_classifier(
        MnistMLP(bn=True), train, test, steps=60, batch_size=30, lr=0.5, eval_every=20,
        probe_x=test.x[:50], on_record=seen.append,
    )  # fmt: skip
    assert [r["step"] for r in records] == [0, 20, 40, 60] and seen == records
    assert records[0]["test_acc"] < 0.3 and records[-1]["test_acc"] > 0.9
    assert all(r["p15"] <= r["p50"] <= r["p85"] for r in records)
    assert (
        np.isnan(records[0]["train_loss"]) and records[-1]["train_loss"] < records[1]["train_loss"]
    )


def test_batch_statistics_of_single_examples_predict_one_class():
    """m = 1 at inference in train mode: x̂ = 0 everywhere, every example gets the same logits."""
    torch.manual_seed(0)
    model = MnistMLP(bn=True)
    test = _blobs(100, 1)
    acc = accuracy(model, test, batch_size=1, batch_statistics=True)
    assert acc == pytest.approx(0.1)  # one class of ten, balanced labels
    assert int(model.hidden[0][1].num_batches_tracked) == 0  # evaluated on a copy


def test_batch_statistics_score_every_example_in_a_full_batch():
    """20 examples at m = 16: the last 4 are normalised inside the batch of the last 16 examples,
    never as a batch of 4. The 4 are copies of one example, so a batch of 4 alone would normalise
    them to x̂ = 0 and predict one fixed class; labels are the full-batch predictions."""
    torch.manual_seed(0)
    model = MnistMLP(bn=True)
    train_classifier(model, _blobs(300, 0), _blobs(20, 1), steps=60, batch_size=30, lr=0.5,
                     eval_every=60)  # fmt: skip
    test = _blobs(20, 1)
    test.x[16:] = test.x[16]
    net = copy.deepcopy(model).train()
    with torch.no_grad():
        head = net(test.x[:16]).argmax(1)
        tail = net(test.x[4:20]).argmax(1)[12:]
        short = net(test.x[16:20]).argmax(1)
    assert not torch.equal(tail, short)  # the two ways differ: the test can tell them apart
    test.y[:] = torch.cat([head, tail])
    assert accuracy(model, test, batch_size=16, batch_statistics=True) == 1.0
    # without batch statistics the tail is plain inference, the same at any batch size
    assert accuracy(model, test, batch_size=16) == accuracy(model, test, batch_size=20)


def test_data_parallel_train_fn_in_process(tmp_path):
    train, test = _blobs(200, 0), _blobs(50, 1)
    path = tmp_path / "blobs.npz"
    to_u8 = lambda a: np.clip(a.x.numpy() * 255, 0, 255).astype(np.uint8)  # noqa: E731
    np.savez(
        path,
        x_train=to_u8(train),
        y_train=train.y.numpy(),
        x_test=to_u8(test),
        y_test=test.y.numpy(),
    )
    ctx = LocalTrainContext()
    config = dict(data_path=str(path), sync=[False, True], steps=40, per_worker_batch=20, lr=0.5,
                  eval_every=20, seed=0, init_std=0.1, hidden=(100, 100, 100))  # fmt: skip
    train_data_parallel(ctx, config)
    assert [(h["step"], h["sync"]) for h in ctx.history] == [
        (20, False),
        (40, False),
        (20, True),
        (40, True),
    ]
    assert ctx.history[-1]["world_size"] == 1 and ctx.history[-1]["test_acc"] > 0.8
    # one worker: synchronised statistics are the per-worker ones, the same run twice
    assert ctx.history[1]["test_acc"] == ctx.history[3]["test_acc"]
    assert ctx.last_checkpoint == {
        "step": 40,
        "sync": True,
        "test_acc": ctx.history[-1]["test_acc"],
    }
