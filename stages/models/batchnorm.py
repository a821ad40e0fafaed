"""Batch Normalization written out: Algorithm 1 (training) and Algorithm 2 (inference), Ioffe &
Szegedy 2015 (REFERENCE §2).

``BatchNorm1d`` / ``BatchNorm2d`` here are drop-in replacements for ``torch.nn.BatchNorm1d/2d``:
same constructor arguments, same parameters and buffers (``weight``/``bias`` = γ/β,
``running_mean``, ``running_var``, ``num_batches_tracked``), so state dicts load either way, and the
same numbers (tests/stages/test_batchnorm_layer.py compares outputs and gradients with torch's).
What they add:

- the transform is plain autograd code, so the normalisation reads like Algorithm 1;
- ``sync=True`` computes the minibatch moments over every data-parallel worker
  (``torch.distributed``, any backend: gloo on CPU), where ``torch.nn.SyncBatchNorm`` refuses CPU
  tensors ("SyncBatchNorm expected input tensor to be on GPU", torch 2.x);
- a batch of one is allowed (x̂ = 0 for every example, Algorithm 1 with m = 1), so the batch-size
  study can show what that does instead of stopping at torch's error.

Algorithm 2's exact population statistics come from :func:`estimate_population_statistics` (a
cumulative average over training minibatches, ``momentum=None``); :func:`fold_batchnorm` turns every
BN layer into the one affine map per activation it is at inference, and :func:`fold_into_previous`
merges that map into the preceding linear/conv layer.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

BATCHNORM_TYPES = (nn.modules.batchnorm._BatchNorm,)  # torch's 1d/2d/3d and SyncBatchNorm


class _BatchNorm(nn.Module):
    _input_dims: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,  # the paper gives no ε; torch's default
        momentum: float | None = 0.1,  # None: cumulative average = Algorithm 2's E over batches
        affine: bool = True,
        track_running_stats: bool = True,
        sync: bool = False,
    ):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats, self.sync = affine, track_running_stats, sync
        if affine:  # γ = 1, β = 0: BN starts as the identity on normalised inputs (§3)
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, sync={self.sync}"
        )

    def _moments(self, x: torch.Tensor, dims: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Per-feature mean and *biased* variance over ``dims`` (and over every worker when
        ``sync``), and the number m of values each was taken over."""
        m = x.numel() // x.shape[1]
        if self.sync and not (dist.is_available() and dist.is_initialized()):
            # never fall back to per-worker statistics silently (issue 21): a run that asked for
            # synchronised statistics and got local ones would report them as synchronised
            raise RuntimeError(
                "BatchNorm(sync=True) needs an initialised torch.distributed process group; "
                "with one process, per-worker statistics are the global ones: use sync=False"
            )
        if self.sync:
            count = torch.tensor([float(m)], device=x.device)
            dist.all_reduce(count)
            m = int(count.item())
            mean = _AllReduceSum.apply(x.sum(dims)) / m
            # two passes (centre, then square) rather than E[x²] − E[x]²: no cancellation
            var = _AllReduceSum.apply((x - _shape(mean, x)).pow(2).sum(dims)) / m
            return mean, var, m
        mean = x.mean(dims)
        var = (x - _shape(mean, x)).pow(2).mean(dims)  # σ²_B: divide by m, Algorithm 1
        return mean, var, m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in self._input_dims:
            raise ValueError(
                f"{type(self).__name__} expects a {' or '.join(f'{d}D' for d in self._input_dims)}"
                f" input, got {x.dim()}D {tuple(x.shape)}"
            )
        if x.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels, got {x.shape[1]}")
        use_batch = self.training or not self.track_running_stats
        if use_batch:
            dims = [0, *range(2, x.dim())]  # per feature map for convolutions (§3.2)
            mean, var, m = self._moments(x, dims)
            if self.training and self.track_running_stats:
                self._update_running(mean, var, m)
        else:  # Algorithm 2: population statistics
            mean, var = self.running_mean, self.running_var
        x_hat = (x - _shape(mean, x)) / torch.sqrt(_shape(var, x) + self.eps)
        if not self.affine:
            return x_hat
        return _shape(self.weight, x) * x_hat + _shape(self.bias, x)  # y = γ x̂ + β

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, m: int) -> None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative average over all minibatches so far
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        # Algorithm 2's unbiased m/(m-1)·σ²_B; with m = 1 there is no such estimate (σ²_B = 0)
        unbiased = var * (m / (m - 1)) if m > 1 else var
        self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.detach(), alpha=factor)


