"""Per-class greedy non-maximum suppression and the per-class top-k cut (R-CNN §2.2).

Boxes are ``(N, 4)`` xyxy in VOC 1-based inclusive pixel coordinates (``boxes.py``).

Semantics of R-CNN's ``nms.m`` (REFERENCE §1 "Test time"): visit boxes by decreasing score; a box
survives iff its IoU with every higher-scoring *kept* box of its class is ``<= iou_threshold``, so a
pair at exactly 0.3 both survive. IoU uses inclusive widths (``x2 - x1 + 1``).

We call ``torchvision.ops.batched_nms``, which suppresses only ``IoU > threshold`` as well, after two
conversions that make it agree with ``nms.m`` exactly:

- Coordinates: torchvision's IoU is continuous (no +1). Shifting to ``(x1, y1, x2 + 1, y2 + 1)``
  makes it equal the inclusive-pixel IoU. Without the shift only pairs near the threshold change,
  but those are exactly the ones NMS decides.
- Precision: boxes go in as float64. In float32 an IoU of exactly 30/100 becomes 0.3000000119 and is
  suppressed at threshold 0.3; in float64 integer boxes give the correctly rounded IoU, equal to the
  double 0.3. (Up to 4000 coordinates on CPU, torchvision separates classes by offsetting the boxes;
  for fractional boxes that can move an IoU by ~1e-12, which only matters exactly at the threshold.
  Above that it loops over classes.)
- Ties: ``nms.m`` sorts scores ascending (MATLAB's sort is stable) and takes the *last* remaining
  box, so among equal scores the higher input index goes first. torchvision's CPU sort is stable
  (lower index first), so we feed it the boxes in reverse order.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import batched_nms

from stages.detection.boxes import box_iou_voc


def _check(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray | None = None):
    b = np.asarray(boxes, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4) xyxy, got {b.shape}")
    if s.shape != (len(b),):
        raise ValueError(f"scores must have shape ({len(b)},), got {s.shape}")
    if np.isnan(s).any():
        raise ValueError(f"scores contain NaN at index {int(np.flatnonzero(np.isnan(s))[0])}")
    if labels is None:
        return b, s, None
    lab = np.asarray(labels)
    if lab.shape != (len(b),) or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(
            f"labels must be integers of shape ({len(b)},), got {lab.dtype} {lab.shape}"
        )
    return b, s, lab.astype(np.int64)


def _score_order(scores: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Permutation of ``index`` by decreasing score, ties by decreasing index (``nms.m`` order)."""
    return index[np.lexsort((-index, -scores[index]))]


def nms_per_class(
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    iou_threshold: float = 0.3,  # §2.2
) -> np.ndarray:
    """Indices ``(K,)`` int64 of boxes kept by greedy NMS within each label.

    ``boxes (N, 4)`` VOC xyxy, ``scores (N,)``, integer ``labels (N,)``. Boxes of different labels
    never suppress each other. Sorted by decreasing score (ties: higher index first).
    """
    b, s, lab = _check(boxes, scores, labels)
    if len(b) == 0:
        return np.zeros(0, dtype=np.int64)
    continuous = b + np.array([0.0, 0.0, 1.0, 1.0])  # inclusive pixels -> continuous edges
    rev = np.arange(len(b) - 1, -1, -1)  # reversed, so the stable sort prefers higher indices
    kept_rev = batched_nms(
        torch.from_numpy(continuous[rev]),
        torch.from_numpy(s[rev]),
        torch.from_numpy(lab[rev]),
        float(iou_threshold),
    ).numpy()
    return _score_order(s, rev[kept_rev])


def greedy_nms_reference(
    boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = 0.3
) -> np.ndarray:
    """Slow transcription of R-CNN's ``nms.m`` for one class; indices ``(K,)`` in pick order."""
    b, s, _ = _check(boxes, scores)
    remaining = list(np.argsort(s, kind="stable"))  # ascending; pick from the end
    picks = []
    while remaining:
        i = remaining.pop()
        picks.append(i)
        if remaining:
            iou = box_iou_voc(b[[i]], b[remaining])[0]
            remaining = [j for j, o in zip(remaining, iou, strict=True) if o <= iou_threshold]
    return np.array(picks, dtype=np.int64)


def top_k_per_class(scores: np.ndarray, labels: np.ndarray, k: int = 100) -> np.ndarray:
    """Indices ``(K,)`` of the ``k`` best-scoring boxes of each label, R-CNN's cut before NMS.

    R-CNN keeps the top 100 boxes per class per image *(code)*, ranking with MATLAB's stable
    ``sort(..., 'descend')``: among equal scores the lower index wins. Returned by decreasing
    score, ties by increasing index.
    """
    if k < 0:
        raise ValueError(f"k must be non-negative, got {k}")
    _, s, lab = _check(np.zeros((len(np.asarray(scores)), 4)), scores, labels)
    index = np.arange(len(s))
    by_label = np.lexsort((index, -s, lab))  # label, then score desc, then index
    sorted_labels = lab[by_label]
    group_start = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(len(s)) - group_start  # rank within its label
    kept = by_label[rank < k]
    return kept[np.lexsort((kept, -s[kept]))]
