"""FixMatch's weak and strong augmentations on uint8 image batches (REFERENCE §5; FixMatch §2.3).

- weak: random horizontal flip (p = 0.5) and a random translation of up to 12.5 % of the side
  (reflect-pad, then crop back), as FixMatch's CIFAR pipeline;
- strong: weak, then RandAugment (two random ops, a random magnitude per image: FixMatch's
  "RandAugment with random magnitude") from ``torchvision.transforms.v2``, then Cutout of a square
  half the image side filled with grey (FixMatch applies Cutout to every strong view).
  Images are in a random order within a batch, so ``group`` > 1 shares a draw among random peers.

Batches are ``uint8 (B, C, H, W)``. Every function takes an explicit seed and leaves torch's global
generator untouched (torchvision's transforms draw from it, so they run inside ``fork_rng``): a
batch's augmentation depends only on ``(images, seed)``, which keeps runs reproducible bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

CUTOUT_FILL = 127  # FixMatch's grey


def weak_augment(
    images: torch.Tensor, seed: int, *, flip: bool = True, translate_frac: float = 0.125
) -> torch.Tensor:
    """Random flip + translation of ``uint8 (B, C, H, W)`` images; returns the same shape/dtype."""
    _check(images)
    g = torch.Generator().manual_seed(seed)
    b, _, h, w = images.shape
    out = images
    if flip:
        flipped = torch.rand(b, generator=g) < 0.5  # (B,)
        out = torch.where(flipped[:, None, None, None], out.flip(-1), out)
    pad = round(translate_frac * h)
    if pad:
        padded = F.pad(out.float(), (pad, pad, pad, pad), mode="reflect").to(torch.uint8)
        dy, dx = torch.randint(0, 2 * pad + 1, (2, b), generator=g)
        out = torch.stack(
            [padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)]
        )  # (B, C, H, W)
    return out


def cutout(images: torch.Tensor, seed: int, *, size_frac: float = 0.5) -> torch.Tensor:
    """Grey square of side ``size_frac·H`` at a uniform random centre (clipped at the borders)."""
    _check(images)
    g = torch.Generator().manual_seed(seed)
    b, _, h, w = images.shape
    size = round(size_frac * h)
    if size == 0:
        return images
    cy = torch.randint(0, h, (b,), generator=g)
    cx = torch.randint(0, w, (b,), generator=g)
    ys, xs = torch.arange(h), torch.arange(w)
    inside_y = (ys[None] >= (cy - size // 2)[:, None]) & (
        ys[None] < (cy + (size + 1) // 2)[:, None]
    )
    inside_x = (xs[None] >= (cx - size // 2)[:, None]) & (
        xs[None] < (cx + (size + 1) // 2)[:, None]
    )
    box = inside_y[:, :, None] & inside_x[:, None, :]  # (B, H, W)
    return torch.where(box[:, None], torch.tensor(CUTOUT_FILL, dtype=images.dtype), images)


def strong_augment(
    images: torch.Tensor,
    seed: int,
    *,
    flip: bool = True,
    translate_frac: float = 0.125,
    num_ops: int = 2,
    magnitude_bins: int = 10,
    cutout_frac: float = 0.5,
    group: int = 1,
) -> torch.Tensor:
    """Weak augmentation, RandAugment with a random magnitude, then Cutout.

    ``group`` images share one draw of RandAugment's ops and magnitude: 1 is FixMatch's per-image
    draw; CPU presets use a few per draw because torchvision's per-call overhead (≈1 ms) would
    otherwise dominate a small net's step. Groups are contiguous slices of a shuffled batch.
    """
    out = weak_augment(images, seed, flip=flip, translate_frac=translate_frac)
    g = torch.Generator().manual_seed(seed + 1)
    chunks = torch.split(torch.arange(len(out)), group)
    magnitudes = torch.randint(0, magnitude_bins, (len(chunks),), generator=g)
    op_seeds = torch.randint(0, 2**62, (len(chunks),), generator=g)
    views = torch.empty_like(out)
    with torch.random.fork_rng(devices=[]):  # torchvision draws ops from the global generator
        for idx, m, s in zip(chunks, magnitudes.tolist(), op_seeds.tolist(), strict=True):
            torch.default_generator.manual_seed(s)  # CPU only: torch.manual_seed also seeds CUDA
            ra = v2.RandAugment(num_ops=num_ops, magnitude=m, num_magnitude_bins=magnitude_bins)
            views[idx] = ra(out[idx])  # (G, C, H, W): one draw of ops for the group
    return cutout(views, seed + 2, size_frac=cutout_frac)


def _check(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"expected uint8 images (B, C, H, W), got {images.dtype} {tuple(images.shape)}"
        )
