"""Region inputs and features for R-CNN's segmentation experiment (§5, "full", "fg", "full+fg").

R-CNN §5 classifies free-form regions (CPMC segments) with three feature strategies:

- ``"full"``: the CNN sees the region's bounding box, warped exactly as for detection;
- ``"fg"``: the CNN sees the same warped box with the background (pixels outside the region's
  mask) replaced by the mean input, "so that background regions are zero after mean subtraction";
- ``"full+fg"``: the two feature vectors concatenated (the paper's best: 47.9% mean accuracy on
  VOC 2011 val with fc6, Table 5).

Boxes are ``(N, 4)`` xyxy in VOC 1-based inclusive pixels; masks are ``(N, H, W)`` bool on the
image grid, one per box. Crops are ``(N, S, S, 3)`` float32 BGR minus the mean, as ``warp.py``
returns them.

Mask geometry: a mask is warped by handing ``warp_regions`` a 0/255 image made from it and a zero
mean, then thresholding at 127.5. That reuses ``rcnn_im_crop``'s crop, context and resize
arithmetic byte for byte instead of a second copy of it; bilinear-then-threshold at one half is a
nearest-neighbour resize up to ties on the object boundary. ``"fg"`` then zeroes the full crop
outside the warped mask. The paper replaced the background *before* warping, so the two differ
only on the one-pixel band where bilinear resizing would blend object and mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import confusion_matrix
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from stages.detection.warp import IMAGENET_MEAN_BGR, warp_regions

REGION_MODES = ("full", "fg", "full+fg")


def _check_masks(masks: np.ndarray, boxes: np.ndarray, image_hw: tuple[int, int] | None) -> None:
    masks = np.asarray(masks)
    if masks.dtype != np.bool_:
        # A uint8 instance map here would count VOC's 255 "void" pixels as object: compare first.
        raise ValueError(f"masks must be bool (N, H, W), got dtype {masks.dtype}")
    if masks.ndim != 3 or masks.shape[0] != len(boxes):
        raise ValueError(f"masks must have shape (N={len(boxes)}, H, W), got {masks.shape}")
    if image_hw is not None and masks.shape[1:] != image_hw:
        raise ValueError(f"masks are {masks.shape[1:]} (H, W) but the image is {image_hw}")


def warp_region_masks(
    masks: np.ndarray, boxes: np.ndarray, *, size: int, padding: int
) -> np.ndarray:
    """Warp ``(N, H, W)`` bool masks with their ``(N, 4)`` boxes to ``(N, size, size)`` bool.

    Same geometry as ``warp_regions(..., mode="warp")``; context outside the image is False.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    _check_masks(masks, boxes, None)
    out = np.zeros((len(boxes), size, size), dtype=bool)  # (N, S, S)
    zero_mean = (0.0, 0.0, 0.0)
    for i, (mask, box) in enumerate(zip(masks, boxes, strict=True)):
        image = np.repeat((mask.astype(np.uint8) * 255)[:, :, None], 3, axis=2)  # (H, W, 3)
        warped = warp_regions(
            image, box[None], size=size, padding=padding, mode="warp", mean_bgr=zero_mean
        )  # (1, S, S, 3), 0..255
        out[i] = warped[0, :, :, 0] > 127.5
    return out


