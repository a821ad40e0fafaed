"""The training-memory estimate behind every Train worker's and Tune trial's request (issue 19):
counted on the meta device, pinned on hand-worked nets and against what autograd saves."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stages.training.memory import (
    activation_bytes,
    meta_model,
    param_bytes,
    training_step_bytes,
)


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 100), nn.Sigmoid(), nn.Linear(100, 10))


def test_an_mlp_by_hand():
    """Flatten (60 × 784) + Linear (60 × 100) + Sigmoid (60 × 100) + Linear (60 × 10), float32;
    weights 784·100 + 100 + 100·10 + 10; a step: 4 copies of them (weights, gradients,
    momentum, one in flight), twice the activations, two batches."""
    net = _mlp()
    acts = 4 * (60 * 784 + 60 * 100 + 60 * 100 + 60 * 10)
    assert activation_bytes(net, (60, 1, 28, 28)) == acts == 238_560
    weights = 4 * (784 * 100 + 100 + 100 * 10 + 10)
    assert param_bytes(net) == weights == 318_040
    batch = 4 * 60 * 784
    assert training_step_bytes(net, (60, 1, 28, 28)) == 4 * weights + 2 * acts + 2 * batch
    assert training_step_bytes(net, (60, 1, 28, 28), optimizer_states=2) == (
        5 * weights + 2 * acts + 2 * batch
    )
    assert all(p.device.type == "cpu" for p in net.parameters())  # the net itself untouched


@pytest.mark.parametrize("name, kwargs, shape", [
    ("small_inception", dict(in_shape=(3, 28, 28), num_classes=10, width=0.5), (16, 3, 28, 28)),
    ("mobilenetv2", dict(num_classes=10, width_mult=0.5), (8, 3, 32, 32)),
    ("wrn_10_1", dict(num_classes=10), (16, 3, 32, 32)),
])  # fmt: skip
def test_the_count_bounds_what_autograd_saves_for_the_backward_pass(name, kwargs, shape):
    """On real nets, on the CPU: the bytes of every tensor autograd saves for the backward pass
    (counted once each) lie between 0.5× and 1.5× the leaf modules' outputs counted on the meta
    device; the weights are the real ones, byte for byte."""
    from stages.models.registry import create

    torch.manual_seed(0)
    net = create(name, **kwargs)
    net.train()
    saved: dict[int, int] = {}

    def pack(t):
        if t.requires_grad or t.grad_fn is not None or t.dtype.is_floating_point:
            if not isinstance(t, nn.Parameter):
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(torch.randn(shape)).sum().backward()
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}
    real = sum(n for ptr, n in saved.items() if ptr not in weights)
    counted = activation_bytes(meta_model(name, **kwargs), shape)
    assert 0.5 * counted <= real <= 1.5 * counted, (real, counted)
    assert param_bytes(meta_model(name, **kwargs)) == param_bytes(net)


def test_activations_grow_with_the_batch_and_the_resolution_and_nothing_is_allocated():
    net = meta_model("mobilenetv2", num_classes=10, width_mult=1.0)
    assert all(p.device.type == "meta" for p in net.parameters())
    a = activation_bytes(net, (4, 3, 32, 32))
    assert activation_bytes(net, (8, 3, 32, 32)) == 2 * a
    # a quarter of the pixels at 32 px than at 64 px in every layer before the pooling
    assert 3.5 * a < activation_bytes(net, (4, 3, 64, 64)) <= 4 * a