class _AllReduceSum(torch.autograd.Function):
    """Sum over workers; its gradient is the sum over workers of the incoming gradients, so every
    worker's loss reaches every worker's inputs, as if the global batch were normalised in one
    process (torch.distributed.nn.functional.all_reduce does this too but is deprecated)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _shape(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(C,) -> (1, C, 1, ...) to broadcast against ``like`` (N, C, ...)."""
    return v.view(1, -1, *([1] * (like.dim() - 2)))


class BatchNorm1d(_BatchNorm):
    """BN over ``(N, C)`` or ``(N, C, L)``; statistics per feature C (over N, or N × L)."""

    _input_dims = (2, 3)


class BatchNorm2d(_BatchNorm):
    """BN over ``(N, C, H, W)``; one (γ, β) and one (μ, σ²) per feature map (§3.2)."""

    _input_dims = (4,)


def is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, (_BatchNorm, *BATCHNORM_TYPES))


def batchnorm_layer(kind: str, num_features: int, dims: int, **kwargs) -> nn.Module:
    """``kind`` "ours" or "torch"; ``dims`` 1 or 2. ``sync`` is only for ours."""
    if kind == "ours":
        return (BatchNorm1d if dims == 1 else BatchNorm2d)(num_features, **kwargs)
    if kind == "torch":
        if kwargs.pop("sync", False):
            raise ValueError("sync statistics need bn kind 'ours' (SyncBatchNorm needs a GPU)")
        return (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(num_features, **kwargs)
    raise ValueError(f"unknown batchnorm kind {kind!r}; valid: ours, torch")


# ----------------------------------------------------------------------------------------------
# Algorithm 2: population statistics, and BN folded into one affine map per activation
@torch.no_grad()
def estimate_population_statistics(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace every BN layer's running statistics by Algorithm 2's: E[x] = mean over the given
    training minibatches of μ_B, Var[x] = m/(m−1) · mean of σ²_B. Other layers stay in eval mode
    (dropout off); the model is left in eval mode. Returns the number of minibatches used."""
    bns = [m for m in model.modules() if is_batchnorm(m) and m.track_running_stats]
    saved = [bn.momentum for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average (torch's BN does the same with momentum=None)
        bn.train()
    n = 0
    try:
        for x in batches:
            model(x)
            n += 1
    finally:
        for bn, momentum in zip(bns, saved, strict=True):
            bn.momentum = momentum
        model.eval()
    if n == 0:
        raise ValueError("estimate_population_statistics needs at least one minibatch")
    return n


class ChannelAffine(nn.Module):
    """y = scale · x + shift per channel (dim 1): BN at inference, Algorithm 2 line 11."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _shape(self.scale, x) * x + _shape(self.shift, x)


def folded_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with scale = γ / √(Var[x] + ε) and shift = β − scale · E[x]."""
    if not bn.track_running_stats:
        raise ValueError("folding needs population statistics (track_running_stats=True)")
    scale = torch.rsqrt(bn.running_var + bn.eps)
    shift = -bn.running_mean * scale
    if bn.affine:
        scale, shift = bn.weight * scale, bn.weight * shift + bn.bias
    return scale.detach(), shift.detach()


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with every BN layer replaced by its :class:`ChannelAffine`."""
    model = copy.deepcopy(model).eval()
    for name, child in list(model.named_children()):
        if is_batchnorm(child):
            setattr(model, name, ChannelAffine(*folded_affine(child)))
        else:
            setattr(model, name, fold_batchnorm(child))
    return model


@torch.no_grad()
def fold_into_previous(layer: nn.Linear | nn.Conv2d, bn: nn.Module) -> nn.Linear | nn.Conv2d:
    """``layer`` followed by ``bn`` (inference) as one layer: W' = scale·W, b' = scale·b + shift."""
    scale, shift = folded_affine(bn)
    fused = copy.deepcopy(layer)
    fused.weight.mul_(scale.view(-1, *([1] * (fused.weight.dim() - 1))))
    bias = layer.bias if layer.bias is not None else torch.zeros_like(shift)
    fused.bias = nn.Parameter(scale * bias + shift)
    return fused
