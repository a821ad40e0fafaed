import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from stages.detection.boxes import (
    box_area_voc,
    box_iou_voc,
    clip_boxes_voc,
    dedupe_boxes,
    max_iou_assign,
    to_voc_from_xywh0,
)


def random_voc_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    x1 = rng.integers(1, 80, n)
    y1 = rng.integers(1, 80, n)
    return np.stack([x1, y1, x1 + rng.integers(0, 40, n), y1 + rng.integers(0, 40, n)], 1)


def test_area_counts_inclusive_pixels():
    boxes = np.array([[1, 1, 10, 10], [5, 5, 5, 5], [1, 1, 10, 5]], dtype=float)
    np.testing.assert_array_equal(box_area_voc(boxes), [100, 1, 50])


def test_iou_matches_torchvision_on_continuous_coords():
    rng = np.random.default_rng(0)
    a, b = random_voc_boxes(rng, 60).astype(float), random_voc_boxes(rng, 45).astype(float)
    shift = np.array([1.0, 1.0, 0.0, 0.0])  # VOC (x1, y1, x2, y2) -> continuous edges
    expected = box_iou(torch.from_numpy(a - shift), torch.from_numpy(b - shift)).numpy()
    got = box_iou_voc(a, b)
    assert got.shape == (60, 45)
    assert (expected > 0).sum() > 50  # the comparison exercises real overlaps
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_iou_hand_worked_cases():
    box = np.array([[1, 1, 10, 10]], dtype=float)
    left_half = np.array([[1, 1, 5, 10]], dtype=float)
    # Rows 10..19 share pixel row 10 with `box`: 10 px in common, union 190.
    touching = np.array([[1, 10, 10, 19]], dtype=float)
    disjoint = np.array([[11, 1, 20, 10]], dtype=float)  # starts one column after x2 = 10
    assert box_iou_voc(box, box)[0, 0] == 1.0
    assert box_iou_voc(box, left_half)[0, 0] == 0.5
    assert box_iou_voc(box, touching)[0, 0] == pytest.approx(10 / 190)
    assert box_iou_voc(box, disjoint)[0, 0] == 0.0


def test_iou_with_empty_inputs():
    box = np.array([[1, 1, 10, 10]], dtype=float)
    assert box_iou_voc(box, np.zeros((0, 4))).shape == (1, 0)
    assert box_iou_voc(np.zeros((0, 4)), box).shape == (0, 1)


def test_iou_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        box_iou_voc(np.zeros((3, 5)), np.zeros((1, 4)))


def test_dedupe_keeps_first_occurrence_in_order():
    boxes = np.array([[5, 5, 9, 9], [1, 1, 4, 4], [5, 5, 9, 9], [2, 2, 3, 3], [1, 1, 4, 4]], float)
    np.testing.assert_array_equal(dedupe_boxes(boxes), [0, 1, 3])
    assert dedupe_boxes(np.zeros((0, 4))).shape == (0,)


def test_xywh0_to_voc():
    # OpenCV rect at 0-based column 0, 10 px wide -> VOC x1 = 1, x2 = 10.
    rects = np.array([[0, 0, 10, 10], [3, 7, 1, 2]])
    np.testing.assert_array_equal(to_voc_from_xywh0(rects), [[1, 1, 10, 10], [4, 8, 4, 9]])
    assert box_area_voc(to_voc_from_xywh0(rects)).tolist() == [100, 2]


def test_clip_to_image():
    boxes = np.array([[-3, 0, 250, 90], [5, 6, 7, 8]], dtype=float)
    np.testing.assert_array_equal(
        clip_boxes_voc(boxes, width=200, height=80), [[1, 1, 200, 80], [5, 6, 7, 8]]
    )


def test_max_iou_assign():
    gt = np.array([[1, 1, 10, 10], [21, 1, 30, 10]], dtype=float)
    boxes = np.array([[1, 1, 5, 10], [21, 1, 30, 10], [50, 50, 60, 60]], dtype=float)
    iou, idx = max_iou_assign(boxes, gt)
    np.testing.assert_allclose(iou, [0.5, 1.0, 0.0])
    np.testing.assert_array_equal(idx[:2], [0, 1])
    iou, idx = max_iou_assign(boxes, np.zeros((0, 4)))
    np.testing.assert_array_equal(iou, [0, 0, 0])
    np.testing.assert_array_equal(idx, [-1, -1, -1])
