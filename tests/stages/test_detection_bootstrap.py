"""The image bootstrap of mAP equals evaluating the repeated images one by one with the devkit AP."""

from __future__ import annotations

import numpy as np
import pytest

from stages.detection.bootstrap import bootstrap_map, image_draws
from stages.detection.evaluate import evaluate_detections

CLASSES = ["a", "b"]


def _scene(seed: int = 0, images: int = 8):
    rng = np.random.default_rng(seed)
    gt = {k: [] for k in ("image_id", "class", "x1", "y1", "x2", "y2", "difficult")}
    det = {k: [] for k in ("image_id", "class", "score", "x1", "y1", "x2", "y2")}
    for i in range(images):
        image_id = f"im{i}"
        for _ in range(int(rng.integers(0, 3))):  # some images have no objects
            cls = CLASSES[int(rng.integers(0, 2))]
            x, y = rng.uniform(1, 60, 2)
            box = [x, y, x + rng.uniform(10, 30), y + rng.uniform(10, 30)]
            for k, v in zip(("x1", "y1", "x2", "y2"), box, strict=True):
                gt[k].append(v)
            gt["image_id"].append(image_id)
            gt["class"].append(cls)
            gt["difficult"].append(bool(rng.random() < 0.2))
            for _ in range(int(rng.integers(0, 3))):  # jittered hits and duplicates
                for k, v in zip(("x1", "y1", "x2", "y2"), box, strict=True):
                    det[k].append(v + rng.normal(0, 4))
                det["image_id"].append(image_id)
                det["class"].append(cls if rng.random() < 0.8 else CLASSES[0])
                det["score"].append(rng.random())
        for _ in range(int(rng.integers(0, 3))):  # false positives anywhere
            x, y = rng.uniform(1, 60, 2)
            for k, v in zip(("x1", "y1", "x2", "y2"), (x, y, x + 15, y + 15), strict=True):
                det[k].append(v)
            det["image_id"].append(image_id)
            det["class"].append(CLASSES[int(rng.integers(0, 2))])
            det["score"].append(rng.random())
    return det, gt, [f"im{i}" for i in range(images)]


def _naive_map(det, gt, image_ids, counts, use_07):
    """Repeat each drawn image as a renamed copy and run the devkit evaluator: the definition."""
    d2 = {k: [] for k in det}
    g2 = {k: [] for k in gt}
    for i, image_id in enumerate(image_ids):
        for copy in range(counts[i]):
            for src, dst in ((det, d2), (gt, g2)):
                for r in [r for r, x in enumerate(src["image_id"]) if x == image_id]:
                    for k in src:
                        dst[k].append(f"{image_id}#{copy}" if k == "image_id" else src[k][r])
    res = evaluate_detections({k: d2[k] for k in d2}, {k: g2[k] for k in g2}, CLASSES)
    return res["mAP_voc07" if use_07 else "mAP_area"]


@pytest.mark.parametrize("use_07", [True, False])
def test_resampling_images_equals_the_naive_loop(use_07):
    det, gt, ids = _scene()
    out = bootstrap_map({"x": det}, gt, CLASSES, ids, resamples=25, seed=7, use_07_metric=use_07)
    draws = image_draws(len(ids), 25, 7)
    naive = np.array([_naive_map(det, gt, ids, c, use_07) for c in draws])
    np.testing.assert_allclose(out["samples"]["x"], naive, rtol=0, atol=1e-12)
    full = evaluate_detections(det, gt, CLASSES)
    assert out["mAP"]["x"] == pytest.approx(full["mAP_voc07" if use_07 else "mAP_area"])


def test_images_not_detections_are_resampled():
    # one image holds every detection and object: a draw either has it (k copies) or not, so
    # the mAP of every draw is the full mAP or NaN — resampling detections would vary it
    det, gt, _ = _scene(images=1)
    ids = ["im0", "empty1", "empty2"]
    out = bootstrap_map({"x": det}, gt, CLASSES, ids, resamples=200, seed=0)
    s = out["samples"]["x"]
    finite = s[np.isfinite(s)]
    assert len(finite) and np.allclose(finite, out["mAP"]["x"])
    assert np.isnan(s).any()  # draws without im0 have no positives at all


def test_paired_detectors_share_the_draws():
    det, gt, ids = _scene(3)
    out = bootstrap_map({"a": det, "b": det}, gt, CLASSES, ids, resamples=50, seed=1)
    np.testing.assert_array_equal(out["samples"]["a"], out["samples"]["b"])


def test_detections_on_unknown_images_are_an_error():
    det, gt, ids = _scene()
    with pytest.raises(ValueError, match="not in image_ids"):
        bootstrap_map({"x": det}, gt, CLASSES, ids[:-3], resamples=2)
