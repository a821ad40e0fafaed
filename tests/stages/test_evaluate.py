import math

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import average_precision_score

from stages.detection.evaluate import evaluate_class, evaluate_detections, voc_ap

G1 = (1.0, 1.0, 10.0, 10.0)
FAR = (60.0, 60.0, 70.0, 70.0)


def gt_of(*objects):
    """gt value from (box, difficult) pairs."""
    boxes = np.array([b for b, _ in objects], dtype=float).reshape(-1, 4)
    return boxes, np.array([d for _, d in objects], dtype=bool)


def test_difficult_match_is_ignored():
    gt = {"a": gt_of((G1, True), ((21, 1, 30, 10), False))}
    dets = [("a", 0.9, G1), ("a", 0.8, (21, 1, 30, 10)), ("a", 0.7, FAR)]
    r = evaluate_class(dets, gt)
    assert r["num_pos"] == 1
    np.testing.assert_array_equal(r["tp"], [0, 1, 0])
    np.testing.assert_array_equal(r["fp"], [0, 0, 1])  # the difficult hit is neither
    np.testing.assert_array_equal(r["recall"], [0, 1, 1])
    # Precision is 0/0 before the first counted detection, as in the devkit; AP skips it.
    assert math.isnan(r["precision"][0]) and r["precision"][1:].tolist() == [1.0, 0.5]
    assert r["ap_voc07"] == pytest.approx(1.0) and r["ap_area"] == pytest.approx(1.0)


def test_duplicate_is_false_positive_and_missed_object_costs_recall():
    gt = {"a": gt_of((G1, False)), "b": gt_of((G1, False))}
    dets = [("a", 0.9, G1), ("a", 0.8, (1, 1, 10, 9))]  # IoU 0.9 with the same object
    r = evaluate_class(dets, gt)
    np.testing.assert_array_equal(r["tp"], [1, 0])
    np.testing.assert_array_equal(r["fp"], [0, 1])
    np.testing.assert_allclose(r["recall"], [0.5, 0.5])
    # 11-point: t = 0..0.5 see precision 1 -> 6/11; area: 0.5 * 1.
    assert r["ap_voc07"] == pytest.approx(6 / 11) and r["ap_area"] == pytest.approx(0.5)


def test_iou_exactly_half_is_true_positive():
    # gt 10 x 10 = 100 px inside det 10 x 20 = 200 px: IoU 100/200 = 0.5 exactly -> TP.
    # One more row: 100/210 < 0.5 -> FP. Detections in an image without gt -> FP.
    gt = {"a": gt_of((G1, False)), "b": gt_of((G1, False)), "c": gt_of()}
    dets = [("a", 0.9, (1, 1, 10, 20)), ("b", 0.8, (1, 1, 10, 21)), ("c", 0.7, G1)]
    dets.append(("zzz", 0.6, G1))  # image absent from gt entirely -> FP too
    r = evaluate_class(dets, gt)
    np.testing.assert_array_equal(r["tp"], [1, 0, 0, 0])
    np.testing.assert_array_equal(r["fp"], [0, 1, 1, 1])


def test_eleven_point_and_area_differ_on_hand_made_curve():
    # npos = 4, ranked TP FP TP FP FP TP (one object never found):
    #   recall    .25 .25  .5   .5  .5  .75
    #   precision  1  .5  2/3  .5  .4  .5
    # Area: envelope 1, 2/3, 2/3, .5 ... -> .25*1 + .25*2/3 + .25*.5 + .25*0 = 13/24 = 0.54167.
    # 11-point: t = 0, .1, .2 -> 1; t = .3, .4, .5 -> 2/3; t = .6, .7 -> .5; t >= .8 -> 0;
    #   (3 + 2 + 1) / 11 = 6/11 = 0.54545.
    rec = np.array([0.25, 0.25, 0.5, 0.5, 0.5, 0.75])
    prec = np.array([1, 0.5, 2 / 3, 0.5, 0.4, 0.5])
    assert voc_ap(rec, prec, use_07_metric=False) == pytest.approx(13 / 24, abs=1e-12)
    assert voc_ap(rec, prec, use_07_metric=True) == pytest.approx(6 / 11, abs=1e-12)
    # The same curve through evaluate_class: each object alone in its image.
    gt = {f"g{i}": gt_of((G1, False)) for i in range(4)}
    labels = [1, 0, 1, 0, 0, 1]
    dets, found = [], 0
    for k, is_tp in enumerate(labels):
        dets.append((f"g{found}" if is_tp else "bg", 1.0 - k / 10, G1 if is_tp else FAR))
        found += is_tp
    r = evaluate_class(dets, gt)
    np.testing.assert_allclose(r["recall"], rec)
    np.testing.assert_allclose(r["precision"], prec)
    assert r["ap_area"] == pytest.approx(13 / 24) and r["ap_voc07"] == pytest.approx(6 / 11)


def test_eleven_points_use_exact_tenths():
    # Recall reaches exactly 0.3 = 3/10; 3 * 0.1 = 0.30000000000000004 would miss it.
    rec, prec = np.array([0.1, 0.2, 0.3]), np.ones(3)
    assert voc_ap(rec, prec, use_07_metric=True) == pytest.approx(4 / 11, abs=1e-15)
    assert voc_ap(np.zeros(0), np.zeros(0), use_07_metric=True) == 0.0
    assert voc_ap(np.zeros(0), np.zeros(0), use_07_metric=False) == 0.0


