"""Class-specific bounding-box regression (R-CNN Appendix C; REFERENCE §1).

Targets for a proposal P and its ground truth G (centres x, y and sizes w, h):
``tx = (Gx - Px) / Pw, ty = (Gy - Py) / Ph, tw = log(Gw / Pw), th = log(Gh / Ph)``.

Box convention. Boxes are ``(N, 4)`` xyxy in VOC 1-based inclusive pixels, but the size in the
targets follows R-CNN's code, not the inclusive pixel count: ``rcnn_train_bbox_regressor.m`` and
``rcnn_predict_bbox_regressor.m`` use ``w = x2 - x1 (+ eps)`` and centre ``x1 + 0.5 * w``. Fast
R-CNN and later switched to ``w = x2 - x1 + 1``. ``width_offset`` picks between them: ``0.0``
(default, R-CNN) or ``1.0`` (inclusive pixels, Fast R-CNN). They differ by a factor ``w / (w + 1)``
in the targets, under 1% for boxes of 100 px and more. Either way ``decode_boxes`` is the exact
inverse of ``encode_boxes`` (``x2 = centre + 0.5 * w - width_offset``). Boxes with size ``<= 0``
raise an error where R-CNN adds ``eps`` and would produce huge targets.

Regressor. R-CNN solves ridge regression ``min ||A beta - y||^2 + lambda ||beta||^2`` by Cholesky,
per class and per target, with ``A = [features, 1]``: the bias is an appended constant column and
*is* penalised, and the targets are centred on their mean first. It also whitens the centred targets
and un-whitens predictions; because ridge is linear in ``y``, that step cancels exactly, so it is
left out (the tests check parity with the full MATLAB recipe). We keep R-CNN's recipe, solved by
``sklearn.linear_model.Ridge(fit_intercept=False)`` on the augmented matrix. ``fit_intercept=True``
would instead leave the intercept unpenalised *and* centre the features, a different solution at
lambda = 1000 with non-negative (ReLU) pool5 features. Pass pool5 features scaled as for the SVMs
(mean L2 norm 20, REFERENCE §1 "SVMs" and "Bounding-box regression"): lambda = 1000 assumes it.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import Ridge


def _as_boxes(boxes: np.ndarray, name: str) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"{name} must have shape (N, 4) xyxy, got {b.shape}")
    return b


def _centres_sizes(
    boxes: np.ndarray, name: str, width_offset: float, allow_zero: bool = False
) -> tuple[np.ndarray, ...]:
    """``(cx, cy, w, h)``, each ``(N,)``, with ``w = x2 - x1 + width_offset``.

    ``allow_zero``: a zero size becomes machine epsilon, as R-CNN's ``src_w = x2 - x1 + eps``
    (rcnn_predict_bbox_regressor.m), so a zero-width proposal decodes to a zero-width box at the
    same centre instead of aborting detection (precomputed proposals are not size-filtered).
    """
    w = boxes[:, 2] - boxes[:, 0] + width_offset
    h = boxes[:, 3] - boxes[:, 1] + width_offset
    if allow_zero:
        eps = np.finfo(np.float64).eps
        w, h = np.where(w == 0, eps, w), np.where(h == 0, eps, h)
    bad = ~((w > 0) & (h > 0))  # also catches NaN
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name} box {i} = {boxes[i].tolist()} has non-positive size "
            f"(width_offset={width_offset}); expected x2 > x1 - width_offset, y2 > y1 - width_offset"
        )
    return boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h, w, h


def encode_boxes(proposals: np.ndarray, gt: np.ndarray, *, width_offset: float = 0.0) -> np.ndarray:
    """Regression targets ``(N, 4)`` = ``(tx, ty, tw, th)`` from ``(N, 4)`` proposals to ``(N, 4)`` gt."""
    p, g = _as_boxes(proposals, "proposals"), _as_boxes(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"proposals {p.shape} and gt {g.shape} must pair up row by row")
    px, py, pw, ph = _centres_sizes(p, "proposals", width_offset)
    gx, gy, gw, gh = _centres_sizes(g, "gt", width_offset)
    return np.stack([(gx - px) / pw, (gy - py) / ph, np.log(gw / pw), np.log(gh / ph)], axis=1)


def decode_boxes(
    proposals: np.ndarray, deltas: np.ndarray, *, width_offset: float = 0.0
) -> np.ndarray:
    """Apply ``(N, 4)`` deltas ``(tx, ty, tw, th)`` to ``(N, 4)`` proposals -> ``(N, 4)`` xyxy boxes.

    The inverse of ``encode_boxes``. Not clipped to the image (R-CNN clips afterwards, App. C), and
    ``tw, th`` are not clamped, as in R-CNN.
    """
    p = _as_boxes(proposals, "proposals")
    d = np.asarray(deltas, dtype=np.float64)
    if d.shape != p.shape:
        raise ValueError(f"deltas {d.shape} must match proposals {p.shape}")
    px, py, pw, ph = _centres_sizes(p, "proposals", width_offset, allow_zero=True)
    cx, cy = px + d[:, 0] * pw, py + d[:, 1] * ph
    w, h = pw * np.exp(d[:, 2]), ph * np.exp(d[:, 3])
    return np.stack(
        [cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w - width_offset, cy + 0.5 * h - width_offset],
        axis=1,
    )


class BoxRegressor:
    """Ridge regression from ``(N, D)`` features to box targets, one estimator per class.

    Learned: ``coef_ (4, D)``, ``intercept_ (4,)`` (bias weight plus target mean), ``n_train_``.
    """

    def __init__(
        self,
        alpha: float = 1000.0,  # lambda, App. C
        min_iou: float = 0.6,  # train on proposals with IoU > 0.6 to their gt, App. C
        width_offset: float = 0.0,  # 0: R-CNN code's w = x2 - x1; 1: inclusive pixels
    ):
        self.alpha = alpha
        self.min_iou = min_iou
        self.width_offset = width_offset

    def fit(
        self,
        features: np.ndarray,
        proposals: np.ndarray,
        gt_boxes: np.ndarray,
        ious: np.ndarray,
    ) -> BoxRegressor:
        """Fit on rows with ``ious > min_iou`` (strict, as ``O > min_overlap`` in R-CNN).

        ``features (N, D)``; ``proposals``, ``gt_boxes (N, 4)``: each proposal with its max-IoU
        ground truth of this class; ``ious (N,)``: that IoU (devkit convention).
        """
        x = np.asarray(features)
        if x.ndim != 2:
            raise ValueError(f"features must have shape (N, D), got {x.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float64)
        ious = np.asarray(ious, dtype=np.float64).reshape(-1)
        if not len(x) == len(ious) == len(proposals) == len(gt_boxes):
            raise ValueError(
                f"features, proposals, gt_boxes and ious need one row per pair, got lengths "
                f"{len(x)}, {len(proposals)}, {len(gt_boxes)}, {len(ious)}"
            )
        keep = ious > self.min_iou
        if not keep.any():
            raise ValueError(f"no training pairs with IoU > {self.min_iou} (of {len(ious)} given)")
        p, g = _as_boxes(proposals, "proposals")[keep], _as_boxes(gt_boxes, "gt_boxes")[keep]
        targets = encode_boxes(p, g, width_offset=self.width_offset).astype(x.dtype)  # (K, 4)
        target_mean = targets.mean(axis=0)  # R-CNN centres targets; the penalised bias then
        # shrinks predictions towards the mean target rather than towards zero.
        augmented = np.hstack([x[keep], np.ones((int(keep.sum()), 1), dtype=x.dtype)])  # (K, D+1)
        ridge = Ridge(alpha=self.alpha, fit_intercept=False).fit(augmented, targets - target_mean)
        weights = np.asarray(ridge.coef_, dtype=np.float64)  # (4, D + 1)
        self.coef_ = weights[:, :-1]
        self.intercept_ = weights[:, -1] + target_mean
        self.n_train_ = int(keep.sum())
        return self

    def predict_deltas(self, features: np.ndarray) -> np.ndarray:
        """Predicted targets ``(N, 4)`` for ``(N, D)`` features."""
        return np.asarray(features) @ self.coef_.T + self.intercept_

    def predict(self, features: np.ndarray, proposals: np.ndarray) -> np.ndarray:
        """Refined ``(N, 4)`` xyxy boxes for ``(N, D)`` features of ``(N, 4)`` proposals; unclipped."""
        return decode_boxes(
            proposals, self.predict_deltas(features), width_offset=self.width_offset
        )
