"""Our BN layer against torch's (Algorithm 1 outputs and gradients, running statistics), Algorithm 2
(population statistics by hand, folding changes no prediction), statistics synchronised over two
gloo workers, and the BN paper's registered models."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from stages.models import create
from stages.models.batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    ChannelAffine,
    estimate_population_statistics,
    fold_batchnorm,
    fold_into_previous,
)
from stages.models.bn_nets import MnistMLP, SmallInception

CASES = {  # name -> (ours, torch's, input shape)
    "1d-NC": (BatchNorm1d, nn.BatchNorm1d, (16, 5)),
    "1d-NCL": (BatchNorm1d, nn.BatchNorm1d, (6, 5, 7)),
    "2d": (BatchNorm2d, nn.BatchNorm2d, (4, 3, 5, 6)),
}


def _pair(case: str, momentum=0.1, seed=0):
    ours_cls, torch_cls, shape = CASES[case]
    c = shape[1]
    g = torch.Generator().manual_seed(seed)
    ours = ours_cls(c, momentum=momentum).double()
    ref = torch_cls(c, momentum=momentum).double()
    with torch.no_grad():  # non-trivial γ, β so that the affine part is tested too
        gamma, beta = (
            torch.rand(c, generator=g, dtype=torch.double) + 0.5,
            torch.randn(c, generator=g),
        )
        for bn in (ours, ref):
            bn.weight.copy_(gamma)
            bn.bias.copy_(beta)
    return ours, ref, shape


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("momentum", [0.1, None])
def test_matches_torch_in_training_and_inference(case, momentum):
    ours, ref, shape = _pair(case, momentum)
    g = torch.Generator().manual_seed(1)
    for step in range(3):  # three training minibatches: outputs, gradients, running statistics
        x = (torch.randn(shape, generator=g, dtype=torch.double) * 3 + 2).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        upstream = torch.randn(shape, generator=g, dtype=torch.double)
        y, y_ref = ours(x), ref(x2)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        (y * upstream).sum().backward()
        (y_ref * upstream).sum().backward()
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == step + 1
    ours.eval(), ref.eval()
    x = torch.randn(shape, generator=g, dtype=torch.double).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    torch.testing.assert_close(ours(x), ref(x2), rtol=1e-12, atol=1e-12)
    ours(x).sum().backward(), ref(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_state_dicts_are_interchangeable_with_torch():
    ours, ref, shape = _pair("2d")
    ref.train()(torch.randn(shape, dtype=torch.double))
    assert set(ours.state_dict()) == set(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(shape, dtype=torch.double)
    torch.testing.assert_close(ours.eval()(x), ref.eval()(x))


def test_algorithm1_by_hand_with_biased_variance():
    x = torch.tensor([[1.0], [2.0], [3.0], [6.0]])  # μ = 3, σ² = (4 + 1 + 0 + 9) / 4 = 3.5
    bn = BatchNorm1d(1, eps=0.0)
    expected = (x - 3.0) / 3.5**0.5
    torch.testing.assert_close(bn(x), expected)
    # the running variance is the unbiased m/(m−1)·σ²_B = 14/3 (momentum 0.1 from 1)
    assert bn.running_var.item() == pytest.approx(0.9 + 0.1 * 14 / 3)


def test_batch_of_one_gives_beta_instead_of_an_error():
    bn = BatchNorm1d(3)
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    x = torch.randn(1, 3, requires_grad=True)
    y = bn(x)
    torch.testing.assert_close(y, bn.bias.detach().view(1, 3))  # x̂ = 0: every input looks alike
    y.sum().backward()
    assert torch.count_nonzero(x.grad) == 0  # nothing below a BN layer learns at m = 1
    with pytest.raises(ValueError, match="more than 1 value"):
        nn.BatchNorm1d(3)(torch.randn(1, 3))


def test_population_statistics_are_algorithm2():
    """E[x] = mean of μ_B, Var[x] = m/(m−1) · mean of σ²_B over the minibatches."""
    torch.manual_seed(0)
    model = MnistMLP(bn=True)
    batches = [torch.rand(8, 784) for _ in range(5)]
    n = estimate_population_statistics(model, batches)
    assert n == 5 and not model.training
    first = model.hidden[0]
    with torch.no_grad():
        z = [first[0](b.flatten(1)) for b in batches]  # Wu per batch, (8, 100)
    mean = torch.stack([b.mean(0) for b in z]).mean(0)
    var = torch.stack([b.var(0, unbiased=False) for b in z]).mean(0) * 8 / 7
    torch.testing.assert_close(first[1].running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first[1].running_var, var, rtol=1e-5, atol=1e-6)
    assert first[1].momentum == 0.1  # restored


def _trained_like(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Non-trivial γ, β and population statistics without training."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BatchNorm1d | BatchNorm2d | nn.BatchNorm1d | nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
    estimate_population_statistics(model, [x[:16], x[16:]])
    return model


@pytest.mark.parametrize("bn_kind", ["ours", "torch"])
def test_folding_changes_no_prediction(bn_kind):
    torch.manual_seed(0)
    x_mnist, x_cifar = torch.rand(32, 1, 28, 28), torch.randn(32, 3, 32, 32)
    for model, x in (
        (MnistMLP(bn=True, bn_kind=bn_kind), x_mnist),
        (SmallInception(width=0.5, bn_kind=bn_kind), x_cifar),
    ):
        model = _trained_like(model, x)
        folded = fold_batchnorm(model)
        assert not any(
            isinstance(m, BatchNorm1d | BatchNorm2d | nn.BatchNorm1d) for m in folded.modules()
        )
        assert any(isinstance(m, ChannelAffine) for m in folded.modules())
        with torch.no_grad():
            y, y_folded = model(x), folded(x)
        torch.testing.assert_close(y_folded, y, rtol=1e-5, atol=1e-5)
        assert torch.equal(y.argmax(1), y_folded.argmax(1))


def test_fold_into_previous_layer():
    torch.manual_seed(0)
    x = torch.randn(20, 4, 9, 9)
    conv, bn = nn.Conv2d(4, 6, 3, bias=False), BatchNorm2d(6)
    _trained_like(nn.Sequential(conv, bn), x)
    fused = fold_into_previous(conv, bn)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), bn(conv(x)), rtol=1e-5, atol=1e-5)
    lin, bn1 = nn.Linear(7, 5), BatchNorm1d(5)
    u = torch.randn(30, 7)
    _trained_like(nn.Sequential(lin, bn1), u)
    with torch.no_grad():
        torch.testing.assert_close(
            fold_into_previous(lin, bn1)(u), bn1(lin(u)), rtol=1e-5, atol=1e-5
        )


# ----------------------------------------------------------------------------------------------
# statistics synchronised over data-parallel workers (gloo on CPU)
def _sync_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4, dtype=torch.double) * 2 + 1  # the same global batch everywhere
    up = torch.randn(8, 3, 4, 4, dtype=torch.double)
    part = slice(rank * 4, rank * 4 + 4)
    result = {}
    for sync in (True, False):
        bn = BatchNorm2d(3, sync=sync).double()
        xs = x[part].clone().requires_grad_()
        y = bn(xs)
        (y * up[part]).sum().backward()
        result[sync] = (y.detach(), xs.grad, bn.running_var.clone())
    try:
        nn.SyncBatchNorm(3)(torch.randn(4, 3, 2, 2))
        result["torch_sync_cpu"] = "ok"
    except ValueError as e:
        result["torch_sync_cpu"] = str(e)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_sync_statistics_over_two_workers_equal_one_big_batch():
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(
            _sync_worker, args=(2, os.path.join(d, "init"), d), nprocs=2, start_method="fork"
        )
        parts = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(2)]
    torch.manual_seed(0)
    x = (torch.randn(8, 3, 4, 4, dtype=torch.double) * 2 + 1).requires_grad_()
    up = torch.randn(8, 3, 4, 4, dtype=torch.double)
    ref = nn.BatchNorm2d(3).double()
    y = ref(x)
    (y * up).sum().backward()
    torch.testing.assert_close(torch.cat([p[True][0] for p in parts]), y.detach())
    # gradients flow through the all-reduce: each worker gets its share of the global gradient
    torch.testing.assert_close(torch.cat([p[True][1] for p in parts]), x.grad)
    torch.testing.assert_close(parts[0][True][2], ref.running_var)
    # per-worker statistics differ from the global ones
    assert not torch.allclose(torch.cat([p[False][0] for p in parts]), y.detach())
    assert "GPU" in parts[0]["torch_sync_cpu"]  # why we all-reduce in our own layer


# ----------------------------------------------------------------------------------------------
# registered models: shapes, finite outputs, parameter counts from the architecture
def test_mnist_mlp_parameter_counts_and_preactivations():
    plain, bn = create("bn_mnist_mlp"), create("bn_mnist_mlp", bn=True)
    dense = 784 * 100 + 100 * 100 * 2 + 100 * 10
    assert sum(p.numel() for p in plain.parameters()) == dense + 3 * 100 + 10
    assert sum(p.numel() for p in bn.parameters()) == dense + 3 * 2 * 100 + 10  # γ, β, no bias
    logits, pre = bn.eval().preactivations(torch.rand(5, 1, 28, 28))
    assert logits.shape == (5, 10) and [p.shape for p in pre] == [(5, 100)] * 3
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
@pytest.mark.parametrize("bn", [True, False])
def test_small_inception_switches(activation, bn):
    torch.manual_seed(0)
    model = create(
        "bn_inception_small", bn=bn, activation=activation, dropout=0.4, lrn=True, width=0.5
    )
    y = model.eval()(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    kinds = {type(m).__name__ for m in model.modules()}
    assert ("BatchNorm2d" in kinds) == bn
    assert {
        "LocalResponseNorm",
        "Dropout",
        activation.capitalize().replace("Relu", "ReLU"),
    } <= kinds
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all((m.bias is None) == bn for m in convs)  # §3.2: bias dropped under BN


def test_sync_without_a_process_group_refuses_instead_of_falling_back():
    """Issue 21: sync=True used to normalise by the local batch when torch.distributed was not
    initialised, and a run reported per-worker statistics as synchronised."""
    assert not dist.is_initialized()
    bn = BatchNorm2d(3, sync=True)
    with pytest.raises(RuntimeError, match="process group"):
        bn(torch.randn(4, 3, 2, 2))
    bn.eval()  # inference uses the population statistics: nothing to synchronise
    assert bn(torch.randn(4, 3, 2, 2)).shape == (4, 3, 2, 2)


def test_small_inception_has_all_of_zhangs_modules_at_a_quarter_width():
    """Issue 21: the docstring promised Zhang et al.'s layout; 3 of its 11 modules were missing.
    REFERENCE §4: conv·96 → Inc(32,32) → Inc(32,48) → Down(80) → Inc(112,48) → Inc(96,64) →
    Inc(80,80) → Inc(48,96) → Down(96) → Inc(176,160) → Inc(176,160), here ÷ 4."""
    from stages.models.bn_nets import DownsampleModule, InceptionModule

    net = SmallInception(width=1.0, lrn=False)
    blocks = [m for m in net.features if isinstance(m, InceptionModule | DownsampleModule)]
    got = [
        ("down", m.out_channels - cin)
        if isinstance(m, DownsampleModule)
        else ("inc", m.out_channels)
        for m, cin in zip(blocks, [24] + [b.out_channels for b in blocks[:-1]], strict=True)
    ]
    zhang = [("inc", 64), ("inc", 80), ("down", 80), ("inc", 160), ("inc", 160), ("inc", 160),
             ("inc", 144), ("down", 96), ("inc", 336), ("inc", 336)]  # fmt: skip
    assert got == [(k, c // 4) for k, c in zhang]
    assert net.fc.in_features == 336 // 4
