"""FixMatch's weak and strong augmentations on uint8 image batches (REFERENCE §5; FixMatch §2.3).

- weak: random horizontal flip (p = 0.5) and a random translation of up to 12.5 % of the side
  (reflect-pad, then crop back), as FixMatch's CIFAR pipeline;
- strong: weak, then RandAugment with a random magnitude per image (FixMatch's "RandAugment with
  random magnitude"), then Cutout of a square half the image side filled with grey (FixMatch applies
  Cutout to every strong view).

RandAugment runs on the whole batch tensor (``rand_augment``): each image still draws its own ops,
signs and magnitude, as torchvision's ``v2.RandAugment`` called once per image would, but each op
is one vectorised call over the images that drew it (one ``grid_sample`` for all five geometric
ops), so the input pipeline keeps up with the model instead of paying torchvision's ≈1 ms per call
for every image (issue 19; ``benchmarks/bench_ssl_input.py``). Ops, magnitudes and the
interpolation (nearest, zero fill) are torchvision's; ``tests/stages/test_fixmatch.py`` checks each
op against torchvision's per-image functional.

Batches are ``uint8 (B, C, H, W)`` on any device. Every function takes an explicit seed and leaves
torch's global generator untouched: a batch's augmentation depends only on ``(images, seed)``,
which keeps runs reproducible bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

CUTOUT_FILL = 127  # FixMatch's grey

# RandAugment's op space as torchvision's v2.RandAugment lists it (14 ops, uniform choice)
RA_OPS = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
    "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
)  # fmt: skip
_GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
_SIGNED = {*_GEOMETRIC, "Brightness", "Color", "Contrast", "Sharpness"}  # a fair random sign


def weak_augment(
    images: torch.Tensor, seed: int, *, flip: bool = True, translate_frac: float = 0.125
) -> torch.Tensor:
    """Random flip + translation of ``uint8 (B, C, H, W)`` images; returns the same shape/dtype.

    Flip, reflect-padding and crop are one gather: each output pixel's source index, reflected
    at the borders, so no padded copy of the batch is made."""
    _check(images)
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = images.shape
    flipped = torch.rand(b, generator=g) < 0.5 if flip else torch.zeros(b, dtype=torch.bool)
    pad = round(translate_frac * h)
    if not pad and not flipped.any():
        return images
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b), generator=g) if pad else torch.zeros(2, b)
    rows = _reflect(dy[:, None].long() - pad + torch.arange(h), h)  # (B, H) source rows
    cols = _reflect(dx[:, None].long() - pad + torch.arange(w), w)  # (B, W) in the flipped image
    cols = torch.where(flipped[:, None], w - 1 - cols, cols)
    src = (rows[:, :, None] * w + cols[:, None, :]).view(b, 1, h * w).to(images.device)
    return images.reshape(b, c, h * w).gather(2, src.expand(b, c, h * w)).view(b, c, h, w)


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Indices reflected into ``[0, n)`` without repeating the edge (``F.pad``'s "reflect")."""
    i = i.abs()
    return torch.where(i >= n, 2 * (n - 1) - i, i)


