import numpy as np
import pytest

from stages.detection.boxes import box_iou_voc
from stages.detection.nms import greedy_nms_reference, nms_per_class, top_k_per_class


def random_problem(rng: np.random.Generator, n: int, num_labels: int, tie_levels: int = 0):
    x1, y1 = rng.integers(1, 120, n), rng.integers(1, 120, n)
    boxes = np.stack([x1, y1, x1 + rng.integers(0, 60, n), y1 + rng.integers(0, 60, n)], 1)
    scores = rng.integers(0, tie_levels, n) / 7 if tie_levels else rng.normal(size=n)
    return boxes.astype(float), scores, rng.integers(0, num_labels, n)


def reference_per_class(boxes, scores, labels, iou_threshold):
    kept = []
    for label in np.unique(labels):
        index = np.flatnonzero(labels == label)
        kept.extend(index[greedy_nms_reference(boxes[index], scores[index], iou_threshold)])
    kept = np.array(kept, dtype=np.int64)
    return kept[np.lexsort((-kept, -scores[kept]))]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("tie_levels", [0, 5])  # 5 score levels: many exact ties
def test_matches_reference_per_class(seed, tie_levels):
    rng = np.random.default_rng(seed)
    boxes, scores, labels = random_problem(rng, 300, 4, tie_levels)
    for thr in (0.3, 0.5):
        got = nms_per_class(boxes, scores, labels, thr)
        want = reference_per_class(boxes, scores, labels, thr)
        np.testing.assert_array_equal(got, want)
        assert 10 < len(got) < 300  # the comparison exercises real suppression


def test_matches_reference_above_torchvision_vanilla_cutoff():
    # More than 4000 coordinates: torchvision loops over classes instead of offsetting boxes.
    rng = np.random.default_rng(7)
    boxes, scores, labels = random_problem(rng, 1500, 3, tie_levels=9)
    np.testing.assert_array_equal(
        nms_per_class(boxes, scores, labels), reference_per_class(boxes, scores, labels, 0.3)
    )


def test_iou_exactly_threshold_is_kept():
    # Inclusive pixels: (1,1,10,10) has 100 px; (1,1,10,3) has 30 px, all inside -> IoU 30/100.
    # Continuous coordinates would give 9*2/81 = 0.222 for the same numbers, so this checks the +1.
    boxes = np.array([[1, 1, 10, 10], [1, 1, 10, 3], [1, 1, 10, 4]], dtype=float)
    assert box_iou_voc(boxes[:1], boxes[1:2])[0, 0] == 0.3
    assert box_iou_voc(boxes[:1], boxes[2:3])[0, 0] == pytest.approx(0.4)
    scores = np.array([0.9, 0.8, 0.7])
    labels = np.zeros(3, dtype=np.int64)
    np.testing.assert_array_equal(nms_per_class(boxes, scores, labels, 0.3), [0, 1])
    np.testing.assert_array_equal(greedy_nms_reference(boxes, scores, 0.3), [0, 1])
    # Just below the pair's IoU it goes.
    np.testing.assert_array_equal(nms_per_class(boxes, scores, labels, 0.2999), [0])


def test_inclusive_vs_continuous_iou_decides():
    # (1,1,2,2) vs (2,1,3,2) share pixel column 2: inclusive IoU 2/6 = 0.333 -> suppressed.
    # Fed raw to torchvision (continuous, no +1) they would only touch: IoU 0, both kept.
    boxes = np.array([[1, 1, 2, 2], [2, 1, 3, 2]], dtype=float)
    np.testing.assert_array_equal(nms_per_class(boxes, np.array([1.0, 0.5]), np.zeros(2, int)), [0])


def test_labels_never_suppress_each_other():
    boxes = np.array([[1, 1, 10, 10]] * 4, dtype=float)
    scores = np.array([0.1, 0.9, 0.5, 0.7])
    labels = np.array([0, 1, 2, 1])
    np.testing.assert_array_equal(nms_per_class(boxes, scores, labels), [1, 2, 0])


def test_ties_are_deterministic_like_nms_m():
    # Identical boxes and scores: nms.m takes the last index of its stable ascending sort.
    boxes = np.array([[1, 1, 10, 10]] * 3 + [[50, 50, 60, 60]] * 2, dtype=float)
    scores = np.array([0.5, 0.5, 0.5, 0.5, 0.5])
    labels = np.zeros(5, dtype=np.int64)
    np.testing.assert_array_equal(nms_per_class(boxes, scores, labels), [4, 2])
    np.testing.assert_array_equal(greedy_nms_reference(boxes, scores), [4, 2])
    for _ in range(3):  # same answer every call
        np.testing.assert_array_equal(nms_per_class(boxes, scores, labels), [4, 2])


def test_empty_and_bad_inputs():
    assert nms_per_class(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int)).shape == (0,)
    with pytest.raises(ValueError, match="labels"):
        nms_per_class(np.zeros((2, 4)), np.zeros(2), np.zeros(2))  # float labels
    with pytest.raises(ValueError, match="NaN"):
        nms_per_class(np.zeros((2, 4)), np.array([0.0, np.nan]), np.zeros(2, int))


def test_top_k_per_class_hand_worked():
    scores = np.array([0.1, 0.9, 0.5, 0.5, 0.7, 0.3, 0.5])
    labels = np.array([0, 0, 0, 0, 1, 1, 0])
    # Label 0 by score: 1 (0.9), then the 0.5 ties 2, 3, 6 in index order, then 0.
    # k = 2 keeps 1, 2 of label 0 and 4, 5 of label 1; output by score, ties by index.
    np.testing.assert_array_equal(top_k_per_class(scores, labels, k=2), [1, 4, 2, 5])
    np.testing.assert_array_equal(top_k_per_class(scores, labels, k=3), [1, 4, 2, 3, 5])
    assert len(top_k_per_class(scores, labels, k=100)) == 7
    assert top_k_per_class(scores, labels, k=0).shape == (0,)


def test_top_k_per_class_matches_naive():
    rng = np.random.default_rng(5)
    scores, labels = rng.integers(0, 20, 500) / 3, rng.integers(0, 6, 500)
    want = []
    for label in np.unique(labels):
        index = np.flatnonzero(labels == label)
        want.extend(index[np.argsort(-scores[index], kind="stable")[:30]])
    got = top_k_per_class(scores, labels, k=30)
    np.testing.assert_array_equal(np.sort(got), np.sort(want))
    assert np.all(np.diff(scores[got]) <= 0)
