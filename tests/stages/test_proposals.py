import os
import subprocess
import sys

import cv2
import numpy as np
import pyarrow as pa
import pytest

from stages.detection.boxes import box_iou_voc, dedupe_boxes
from stages.detection.proposals import (
    PROPOSALS_SCHEMA,
    _map_to_original,
    boxes_by_image,
    proposals_table,
    selective_search,
    selective_search_isolated,
)

# Three solid rectangles on a mid-grey textured background, 200 x 150. VOC xyxy 1-based.
RECTS_VOC = np.array([[11, 21, 70, 80], [101, 31, 180, 70], [61, 96, 150, 140]], dtype=float)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.integers(90, 140, (150, 200, 3), dtype=np.uint8), (0, 0), 1.0)
    colours = [(0, 0, 220), (0, 200, 0), (220, 0, 0)]
    for (x1, y1, x2, y2), colour in zip(RECTS_VOC.astype(int), colours, strict=True):
        cv2.rectangle(img, (x1 - 1, y1 - 1), (x2 - 1, y2 - 1), colour, thickness=-1)  # 0-based
    return img


# Tests that compare rankings search in the single-threaded helper, as the pipeline does: OpenCV
# ranks regions with C rand(), and in this process other threads (OpenCV's own, those Ray tests
# left behind) can draw from it mid-search (a CI run once got a different top 7 here).
@pytest.fixture(scope="module")
def fast_boxes(image) -> np.ndarray:
    return selective_search_isolated(image)


def assert_valid_proposals(boxes: np.ndarray, width: int = 200, height: int = 150) -> None:
    assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert len(boxes) > 20
    assert (boxes[:, 0] >= 1).all() and (boxes[:, 1] >= 1).all()
    assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    assert len(dedupe_boxes(boxes)) == len(boxes)


def test_fast_mode_boxes_are_valid_and_find_every_rectangle(fast_boxes):
    assert_valid_proposals(fast_boxes)
    assert (fast_boxes[:, 2] - fast_boxes[:, 0] + 1 >= 20).all()
    assert (fast_boxes[:, 3] - fast_boxes[:, 1] + 1 >= 20).all()
    assert (box_iou_voc(RECTS_VOC, fast_boxes).max(axis=1) >= 0.7).all()


def test_same_image_gives_identical_ranked_boxes(image, fast_boxes):
    np.testing.assert_array_equal(selective_search_isolated(image), fast_boxes)


def test_rcnn_mode_finds_every_rectangle(image):
    boxes = selective_search_isolated(image, mode="rcnn")
    assert_valid_proposals(boxes)
    assert (box_iou_voc(RECTS_VOC, boxes).max(axis=1) >= 0.7).all()
    np.testing.assert_array_equal(selective_search_isolated(image, mode="rcnn"), boxes)


def test_min_width_and_max_boxes(image, fast_boxes):
    big = selective_search(image, min_width_px=50)
    assert (big[:, 2] - big[:, 0] + 1 >= 50).all() and (big[:, 3] - big[:, 1] + 1 >= 50).all()
    assert 0 < len(big) < len(fast_boxes)
    np.testing.assert_array_equal(selective_search_isolated(image, max_boxes=7), fast_boxes[:7])


@pytest.mark.parametrize("resize_width", [100, 320])
def test_resize_maps_boxes_back_to_original(image, resize_width):
    boxes = selective_search(image, mode="single", resize_width=resize_width)
    assert_valid_proposals(boxes)
    assert (box_iou_voc(RECTS_VOC, boxes).max(axis=1) >= 0.7).all()
    assert (boxes == np.round(boxes)).all()  # snapped to whole original pixels


def test_map_to_original_rounds_half_away_from_zero():
    # Scale 2.5 in x: x1 = 2 has left edge 1 -> 2.5 -> 3 (Python's round gives 2) -> x1 = 4;
    # x2 = 100 -> 250. Scale 1.5 in y: y2 = 3 -> 4.5 -> 5 (round gives 4).
    boxes = np.array([[2.0, 1.0, 100.0, 3.0]])
    np.testing.assert_array_equal(_map_to_original(boxes, 2.5, 1.5), [[4, 1, 250, 5]])


def test_unknown_mode_lists_valid_modes(image):
    with pytest.raises(ValueError, match="fast.*quality.*single.*rcnn"):
        selective_search(image, mode="slow")


def test_rejects_non_bgr_image():
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        selective_search(np.zeros((10, 10), dtype=np.uint8))


def test_table_round_trip():
    a = np.array([[1, 2, 30, 40], [5, 6, 70, 80]], dtype=np.float32)
    b = np.array([[3, 3, 9, 9]], dtype=np.float32)
    table = proposals_table(["img_b", "img_a", "empty"], [a, b, np.zeros((0, 4))])
    assert table.schema == PROPOSALS_SCHEMA
    assert table.column("rank").to_pylist() == [0, 1, 0]
    back = boxes_by_image(table)
    assert list(back) == ["img_b", "img_a"]  # images without proposals have no rows
    np.testing.assert_array_equal(back["img_b"], a)
    np.testing.assert_array_equal(back["img_a"], b)


def test_boxes_by_image_sorts_by_rank():
    table = pa.Table.from_pydict(
        {
            "image_id": ["x", "y", "x", "x"],
            "rank": [2, 0, 0, 1],
            "x1": [3.0, 9.0, 1.0, 2.0],
            "y1": [1.0] * 4,
            "x2": [30.0] * 4,
            "y2": [30.0] * 4,
        },
        schema=PROPOSALS_SCHEMA,
    )
    back = boxes_by_image(table)
    assert back["x"][:, 0].tolist() == [1.0, 2.0, 3.0]
    assert back["y"].shape == (1, 4) and back["y"].dtype == np.float32


def test_table_length_mismatch():
    with pytest.raises(ValueError, match="2 image ids but 1"):
        proposals_table(["a", "b"], [np.zeros((1, 4))])


def test_isolated_search_matches_in_process_search(image, tmp_path):
    # The in-process arm runs in a fresh interpreter on one OpenCV thread, as the helper does: in
    # this process other threads may draw from C rand() mid-search (see the fixture above).
    np.save(tmp_path / "image.npy", image)
    code = (
        "import sys, cv2, numpy as np\n"
        "from stages.detection.proposals import selective_search\n"
        "cv2.setNumThreads(1)\n"
        "np.save(sys.argv[2], selective_search(np.load(sys.argv[1]), mode='rcnn'))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "image.npy"), str(tmp_path / "direct.npy")],
        check=True,
        env=env,
    )
    direct = np.load(tmp_path / "direct.npy")
    isolated = selective_search_isolated(image, mode="rcnn")
    np.testing.assert_array_equal(direct, isolated)
    np.testing.assert_array_equal(isolated, selective_search_isolated(image, mode="rcnn"))
