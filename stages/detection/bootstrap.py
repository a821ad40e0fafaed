"""Bootstrap of VOC AP / mAP over test *images* (not detections), paired across detectors.

An image drawn k times counts k times: its detections and its objects are repeated. A detection's
TP / FP / ignored flag depends only on the higher-scoring detections of its own image (the devkit
marks objects per image), so the flags of one full evaluation hold in every resample and a
resample is a weighted cumulative sum over the detections in score order. Copies of one detection
are either all TP, all FP or all ignored, and the curve points between them never raise the max
precision at any recall, so the 11-point and area APs equal those of evaluating the repeated
images one by one (``tests/stages/test_detection_bootstrap.py`` checks it against that loop).

Every detector is evaluated on the same image draws, so differences between them (fine-tuning,
box regression, a threshold) are paired.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from stages.detection.evaluate import _columns, evaluate_class, voc_ap


def image_draws(num_images: int, resamples: int, seed: int) -> np.ndarray:
    """``(B, num_images)`` counts: how often each image is drawn in each resample."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, num_images, size=(resamples, num_images))
    return np.stack([np.bincount(row, minlength=num_images) for row in idx])


def _class_flags(det, gt, cls: str, image_index: Mapping[str, int]) -> dict:
    """Score-ordered flags of one class's detections and per-image positives."""
    g = np.flatnonzero(np.array(gt["class"], dtype=object) == cls)
    per_image: dict = {}
    for r in g:
        per_image.setdefault(gt["image_id"][r], []).append(r)
    boxes = np.stack([gt[k] for k in ("x1", "y1", "x2", "y2")], 1).astype(np.float64)
    diff = np.asarray(gt["difficult"], bool)
    cls_gt = {i: (boxes[r], diff[r]) for i, r in per_image.items()}
    npos = np.zeros(len(image_index), np.int64)
    for i, r in per_image.items():
        npos[image_index[i]] = int((~diff[r]).sum())
    d = np.flatnonzero(np.array(det["class"], dtype=object) == cls)
    ids = [det["image_id"][k] for k in d]
    dboxes = np.stack([det[k][d] for k in ("x1", "y1", "x2", "y2")], 1).astype(np.float64)
    res = evaluate_class((ids, det["score"][d].astype(np.float64), dboxes), cls_gt)
    img = np.array([image_index[ids[k]] for k in res["order"]], np.int64)
    return {"tp": res["tp"], "fp": res["fp"], "image": img, "npos": npos}


def _ap(flags: dict, counts: np.ndarray, use_07_metric: bool) -> float:
    npos = int(flags["npos"] @ counts)
    if npos == 0:
        return float("nan")
    w = counts[flags["image"]]
    keep = w > 0
    tp, fp, w = flags["tp"][keep], flags["fp"][keep], w[keep]
    cum_tp, cum_fp = np.cumsum(tp * w), np.cumsum(fp * w)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = cum_tp / (cum_tp + cum_fp)
    return voc_ap(cum_tp / npos, precision, use_07_metric=use_07_metric)


def bootstrap_map(
    det_tables: Mapping[str, object],
    gt_table,
    classes: Sequence[str],
    image_ids: Sequence[str],
    *,
    resamples: int = 2000,
    seed: int = 0,
    use_07_metric: bool = True,
) -> dict:
    """mAP of each detector on the test images and on ``resamples`` image draws.

    ``det_tables``: name -> detections (``image_id, class, score, x1, y1, x2, y2``; a
    ``pyarrow.Table`` or dict of columns); ``gt_table``: the objects of exactly these images;
    ``image_ids``: every evaluated image, those without objects included (their detections are
    false positives). Returns ``{"mAP": name -> float, "samples": name -> (B,) mAP per draw,
    "AP": name -> class -> float, "ap_samples": name -> class -> (B,), "num_images": n,
    "num_pos": class -> non-difficult objects}``. A class without positives in a draw is left
    out of that draw's mAP, as the evaluator leaves it out of the mAP.
    """
    image_index = {i: k for k, i in enumerate(image_ids)}
    if len(image_index) != len(image_ids):
        raise ValueError("image_ids must be unique")
    gt = _columns(gt_table, ("image_id", "class", "x1", "y1", "x2", "y2", "difficult"), "gt")
    unknown = sorted(set(gt["image_id"]) - set(image_index))
    if unknown:
        raise ValueError(f"gt_table has objects of images not in image_ids: {unknown[:3]}")
    draws = image_draws(len(image_ids), resamples, seed)
    full = np.ones(len(image_ids), np.int64)
    out: dict = {"mAP": {}, "samples": {}, "AP": {}, "ap_samples": {}, "num_images": len(image_ids)}
    num_pos = {}
    for name, table in det_tables.items():
        det = _columns(table, ("image_id", "class", "score", "x1", "y1", "x2", "y2"), name)
        missing = sorted(set(det["image_id"]) - set(image_index))
        if missing:
            raise ValueError(f"{name}: detections on images not in image_ids: {missing[:3]}")
        aps, samples = {}, {}
        for cls in classes:
            flags = _class_flags(det, gt, cls, image_index)
            num_pos[cls] = int(flags["npos"].sum())
            aps[cls] = _ap(flags, full, use_07_metric)
            samples[cls] = np.array([_ap(flags, c, use_07_metric) for c in draws])
        stacked = np.stack([samples[c] for c in classes])  # (C, B)
        with np.errstate(invalid="ignore"):
            finite = np.isfinite(stacked)
            per_draw = np.where(finite, stacked, 0).sum(0) / np.maximum(finite.sum(0), 1)
        per_draw[~finite.any(0)] = np.nan
        point = [v for v in aps.values() if np.isfinite(v)]
        out["mAP"][name] = float(np.mean(point)) if point else float("nan")
        out["samples"][name] = per_draw
        out["AP"][name], out["ap_samples"][name] = aps, samples
    out["num_pos"] = num_pos
    return out