def cutout(images: torch.Tensor, seed: int, *, size_frac: float = 0.5) -> torch.Tensor:
    """Grey square of side ``size_frac·H`` at a uniform random centre (clipped at the borders)."""
    _check(images)
    g = torch.Generator().manual_seed(seed)
    b, _, h, w = images.shape
    size = round(size_frac * h)
    if size == 0:
        return images
    cy = torch.randint(0, h, (b,), generator=g).to(images.device)
    cx = torch.randint(0, w, (b,), generator=g).to(images.device)
    ys, xs = torch.arange(h, device=images.device), torch.arange(w, device=images.device)
    inside_y = (ys[None] >= (cy - size // 2)[:, None]) & (
        ys[None] < (cy + (size + 1) // 2)[:, None]
    )
    inside_x = (xs[None] >= (cx - size // 2)[:, None]) & (
        xs[None] < (cx + (size + 1) // 2)[:, None]
    )
    box = inside_y[:, :, None] & inside_x[:, None, :]  # (B, H, W)
    return torch.where(box[:, None], torch.tensor(CUTOUT_FILL, dtype=images.dtype), images)


@dataclass(frozen=True)
class RandAugmentDraw:
    """One batch's RandAugment choices, drawn up front (so tests can replay them per image)."""

    ops: torch.Tensor  # (num_ops, B) int64 indices into RA_OPS, uniform, with replacement
    bins: torch.Tensor  # (B,) int64 magnitude bin, shared by an image's ops
    signs: torch.Tensor  # (num_ops, B) ±1.0; only signed ops use it


def draw_rand_augment(n: int, seed: int, *, num_ops: int = 2, bins: int = 10) -> RandAugmentDraw:
    """Per-image draws of FixMatch's RandAugment: a random magnitude bin per image (FixMatch's
    "random magnitude"), ``num_ops`` uniform ops and a fair sign per op, as torchvision's
    ``v2.RandAugment(magnitude=m)`` draws them per call."""
    g = torch.Generator().manual_seed(seed)
    magnitude_bins = torch.randint(0, bins, (n,), generator=g)
    ops = torch.randint(0, len(RA_OPS), (num_ops, n), generator=g)
    signs = torch.where(torch.rand(num_ops, n, generator=g) <= 0.5, -1.0, 1.0)
    return RandAugmentDraw(ops, magnitude_bins, signs.double())


def ra_magnitudes(bins: int, height: int, width: int) -> torch.Tensor:
    """``(len(RA_OPS), bins)`` float64: each op's magnitude per bin, torchvision's table (float32
    values, as it indexes them); 0 for ops without a magnitude."""
    table = torch.zeros(len(RA_OPS), bins, dtype=torch.float64)
    lin = {
        "ShearX": 0.3, "ShearY": 0.3, "TranslateX": 150.0 / 331.0 * width,
        "TranslateY": 150.0 / 331.0 * height, "Rotate": 30.0, "Brightness": 0.9, "Color": 0.9,
        "Contrast": 0.9, "Sharpness": 0.9,
    }  # fmt: skip
    for op, top in lin.items():
        table[RA_OPS.index(op)] = torch.linspace(0.0, top, bins).double()
    bits = (8 - (torch.arange(bins) / ((bins - 1) / 4))).round().int()
    table[RA_OPS.index("Posterize")] = bits.double()
    table[RA_OPS.index("Solarize")] = torch.linspace(1.0, 0.0, bins).double()
    return table


def rand_augment(
    images: torch.Tensor, seed: int, *, num_ops: int = 2, magnitude_bins: int = 10
) -> torch.Tensor:
    """RandAugment with a random magnitude per image on a ``uint8 (B, C, H, W)`` batch."""
    _check(images)
    draw = draw_rand_augment(len(images), seed, num_ops=num_ops, bins=magnitude_bins)
    return apply_rand_augment(images, draw, magnitude_bins=magnitude_bins)


def apply_rand_augment(
    images: torch.Tensor, draw: RandAugmentDraw, *, magnitude_bins: int = 10
) -> torch.Tensor:
    """Apply ``draw``'s ops in turn; each op is one call over the images that drew it."""
    table = ra_magnitudes(magnitude_bins, *images.shape[-2:])
    signed = torch.tensor([op in _SIGNED for op in RA_OPS])
    out = images
    for ops, signs in zip(draw.ops, draw.signs, strict=True):
        mags = table[ops, draw.bins] * torch.where(signed[ops], signs, 1.0)  # (B,) float64
        out = _apply_ops(out, ops, mags)
    return out


def _apply_ops(x: torch.Tensor, ops: torch.Tensor, mags: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    geometric = torch.isin(ops, torch.tensor([RA_OPS.index(o) for o in _GEOMETRIC]))
    if geometric.any():  # one grid_sample for every sheared, translated or rotated image
        sel = geometric.nonzero()[:, 0]
        out[sel.to(x.device)] = _affine(x[sel.to(x.device)], ops[sel], mags[sel])
    for k in ops[~geometric].unique().tolist():
        sel = (ops == k).nonzero()[:, 0]
        fn = _PIXEL_OPS[RA_OPS[k]]
        out[sel.to(x.device)] = fn(x[sel.to(x.device)], mags[sel].to(x.device))
    return out


def _affine(x: torch.Tensor, ops: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Shear / translate / rotate with per-image parameters, by torchvision's conventions: the
    inverse matrix of ``T·C·R·Sh·C⁻¹`` (shears about the top-left corner, rotation about the
    centre, integer translations), sampled at pixel centres with nearest neighbour, zero fill."""
    n, _, h, w = x.shape
    zero = torch.zeros(n, dtype=torch.float64)
    is_ = {o: ops == RA_OPS.index(o) for o in _GEOMETRIC}
    shear_x = torch.where(is_["ShearX"], torch.atan(m), zero)  # radians, tan = m
    shear_y = torch.where(is_["ShearY"], torch.atan(m), zero)
    tx = torch.where(is_["TranslateX"], torch.trunc(m), zero)
    ty = torch.where(is_["TranslateY"], torch.trunc(m), zero)
    rot = torch.where(is_["Rotate"], torch.deg2rad(-torch.remainder(m, 360.0)), zero)
    corner = is_["ShearX"] | is_["ShearY"]  # center=[0, 0]: about the top-left corner
    cx, cy = torch.where(corner, -w / 2, 0.0).double(), torch.where(corner, -h / 2, 0.0).double()
    a = torch.cos(rot - shear_y) / torch.cos(shear_y)
    b = -(a * torch.tan(shear_x) + torch.sin(rot))
    c = torch.sin(rot - shear_y) / torch.cos(shear_y)
    d = torch.cos(rot) - c * torch.tan(shear_x)
    inv = torch.stack([d, -b, zero, -c, a, zero], 1)  # (N, 6): inverse of the RSS part
    inv[:, 2] += cx - inv[:, 0] * (cx + tx) - inv[:, 1] * (cy + ty)
    inv[:, 5] += cy - inv[:, 3] * (cx + tx) - inv[:, 4] * (cy + ty)
    theta = inv.float().view(n, 2, 3).to(x.device)
    # output pixel centres (origin at the image centre) → input coordinates normalised to [-1, 1]
    xs = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, w, device=x.device)
    ys = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, h, device=x.device)
    base = torch.stack(
        [xs.expand(h, w), ys[:, None].expand(h, w), torch.ones(h, w, device=x.device)], -1
    )  # (H, W, 3)
    scale = torch.tensor([0.5 * w, 0.5 * h], device=x.device)
    # bmm, as torchvision: an einsum rounds differently and flips nearest-neighbour ties
    grid = base.view(1, h * w, 3).expand(n, -1, -1).bmm(theta.transpose(1, 2) / scale)
    sampled = F.grid_sample(
        x.float(), grid.view(n, h, w, 2), mode="nearest", padding_mode="zeros", align_corners=False
    )
    return sampled.to(torch.uint8)


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """``ratio·x + (1 − ratio)·other`` clamped to uint8, per image ``ratio (N,)`` (float64)."""
    r = ratio.float().view(-1, 1, 1, 1)
    rest = (1.0 - ratio).float().view(-1, 1, 1, 1)
    return x.float().mul(r).addcmul_(other.expand_as(x), rest).clamp_(0, 255).to(torch.uint8)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma as torchvision floors it for uint8: ``(N, 1, H, W)`` float."""
    if x.shape[1] == 1:
        return x.float()
    r, g, b = x.float().unbind(1)
    return (r * 0.2989 + g * 0.587 + b * 0.114).floor_()[:, None]


def _sharpness(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    kernel = torch.ones(3, 3, device=x.device) / 13
    kernel[1, 1] = 5 / 13  # torchvision's smoothing kernel; the border rows stay as they are
    out = x.float()
    blurred = F.conv2d(out, kernel.expand(c, 1, 3, 3), groups=c).round_()
    inner = out[..., 1:-1, 1:-1]
    rest = (1.0 - (1.0 + m)).float().view(-1, 1, 1, 1)  # 1 − f, as torchvision rounds it
    inner.addcmul_(blurred - inner, rest)  # x + (1 − f)(blur − x)
    return out.clamp_(0, 255).to(torch.uint8)


def _posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    b = bits.round().long()
    mask = ((1 << b) - 1) << (8 - b)  # keep the top `bits` bits
    return x & mask.to(torch.uint8).view(-1, 1, 1, 1)


_PIXEL_OPS = {
    "Identity": lambda x, m: x,
    "Brightness": lambda x, m: _blend(x, torch.zeros(1, device=x.device), 1.0 + m),
    "Color": lambda x, m: x if x.shape[1] == 1 else _blend(x, _gray(x), 1.0 + m),
    "Contrast": lambda x, m: _blend(x, _gray(x).mean((1, 2, 3), keepdim=True), 1.0 + m),
    "Sharpness": _sharpness,
    "Posterize": _posterize,
    "Solarize": lambda x, m: torch.where(
        x.float() >= (255.0 * m).float().view(-1, 1, 1, 1), 255 - x, x
    ),
    "AutoContrast": lambda x, m: TF.autocontrast(x),  # per image and channel already
    "Equalize": lambda x, m: TF.equalize(x),
}


def strong_augment(
    images: torch.Tensor,
    seed: int,
    *,
    flip: bool = True,
    translate_frac: float = 0.125,
    num_ops: int = 2,
    magnitude_bins: int = 10,
    cutout_frac: float = 0.5,
) -> torch.Tensor:
    """Weak augmentation, RandAugment with a random magnitude per image, then Cutout."""
    out = weak_augment(images, seed, flip=flip, translate_frac=translate_frac)
    out = rand_augment(out, seed + 1, num_ops=num_ops, magnitude_bins=magnitude_bins)
    return cutout(out, seed + 2, size_frac=cutout_frac)


def _check(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"expected uint8 images (B, C, H, W), got {images.dtype} {tuple(images.shape)}"
        )