def _full_and_fg(
    image_bgr: np.ndarray,
    boxes: np.ndarray,
    masks: np.ndarray,
    *,
    size: int,
    padding: int,
    mean_bgr: Sequence[float] | np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(image_bgr)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    _check_masks(masks, boxes, image.shape[:2] if image.ndim == 3 else None)
    full = warp_regions(image, boxes, size=size, padding=padding, mean_bgr=mean_bgr)
    inside = warp_region_masks(masks, boxes, size=size, padding=padding)  # (N, S, S)
    fg = np.where(inside[..., None], full, np.float32(0))  # outside the mask: the mean, i.e. 0
    return full, fg


def warp_foreground(
    image_bgr: np.ndarray,
    boxes: np.ndarray,
    masks: np.ndarray,
    *,
    size: int,
    padding: int,
    mean_bgr: Sequence[float] | np.ndarray = IMAGENET_MEAN_BGR,
) -> np.ndarray:
    """§5 "fg" crops ``(N, size, size, 3)`` float32: the warped box, 0 (the mean) off the mask."""
    return _full_and_fg(image_bgr, boxes, masks, size=size, padding=padding, mean_bgr=mean_bgr)[1]


def region_inputs(
    image_bgr: np.ndarray,
    boxes: np.ndarray,
    masks: np.ndarray,
    *,
    size: int,
    padding: int,
    mean_bgr: Sequence[float] | np.ndarray = IMAGENET_MEAN_BGR,
) -> dict[str, np.ndarray]:
    """``{"full": (N, S, S, 3), "fg": (N, S, S, 3)}`` float32 crops; the box is warped once."""
    full, fg = _full_and_fg(image_bgr, boxes, masks, size=size, padding=padding, mean_bgr=mean_bgr)
    return {"full": full, "fg": fg}


def combine_region_features(full: np.ndarray, fg: np.ndarray, mode: str) -> np.ndarray:
    """Features for one §5 strategy: ``full`` (N, D), ``fg`` (N, D), or ``[full, fg]`` (N, 2D)."""
    if mode not in REGION_MODES:
        raise ValueError(f"mode must be one of {REGION_MODES}, got {mode!r}")
    if mode == "full":
        return full
    if mode == "fg":
        return fg
    if full.ndim != 2 or full.shape[0] != fg.shape[0]:
        raise ValueError(f"full+fg needs (N, D) arrays with equal N, got {full.shape}, {fg.shape}")
    return np.concatenate([full, fg], axis=1)  # (N, D_full + D_fg)


def region_accuracy(
    train_X: np.ndarray,
    train_y: np.ndarray,
    test_X: np.ndarray,
    test_y: np.ndarray,
    *,
    C: float = 1.0,
    num_classes: int,
) -> dict:
    """Train a linear classifier on region features and score it on held-out regions.

    A one-vs-rest ``LinearSVC`` (R-CNN's classifiers are linear SVMs, §2.3; §5 itself fed the
    features to O2P's support vector regressors, which predict segment overlap rather than a
    label). Features are standardised with statistics of ``train_X`` only. Labels are class
    indices ``0..num_classes-1``. Returns ``accuracy`` (fraction of ``test_y`` right),
    ``per_class`` (``{k: recall of class k}``, NaN where ``test_y`` has no class k) and
    ``confusion`` (``K x K`` nested list, rows = true class, columns = prediction).
    """
    train_X, test_X = np.asarray(train_X, np.float64), np.asarray(test_X, np.float64)
    train_y, test_y = np.asarray(train_y).astype(np.int64), np.asarray(test_y).astype(np.int64)
    if train_X.ndim != 2 or test_X.ndim != 2 or train_X.shape[1] != test_X.shape[1]:
        raise ValueError(f"need (N, D) features with equal D, got {train_X.shape}, {test_X.shape}")
    if len(train_y) != len(train_X) or len(test_y) != len(test_X):
        raise ValueError("need one label per feature row in train and test")
    for name, y in (("train_y", train_y), ("test_y", test_y)):
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} must lie in 0..{num_classes - 1}, got {y.min()}..{y.max()}")
    if len(np.unique(train_y)) < 2:
        raise ValueError(f"train_y holds {len(np.unique(train_y))} class(es); need at least two")
    if len(test_y) == 0:
        raise ValueError("test set is empty")

    scaler = StandardScaler().fit(train_X)
    # dual="auto": liblinear's dual for D > N (4096-d fc features, few regions), primal otherwise;
    # max_iter raised because the default 1000 can stop short of convergence on 8192-d full+fg.
    svm = LinearSVC(C=C, dual="auto", max_iter=10_000)
    svm.fit(scaler.transform(train_X), train_y)
    pred = svm.predict(scaler.transform(test_X))
    confusion = confusion_matrix(test_y, pred, labels=np.arange(num_classes))  # (K, K)
    totals = confusion.sum(axis=1)
    per_class = {
        k: float(confusion[k, k] / totals[k]) if totals[k] else float("nan")
        for k in range(num_classes)
    }
    return {
        "accuracy": float(np.mean(pred == test_y)),
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }
