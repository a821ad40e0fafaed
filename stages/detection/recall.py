"""Proposal quality: recall of ground truth versus number of proposals, and MABO.

The standard way to compare proposal methods (Uijlings et al. 2013, §5; Hosang et al. 2015): a
ground-truth box is *recalled* by the first ``top_n`` proposals of its image when its best devkit
IoU with them is at least the threshold. R-CNN relies on selective search reaching high recall at
≈2000 boxes per image (REFERENCE §1 "Proposals").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from stages.detection.boxes import box_iou_voc

DEFAULT_TOP_NS = (10, 50, 100, 200, 500, 1000, 2000)


def _best_iou_curves(
    gt_boxes: Mapping[str, np.ndarray], proposals: Mapping[str, np.ndarray]
) -> tuple[list[np.ndarray], np.ndarray]:
    """Per image: ``(M_i, P_i)`` running max over proposals of IoU with each gt; plus ``P_i``."""
    curves, counts = [], []
    for image_id, gt in gt_boxes.items():
        props = np.asarray(proposals.get(image_id, np.zeros((0, 4))), dtype=np.float64)
        props = props.reshape(-1, 4)
        iou = box_iou_voc(np.asarray(gt, dtype=np.float64).reshape(-1, 4), props)  # (M_i, P_i)
        # Column j of the running max = best IoU among the first j + 1 proposals.
        curves.append(np.maximum.accumulate(iou, axis=1) if iou.size else iou)
        counts.append(len(props))
    return curves, np.array(counts, dtype=np.int64)


def _best_at(curve: np.ndarray, top_n: int | None) -> np.ndarray:
    """Best IoU ``(M,)`` of each gt among the first ``top_n`` proposals (None = all)."""
    n = curve.shape[1] if top_n is None else min(top_n, curve.shape[1])
    return curve[:, n - 1] if n > 0 else np.zeros(curve.shape[0])


def proposal_recall(
    gt_boxes: Mapping[str, np.ndarray],
    proposals: Mapping[str, np.ndarray],
    iou_thresholds: Sequence[float] = (0.5, 0.7),
    top_ns: Sequence[int] = DEFAULT_TOP_NS,
) -> list[dict]:
    """Recall of ground truth by the first ``top_n`` proposals of each image.

    ``gt_boxes`` and ``proposals`` map image id -> ``(N, 4)`` xyxy VOC 1-based boxes; proposals
    best-ranked first. All images of ``gt_boxes`` count; one absent from ``proposals`` has all its
    ground truth missed. A gt counts as recalled when its IoU is ``>=`` the threshold. Returns one
    row per (top_n, threshold), with a final ``top_n=None`` (all proposals) group:
    ``{"top_n", "iou", "recall", "num_gt", "mean_proposals"}``; ``mean_proposals`` is the mean
    over ``gt_boxes`` images of ``min(top_n, P_i)``. Recall is NaN when there is no ground truth.
    """
    if any(n is not None and n < 0 for n in top_ns):
        raise ValueError(f"top_ns must be non-negative, got {list(top_ns)}")
    curves, counts = _best_iou_curves(gt_boxes, proposals)
    num_gt = int(sum(c.shape[0] for c in curves))
    rows = []
    for top_n in [*[n for n in top_ns if n is not None], None]:
        best = np.concatenate([_best_at(c, top_n) for c in curves]) if curves else np.zeros(0)
        used = counts if top_n is None else np.minimum(counts, top_n)
        mean_proposals = float(used.mean()) if len(used) else 0.0
        for iou in iou_thresholds:
            recall = float(np.mean(best >= iou)) if num_gt else float("nan")
            rows.append(
                {
                    "top_n": top_n,
                    "iou": float(iou),
                    "recall": recall,
                    "num_gt": num_gt,
                    "mean_proposals": mean_proposals,
                }
            )
    return rows


def mean_best_overlap(
    gt_boxes: Mapping[str, np.ndarray], proposals: Mapping[str, np.ndarray]
) -> float:
    """MABO: mean over all ground-truth boxes of their best devkit IoU with any proposal.

    Class-agnostic (Uijlings et al. average per class first). Same conventions as
    `proposal_recall`; NaN when there is no ground truth.
    """
    curves, _ = _best_iou_curves(gt_boxes, proposals)
    best = np.concatenate([_best_at(c, None) for c in curves]) if curves else np.zeros(0)
    return float(best.mean()) if len(best) else float("nan")
