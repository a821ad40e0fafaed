"""Model cost: parameters, multiply-adds and CPU latency (MobileNetV2 §6.1, Table 4, Fig. 5).

Conventions, chosen to match the paper's reporting:

- **MAdds** = ``torch.utils.flop_counter.FlopCounterMode`` FLOPs / 2 for one image. The counter
  covers convolutions (grouped/depthwise included) and matrix multiplies (the classifier); BN,
  ReLU6, pooling and residual additions count zero, as in the paper's multiply-add numbers.
- **Parameters**: ``count_params(model)`` counts every trainable tensor including BN γ/β (the
  torchvision convention: 3,504,872 for MobileNetV2 1.0 with 1000 classes);
  ``include_bn=False`` leaves BN out (the TF-slim convention of the paper's 3.4M, which also uses
  1001 classes). Both count the classifier at the ``num_classes`` it was built with.
- **Latency**: median wall time of a batch-1 forward in ``torch.inference_mode`` after warm-up, on
  the calling process's torch threads (set them before measuring; the pipeline uses 1).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module, *, include_bn: bool = True) -> int:
    """Trainable parameters; ``include_bn=False`` skips BatchNorm γ/β."""
    bn_ids: set[int] = set()
    if not include_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                bn_ids |= {id(p) for p in m.parameters(recurse=False)}
    return sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in bn_ids)


def count_madds(model: nn.Module, resolution: int | tuple[int, int], in_channels: int = 3) -> int:
    """Multiply-adds of one forward pass on a ``(1, in_channels, H, W)`` input (FLOPs / 2)."""
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(torch.zeros(1, in_channels, h, w))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def measure_latency_ms(
    model: nn.Module,
    resolution: int | tuple[int, int],
    *,
    warmup: int = 3,
    repeats: int = 10,
    in_channels: int = 3,
) -> float:
    """Median milliseconds of a batch-1 forward after ``warmup`` untimed passes."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    was_training = model.training
    model.eval()
    x = torch.randn(1, in_channels, h, w)
    times = []
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                t0 = time.perf_counter()
                model(x)
                if i >= warmup:
                    times.append((time.perf_counter() - t0) * 1000.0)
    finally:
        model.train(was_training)
    return statistics.median(times)
