import math

import numpy as np
import pytest

from stages.detection.recall import mean_best_overlap, proposal_recall

# Image "a": g1 is matched at IoU exactly 0.5 by the 1st proposal and 0.9 by the 4th; g2 at 1.0
# by the 3rd. Image "b": IoU 0.8 by the 1st. Image "c" has no proposals at all.
GT = {
    "a": np.array([[1, 1, 10, 10], [21, 1, 30, 10]], dtype=float),
    "b": np.array([[1, 1, 10, 10]], dtype=float),
    "c": np.array([[1, 1, 20, 20]], dtype=float),
}
PROPOSALS = {
    "a": np.array([[1, 1, 5, 10], [50, 50, 60, 60], [21, 1, 30, 10], [1, 1, 10, 9]], dtype=float),
    "b": np.array([[1, 1, 10, 8]], dtype=float),
    "z": np.array([[1, 1, 10, 10]], dtype=float),  # no ground truth: ignored
}


def as_table(rows):
    return {(r["top_n"], r["iou"]): (r["recall"], r["mean_proposals"]) for r in rows}


def test_recall_hand_worked():
    rows = proposal_recall(GT, PROPOSALS, iou_thresholds=(0.5, 0.7), top_ns=(1, 2, 3, 4))
    assert [(r["top_n"], r["iou"]) for r in rows][-2:] == [(None, 0.5), (None, 0.7)]
    assert len(rows) == 10 and all(r["num_gt"] == 4 for r in rows)
    got = as_table(rows)
    # IoU exactly 0.5 counts at the 0.5 threshold; image "c" always misses its one gt.
    assert got[(1, 0.5)] == pytest.approx((2 / 4, 2 / 3))
    assert got[(1, 0.7)] == pytest.approx((1 / 4, 2 / 3))
    assert got[(2, 0.5)] == pytest.approx((2 / 4, 3 / 3))
    assert got[(3, 0.5)] == pytest.approx((3 / 4, 4 / 3))
    assert got[(3, 0.7)] == pytest.approx((2 / 4, 4 / 3))
    assert got[(4, 0.7)] == pytest.approx((3 / 4, 5 / 3))
    assert got[(None, 0.5)] == pytest.approx((3 / 4, 5 / 3))
    assert got[(None, 0.7)] == pytest.approx((3 / 4, 5 / 3))


def test_recall_default_top_ns_and_zero():
    rows = proposal_recall(GT, PROPOSALS, top_ns=(0, 10))
    got = as_table(rows)
    assert got[(0, 0.5)] == (0.0, 0.0)
    assert got[(10, 0.7)] == pytest.approx((3 / 4, 5 / 3))  # top_n beyond P_i = all
    assert {r["top_n"] for r in proposal_recall(GT, PROPOSALS)} == {
        10,
        50,
        100,
        200,
        500,
        1000,
        2000,
        None,
    }


def test_recall_without_ground_truth_is_nan():
    rows = proposal_recall({"a": np.zeros((0, 4))}, PROPOSALS, top_ns=(1,))
    assert all(math.isnan(r["recall"]) and r["num_gt"] == 0 for r in rows)
    assert rows[0]["mean_proposals"] == 1.0


def test_negative_top_n_rejected():
    with pytest.raises(ValueError, match="non-negative"):
        proposal_recall(GT, PROPOSALS, top_ns=(-1,))


def test_mean_best_overlap():
    assert mean_best_overlap(GT, PROPOSALS) == pytest.approx((0.9 + 1.0 + 0.8 + 0.0) / 4)
    assert math.isnan(mean_best_overlap({}, PROPOSALS))