def test_ties_keep_input_order_and_columns_input():
    gt = {"a": gt_of((G1, False))}
    boxes = np.array([FAR, G1], dtype=float)
    fp_first = evaluate_class((["a", "a"], np.array([0.5, 0.5]), boxes), gt)
    np.testing.assert_array_equal(fp_first["order"], [0, 1])
    np.testing.assert_array_equal(fp_first["tp"], [0, 1])
    assert fp_first["ap_area"] == pytest.approx(0.5)
    tp_first = evaluate_class((["a", "a"], np.array([0.5, 0.5]), boxes[::-1].copy()), gt)
    assert tp_first["ap_area"] == pytest.approx(1.0)


def test_class_without_positives_is_nan():
    r = evaluate_class([("a", 0.9, G1)], {"a": gt_of((G1, True))})
    assert r["num_pos"] == 0 and math.isnan(r["ap_voc07"]) and math.isnan(r["ap_area"])
    assert r["tp"].tolist() == [0] and r["fp"].tolist() == [0]
    empty = evaluate_class([], {"a": gt_of((G1, False))})
    assert empty["ap_voc07"] == 0.0 and empty["ap_area"] == 0.0 and len(empty["recall"]) == 0


def test_evaluate_detections_two_classes_hand_computed():
    # cat: npos 2 (the difficult cat in i2 does not count). Ranked FP, TP, ignored, TP:
    #   tp 0 1 1 2 / fp 1 1 1 1 -> precision 0, .5, .5, 2/3; recall 0, .5, .5, 1.
    #   11-point: every t sees max precision 2/3 -> 2/3. Area: .5 * 2/3 + .5 * 2/3 = 2/3.
    # dog: npos 1. Ranked FP (no dog in i2), TP, FP (duplicate):
    #   precision 0, .5, 1/3; recall 0, 1, 1 -> 11-point .5, area .5.
    # bird: no positives, no detections -> NaN, left out. mAP = (2/3 + 1/2) / 2 = 7/12.
    gt = pa.table(
        {
            "image_id": ["i1", "i1", "i2", "i2", "i2"],
            "class": ["cat", "dog", "cat", "cat", "cow"],  # cow is not evaluated
            "x1": [1.0, 21, 1, 31, 1],
            "y1": [1.0, 21, 1, 31, 1],
            "x2": [10.0, 40, 20, 50, 20],
            "y2": [10.0, 40, 20, 50, 20],
            "difficult": [False, False, True, False, False],
        }
    )
    det = {
        "image_id": ["i1", "i1", "i2", "i2", "i2", "i1", "i1"],
        "class": ["cat", "cat", "cat", "cat", "dog", "dog", "dog"],
        "score": [0.95, 0.9, 0.85, 0.8, 0.9, 0.4, 0.3],
        "x1": [60, 1, 1, 31, 1, 21, 22],
        "y1": [60, 1, 1, 31, 1, 21, 22],
        "x2": [70, 10, 20, 50, 20, 40, 40],
        "y2": [70, 10, 20, 50, 20, 40, 40],
    }
    out = evaluate_detections(det, gt, ["cat", "dog", "bird"])
    assert out["AP_voc07"]["cat"] == pytest.approx(2 / 3)
    assert out["AP_area"]["cat"] == pytest.approx(2 / 3)
    assert out["AP_voc07"]["dog"] == pytest.approx(0.5)
    assert out["AP_area"]["dog"] == pytest.approx(0.5)
    assert math.isnan(out["AP_voc07"]["bird"])
    assert out["mAP_voc07"] == pytest.approx(7 / 12) and out["mAP_area"] == pytest.approx(7 / 12)
    rec, prec = out["curves"]["dog"]
    np.testing.assert_allclose(rec, [0, 1, 1])
    np.testing.assert_allclose(prec, [0, 0.5, 1 / 3])
    with pytest.raises(ValueError, match="lacks columns"):
        evaluate_detections({k: v for k, v in det.items() if k != "score"}, gt, ["cat"])
    with pytest.raises(ValueError, match="not in classes"):
        evaluate_detections(det, gt, ["cat"])


def test_area_ap_vs_sklearn():
    """sklearn's AP is sum_n (R_n - R_{n-1}) P_n without the envelope, over all positives in
    y_true. With every positive detected, no difficult objects and distinct scores, the devkit's
    area AP can only be larger (the envelope dominates P_n), and the two agree exactly when the
    precision at each true positive already equals its envelope."""
    # Hand case: TP FP TP TP -> precisions at TPs 1, 2/3, 3/4; envelope at the 2nd TP is 3/4.
    # VOC: (1 + 3/4 + 3/4) / 3 = 5/6; sklearn: (1 + 2/3 + 3/4) / 3 = 29/36.
    y = np.array([1, 0, 1, 1])
    rec, prec = np.cumsum(y) / 3, np.cumsum(y) / np.arange(1, 5)
    assert voc_ap(rec, prec, use_07_metric=False) == pytest.approx(5 / 6)
    assert average_precision_score(y, -np.arange(4)) == pytest.approx(29 / 36)
    rng = np.random.default_rng(0)
    agree = differ = 0
    for _ in range(200):
        y = (rng.random(12) < 0.5).astype(int)
        if y.sum() == 0:
            continue
        rec, prec = np.cumsum(y) / y.sum(), np.cumsum(y) / np.arange(1, 13)
        ours = voc_ap(rec, prec, use_07_metric=False)
        theirs = average_precision_score(y, -np.arange(12.0))
        envelope = np.maximum.accumulate(prec[::-1])[::-1]
        if np.all(prec[y == 1] == envelope[y == 1]):
            assert ours == pytest.approx(theirs, abs=1e-12)
            agree += 1
        else:
            assert ours > theirs
            differ += 1
    assert agree > 10 and differ > 10
