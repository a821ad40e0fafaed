"""Warp region proposals to the CNN's fixed input size (R-CNN §2.1 and Appendix A).

Boxes are ``(N, 4)`` xyxy in VOC 1-based inclusive pixel coordinates (see ``boxes.py``); images
are ``(H, W, 3)`` BGR in 0–255. Every output is ``(N, size, size, 3)`` float, BGR, 0–255 minus the
per-channel mean, so anything outside the image is exactly 0 (REFERENCE §1 "Warp").

The geometry copies R-CNN's ``rcnn_im_crop.m`` line for line (the paper's Appendix A only says
"dilate the box so that there are exactly p pixels of warped context"), including its quirks:

- The dilation centre is ``x1 + w/2`` with the inclusive width ``w = x2 - x1 + 1``: half a pixel
  right of / below the pixel centre ``(x1 + x2)/2``. Edges ``round(centre ± scale * w/2)`` with
  ``scale = size / (size - 2 * padding)`` therefore give the right/bottom side one more source pixel
  of context than the left/top (a 195-px box at p = 16: 16 px left, 17 px right in the output).
- MATLAB's ``round`` is half away from zero — ``round_half_away`` here, never Python's ``round``
  (half to even), which would move crops by a pixel.
- The dilated box is clipped to the image; the in-image part is resized with the whole dilated box's
  scale and pasted at its offset; the rest stays at the mean (0). Nothing is re-centred.
- With ``padding == 0`` in ``"warp"`` mode the box itself is resized to ``size × size``.

Bilinear without antialiasing: ``cv2.INTER_LINEAR`` is what Caffe's WindowDataLayer used during
fine-tuning, and ``rcnn_im_crop`` calls ``imresize(..., 'bilinear', 'antialiasing', false)`` to
match it. Both map pixel centres the same way, ``u = (x + 0.5) / s - 0.5``.

Modes (Appendix A, Fig. 7):

- ``"warp"``: anisotropic warp of the dilated box (the R-CNN default, "warp" in Fig. 7 D).
- ``"square_context"``: the tightest square around the box, dilated by the same ``scale`` and
  resized isotropically; the image content inside the square is kept ("tightest square with
  context", Fig. 7 B; ``crop_mode = 'square'`` in ``rcnn_im_crop.m``).
- ``"square_mean"``: the same square, but every source pixel outside the original box is set to the
  mean before resizing ("tightest square without context", Fig. 7 C). Pixels next to the box edge
  blend box content with the mean, as resizing a mean-filled image would.

The warp-with-context variant beat the square crops by 3–5 mAP (REFERENCE §1).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import cv2
import numpy as np
import torch

# Per-channel BGR mean published with the VGG ILSVRC-2014 Caffe models (REFERENCE §1: VGG16 uses a
# per-channel mean). The AlexNet R-CNN subtracted Caffe's full ILSVRC-2012 mean *image* (centre
# crop); that image's per-channel average is ≈ (104.0, 116.7, 122.7), within one grey level.
IMAGENET_MEAN_BGR = (103.939, 116.779, 123.68)

WARP_MODES = ("warp", "square_context", "square_mean")


def round_half_away(x: np.ndarray | float) -> np.ndarray:
    """Round half away from zero, like MATLAB's ``round``: 2.5 -> 3, -2.5 -> -3, 1.5 -> 2."""
    x = np.asarray(x, dtype=np.float64)
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def _check_inputs(image_bgr: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(image_bgr)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image_bgr must have shape (H, W, 3), got {image.shape}")
    height, width = image.shape[:2]
    return image, check_boxes(boxes, width, height)


def check_boxes(boxes: np.ndarray, width, height, name_of=None) -> np.ndarray:
    """``boxes`` ``(N, 4)`` as float64 after checking them against their images' ``width`` and
    ``height`` (scalars, or ``(N,)`` per box); raises ``ValueError`` naming the first bad box
    (and its image, ``name_of(i)``, when given)."""
    b = np.asarray(boxes, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4) xyxy, got {b.shape}")
    ok = (
        np.isfinite(b).all(axis=1)
        & (b[:, 0] >= 1)
        & (b[:, 1] >= 1)
        & (b[:, 0] <= b[:, 2])
        & (b[:, 1] <= b[:, 3])
        & (b[:, 2] <= width)
        & (b[:, 3] <= height)
    )
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        w, h = np.broadcast_to(width, len(b))[i], np.broadcast_to(height, len(b))[i]
        where = f"{name_of(i)}: " if name_of is not None else ""
        raise ValueError(
            f"{where}box {i} = {b[i].tolist()} is degenerate or outside the {w}x{h} image; "
            "expected VOC 1-based inclusive xyxy with 1 <= x1 <= x2 <= width, 1 <= y1 <= y2 <= height"
        )
    return b


def crop_geometry(
    boxes: np.ndarray, width, height, *, size: int, padding: int, square: bool
) -> np.ndarray:
    """Per box: ``(N, 8)`` int64 ``sx1, sy1, sx2, sy2, pad_x, pad_y, crop_w, crop_h``; ``width``
    and ``height`` are the image's (scalars) or each box's image's (``(N,)``).

    ``s*`` is the clipped source window (1-based inclusive), which is resized to ``crop_w × crop_h``
    and pasted at output offset ``(pad_x, pad_y)``. Transcribes ``rcnn_im_crop.m``.
    """
    n = len(boxes)
    if padding == 0 and not square:
        # rcnn_im_crop skips the dilation block: the box itself fills the whole output.
        src = round_half_away(boxes)
        full = np.full((n, 1), size, dtype=np.float64)
        return np.hstack([src, np.zeros((n, 2)), full, full]).astype(np.int64)
    scale = size / (size - 2 * padding)
    half_w = (boxes[:, 2] - boxes[:, 0] + 1) / 2  # (N,)
    half_h = (boxes[:, 3] - boxes[:, 1] + 1) / 2
    ctr_x = boxes[:, 0] + half_w
    ctr_y = boxes[:, 1] + half_h
    if square:
        half_w = half_h = np.maximum(half_w, half_h)
    x1 = round_half_away(ctr_x - half_w * scale)
    y1 = round_half_away(ctr_y - half_h * scale)
    x2 = round_half_away(ctr_x + half_w * scale)
    y2 = round_half_away(ctr_y + half_h * scale)
    scale_x = size / (x2 - x1 + 1)  # whole dilated box -> size, even where it leaves the image
    scale_y = size / (y2 - y1 + 1)
    pad_x = round_half_away(np.maximum(0, 1 - x1) * scale_x)
    pad_y = round_half_away(np.maximum(0, 1 - y1) * scale_y)
    x1, y1 = np.maximum(1, x1), np.maximum(1, y1)
    x2, y2 = np.minimum(width, x2), np.minimum(height, y2)
    crop_w = round_half_away((x2 - x1 + 1) * scale_x)
    crop_h = round_half_away((y2 - y1 + 1) * scale_y)
    crop_w = np.minimum(crop_w, size - pad_x)  # rounding may overshoot the output by a pixel
    crop_h = np.minimum(crop_h, size - pad_y)
    return np.stack([x1, y1, x2, y2, pad_x, pad_y, crop_w, crop_h], axis=1).astype(np.int64)


def warp_regions(
    image_bgr: np.ndarray,
    boxes: np.ndarray,
    *,
    size: int = 227,  # AlexNet input (VGG16: 224), §2.1
    padding: int = 16,  # context pixels at the warped size, App. A
    mode: str = "warp",
    mean_bgr: Sequence[float] | np.ndarray = IMAGENET_MEAN_BGR,
    out_dtype=np.float32,
) -> np.ndarray:
    """Crop and warp ``(N, 4)`` boxes of one ``(H, W, 3)`` BGR image to ``(N, size, size, 3)``.

    Output is BGR in 0–255 minus ``mean_bgr``; out-of-image context is 0. Raises ``ValueError``
    naming the first degenerate or out-of-image box.
    """
    if mode not in WARP_MODES:
        raise ValueError(f"mode must be one of {WARP_MODES}, got {mode!r}")
    if not 0 <= padding or not 2 * padding < size:
        raise ValueError(f"need 0 <= padding < size / 2, got padding={padding}, size={size}")
    image, b = _check_inputs(image_bgr, boxes)
    height, width = image.shape[:2]
    mean = np.asarray(mean_bgr, dtype=np.float32).reshape(3)
    geometry = crop_geometry(b, width, height, size=size, padding=padding, square=mode != "warp")
    tight = round_half_away(b).astype(np.int64)
    # The float conversion is elementwise, so converting each source window alone gives the bytes
    # of converting the whole image: per window when the windows cover less than the image
    # (fine-tuning's one box per call spent most of its time converting images, issue 19), else
    # once per image (the features step's thousands of overlapping proposals).
    areas = (geometry[:, 2] - geometry[:, 0] + 1) * (geometry[:, 3] - geometry[:, 1] + 1)
    centred = _centre(image, mean) if areas.sum() >= height * width else None
    out = np.zeros((len(b), size, size, 3), dtype=out_dtype)  # (N, S, S, 3)
    for i in range(len(b)):
        paste_window(image, geometry[i], tight[i], out[i], mode=mode, mean=mean, centred=centred)
    return out


def _centre(pixels: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``pixels.astype(float32) - mean`` for ``(h, w, 3)`` pixels, the same bytes 9x faster: as
    ``(h, w * 3)`` rows minus a tiled mean, numpy's inner loop runs over a row, not 3 channels."""
    h, w = pixels.shape[:2]
    rows = pixels.reshape(h, w * 3).astype(np.float32)  # (h, 3w); a view's rows stay strided
    rows -= _tiled(w, *mean.tolist())
    return rows.reshape(h, w, 3)


@functools.lru_cache(maxsize=4096)
def _tiled(w: int, *mean: float) -> np.ndarray:
    row = np.tile(np.asarray(mean, np.float32), w)  # (3w,) b, g, r, b, g, r, ...
    row.flags.writeable = False
    return row


def paste_window(
    image_bgr: np.ndarray,
    geometry: np.ndarray,
    tight_box: np.ndarray,
    out: np.ndarray,
    *,
    mode: str,
    mean: np.ndarray,
    centred: np.ndarray | None = None,
) -> None:
    """Warp one window of a uint8 ``(H, W, 3)`` image into ``out`` ``(S, S, 3)`` (any strides: a
    channels-first batch's transposed view too), already 0 = the mean: ``geometry`` is the box's
    row of ``crop_geometry``, ``tight_box`` its rounded xyxy (``square_mean`` keeps only it).
    ``centred`` (the image minus ``mean`` as float32) may be passed when many windows share the
    image; the bytes are the same either way."""
    sx1, sy1, sx2, sy2, pad_x, pad_y, crop_w, crop_h = (int(v) for v in geometry)
    if crop_w <= 0 or crop_h <= 0:  # a sliver so thin it rounds to nothing: all mean
        return
    if centred is not None:
        window = centred[sy1 - 1 : sy2, sx1 - 1 : sx2]  # (h, w, 3) view
    else:
        window = _centre(image_bgr[sy1 - 1 : sy2, sx1 - 1 : sx2], mean)  # (h, w, 3)
    # Bilinear weights sum to 1, so subtracting a per-channel mean before resizing equals
    # subtracting it after (rcnn_im_crop's order) up to float rounding.
    if mode == "square_mean":
        keep = np.zeros(window.shape[:2], dtype=bool)
        bx1, by1, bx2, by2 = (int(v) for v in tight_box)
        keep[by1 - sy1 : by2 - sy1 + 1, bx1 - sx1 : bx2 - sx1 + 1] = True
        window = np.where(keep[:, :, None], window, np.float32(0))
    warped = cv2.resize(window, (crop_w, crop_h), interpolation=cv2.INTER_LINEAR)
    out[pad_y : pad_y + crop_h, pad_x : pad_x + crop_w] = warped.reshape(crop_h, crop_w, 3)


def warp_regions_tensor(image_bgr: np.ndarray, boxes: np.ndarray, **kw) -> torch.Tensor:
    """``warp_regions`` as a contiguous float ``Tensor[N, 3, size, size]`` (channels still BGR)."""
    return torch.from_numpy(warp_regions(image_bgr, boxes, **kw)).permute(0, 3, 1, 2).contiguous()
