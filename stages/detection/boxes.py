"""Box arithmetic in the PASCAL VOC devkit convention.

Every box here is a float numpy array ``(N, 4)`` of ``xyxy`` in **VOC 1-based inclusive pixel
coordinates**: a box covering 0-based pixel columns 0..9 has ``x1 = 1, x2 = 10`` and width
``x2 - x1 + 1 = 10``. The devkit (`VOCevaldet`) and R-CNN measure overlap with these "+1" widths
(REFERENCE §1, "VOC evaluation"); ``torchvision.ops.box_iou`` uses continuous coordinates and
agrees once a box is shifted to ``(x1 - 1, y1 - 1, x2, y2)`` — the tests check exactly that.
"""

from __future__ import annotations

import numpy as np


def _as_boxes(boxes: np.ndarray, name: str = "boxes") -> np.ndarray:
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{name} must have shape (N, 4) xyxy, got {arr.shape}")
    return arr


def box_area_voc(boxes: np.ndarray) -> np.ndarray:
    """Areas ``(N,)`` of ``(N, 4)`` VOC boxes: ``(x2 - x1 + 1) * (y2 - y1 + 1)``."""
    b = _as_boxes(boxes)
    return (b[:, 2] - b[:, 0] + 1.0) * (b[:, 3] - b[:, 1] + 1.0)


def box_iou_voc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Devkit IoU ``(N, M)`` between ``(N, 4)`` and ``(M, 4)`` VOC boxes (inclusive widths).

    Pairs that do not overlap by at least one whole pixel in both directions get 0, as in
    `VOCevaldet` (``iw > 0 && ih > 0``). Either input may be empty.
    """
    a = _as_boxes(a, "a")
    b = _as_boxes(b, "b")
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + 1.0
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + 1.0
    inter = np.clip(iw, 0.0, None) * np.clip(ih, 0.0, None)  # (N, M)
    union = box_area_voc(a)[:, None] + box_area_voc(b)[None, :] - inter  # (N, M)
    out = np.zeros_like(inter)
    # union <= 0 only for degenerate boxes (x2 < x1 - 1); call their overlap 0 rather than divide.
    np.divide(inter, union, out=out, where=(inter > 0) & (union > 0))
    return out


def dedupe_boxes(boxes: np.ndarray) -> np.ndarray:
    """Indices ``(K,)`` of the first occurrence of each distinct box, in original order.

    R-CNN removes exact duplicates after ranking and keeps the best-ranked copy
    (`BoxRemoveDuplicates`, REFERENCE §1 "Proposals").
    """
    b = _as_boxes(boxes)
    if len(b) == 0:
        return np.zeros(0, dtype=np.int64)
    _, first = np.unique(b, axis=0, return_index=True)
    return np.sort(first).astype(np.int64)


def to_voc_from_xywh0(rects: np.ndarray) -> np.ndarray:
    """OpenCV rects ``(N, 4)`` ``(x, y, w, h)`` 0-based -> ``(N, 4)`` xyxy 1-based inclusive."""
    r = _as_boxes(rects, "rects")
    x1 = r[:, 0] + 1.0
    y1 = r[:, 1] + 1.0
    # The last covered 0-based column is x + w - 1, i.e. x + w in 1-based terms.
    return np.stack([x1, y1, r[:, 0] + r[:, 2], r[:, 1] + r[:, 3]], axis=1)


def clip_boxes_voc(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Clip ``(N, 4)`` VOC boxes to the image: x to ``[1, width]``, y to ``[1, height]``."""
    b = _as_boxes(boxes).copy()
    b[:, 0::2] = np.clip(b[:, 0::2], 1.0, float(width))
    b[:, 1::2] = np.clip(b[:, 1::2], 1.0, float(height))
    return b


def max_iou_assign(boxes: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``(N, 4)`` boxes, its best devkit IoU with ``(M, 4)`` ground truth.

    Returns ``(max_iou (N,) float64, gt_index (N,) int64)``; ties (including all-zero rows) go to
    the lowest gt index, so check ``max_iou`` before using the index.
    With no ground truth every box gets IoU 0 and index -1.
    """
    iou = box_iou_voc(boxes, gt)  # (N, M)
    if iou.shape[1] == 0:
        return np.zeros(iou.shape[0]), np.full(iou.shape[0], -1, dtype=np.int64)
    return iou.max(axis=1), iou.argmax(axis=1).astype(np.int64)
