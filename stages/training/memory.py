"""A training unit's peak memory from its model's shapes, for the memory a Train worker or a Tune
trial asks the cluster for (issue 19: concurrent trials could exhaust a node).

The model is built and run on PyTorch's ``meta`` device: every tensor has its shape and no
storage, so a forward pass at a batch of any size costs no memory and takes milliseconds. What a
training step holds at its peak is then counted from the shapes::

    weights + gradients + optimizer state (momentum: one more copy; Adam: two) + a copy in flight
      + the activations kept for the backward pass (every leaf module's output)
      + their gradients during the backward pass (as large again at worst)
      + two input batches (one training, one prepared ahead)

Counting leaf modules' outputs over-counts where a module keeps no input (ReLU in place) and
under-counts what functional code keeps between modules; `tests/stages/test_training_memory.py` pins the
count on hand-worked nets and compares it with the bytes autograd actually saves.
"""

from __future__ import annotations

import torch
from torch import nn

FLOAT32 = 4


def activation_bytes(net: nn.Module, input_shape: tuple[int, ...], dtype=torch.float32) -> int:
    """Bytes of every leaf module's output for one forward pass of an input of ``input_shape``
    (batch first), on the ``meta`` device: nothing is allocated. ``net`` is not modified."""
    meta = _on_meta(net)
    total = 0

    def count(_module, _inputs, output):
        nonlocal total
        for t in output if isinstance(output, tuple | list) else (output,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    hooks = [m.register_forward_hook(count) for m in meta.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            meta(torch.empty(input_shape, dtype=dtype, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return total


def _on_meta(net: nn.Module) -> nn.Module:
    import copy

    if all(p.device.type == "meta" for p in net.parameters()):
        return net
    return copy.deepcopy(net).to("meta")


def param_bytes(net: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in net.parameters())


def training_step_bytes(
    net: nn.Module, input_shape: tuple[int, ...], *, optimizer_states: int = 1
) -> int:
    """A training step's peak for a batch of ``input_shape`` (see the module docstring):
    ``optimizer_states`` copies of the weights kept by the optimizer (SGD with momentum 1, Adam
    2, plain SGD 0)."""
    batch = FLOAT32 * int(torch.Size(input_shape).numel())
    weights = param_bytes(_on_meta(net))
    return (3 + optimizer_states) * weights + 2 * activation_bytes(net, input_shape) + 2 * batch


def meta_model(name: str, **kwargs) -> nn.Module:
    """A registered model built on the ``meta`` device: its shapes, no weights, no memory."""
    from stages.models.registry import create

    with torch.device("meta"):
        return create(name, **kwargs)
