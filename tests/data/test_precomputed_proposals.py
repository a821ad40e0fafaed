from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.io

from data.errors import DatasetError
from data.proposals import read_precomputed_proposals

BOXES_XYXY = {
    "000005": np.array([[1, 2, 30, 40], [5, 6, 70, 80], [9, 9, 9, 9]], dtype=np.float32),
    "000007": np.array([[3, 4, 100, 120]], dtype=np.float32),
}


def write_parquet(path, rows: dict) -> None:
    pq.write_table(pa.Table.from_pydict(rows), path)


def write_voc_mat(path, boxes_by_id: dict) -> None:
    """Like the selective search release: cell `images`, cell `boxes` of [y1 x1 y2 x2]."""
    images = np.empty((len(boxes_by_id), 1), dtype=object)
    cells = np.empty((1, len(boxes_by_id)), dtype=object)
    for i, (image_id, xyxy) in enumerate(boxes_by_id.items()):
        images[i, 0] = image_id
        cells[0, i] = np.asarray(xyxy, dtype=np.float64)[:, [1, 0, 3, 2]]
    scipy.io.savemat(path, {"images": images, "boxes": cells})


def test_parquet_sorted_by_rank(tmp_path):
    path = tmp_path / "props.parquet"
    write_parquet(
        path,
        {
            "image_id": ["000007", "000005", "000005", "000005"],
            "rank": [0, 2, 0, 1],
            "x1": [3, 9, 1, 5],
            "y1": [4, 9, 2, 6],
            "x2": [100, 9, 30, 70],
            "y2": [120, 9, 40, 80],
        },
    )
    got = read_precomputed_proposals(path)
    assert list(got) == ["000007", "000005"]
    for image_id, expected in BOXES_XYXY.items():
        assert got[image_id].dtype == np.float32
        np.testing.assert_array_equal(got[image_id], expected)


def test_parquet_without_rank_keeps_file_order_and_filters(tmp_path):
    path = tmp_path / "props.parquet"
    write_parquet(
        path,
        {
            "image_id": ["a", "b", "a"],
            "x1": [5.0, 1, 1],
            "y1": [1.0] * 3,
            "x2": [9.0] * 3,
            "y2": [9.0] * 3,
        },
    )
    got = read_precomputed_proposals(path, image_ids=["a"])
    assert list(got) == ["a"]
    assert got["a"][:, 0].tolist() == [5.0, 1.0]
    assert read_precomputed_proposals(path, image_ids=[]) == {}


def test_mat_swaps_yxyx_to_xyxy(tmp_path):
    path = tmp_path / "SelectiveSearchVOC2007test.mat"
    write_voc_mat(path, BOXES_XYXY)
    got = read_precomputed_proposals(path, image_ids=["000007", "000005"])
    assert list(got) == ["000007", "000005"]  # requested order
    for image_id, expected in BOXES_XYXY.items():
        np.testing.assert_array_equal(got[image_id], expected)


def test_mat_with_image_without_boxes(tmp_path):
    path = tmp_path / "props.mat"
    write_voc_mat(path, {"a": np.zeros((0, 4)), "b": BOXES_XYXY["000007"]})
    got = read_precomputed_proposals(path)
    assert got["a"].shape == (0, 4)
    np.testing.assert_array_equal(got["b"], BOXES_XYXY["000007"])


def test_missing_file(tmp_path):
    with pytest.raises(DatasetError, match=r"nope\.mat: proposals file not found"):
        read_precomputed_proposals(tmp_path / "nope.mat")


def test_unsupported_extension(tmp_path):
    path = tmp_path / "props.csv"
    path.write_text("image_id,x1\n")
    with pytest.raises(DatasetError, match=r"props\.csv: unsupported .*'\.csv'"):
        read_precomputed_proposals(path)


def test_missing_columns_are_listed(tmp_path):
    path = tmp_path / "props.parquet"
    write_parquet(path, {"image_id": ["a"], "x1": [1.0], "y1": [1.0]})
    with pytest.raises(DatasetError, match=r"props\.parquet: missing column\(s\) \['x2', 'y2'\]"):
        read_precomputed_proposals(path)


def test_missing_mat_variable(tmp_path):
    path = tmp_path / "props.mat"
    scipy.io.savemat(path, {"images": np.array(["a"], dtype=object)})
    with pytest.raises(DatasetError, match=r"props\.mat: missing variable\(s\) \['boxes'\]"):
        read_precomputed_proposals(path)


def test_degenerate_boxes(tmp_path):
    path = tmp_path / "props.mat"
    write_voc_mat(path, {"a": np.array([[10, 1, 5, 9]], dtype=float)})  # x2 < x1
    with pytest.raises(DatasetError, match=r"props\.mat: image 'a': 1 degenerate"):
        read_precomputed_proposals(path)


def test_absent_image_ids_are_named(tmp_path):
    path = tmp_path / "props.mat"
    write_voc_mat(path, BOXES_XYXY)
    with pytest.raises(DatasetError, match=r"props\.mat: 2 requested .*'000001', '000002'"):
        read_precomputed_proposals(path, image_ids=["000005", "000001", "000002"])
    path = tmp_path / "props.parquet"
    write_parquet(path, {"image_id": ["a"], "x1": [1.0], "y1": [1.0], "x2": [2.0], "y2": [2.0]})
    with pytest.raises(DatasetError, match=r"props\.parquet: 1 requested .*'b'"):
        read_precomputed_proposals(path, image_ids=["b"])


def test_mat_images_as_char_matrix(tmp_path):
    path = tmp_path / "props.mat"
    cells = np.empty((1, 2), dtype=object)
    cells[0, 0] = BOXES_XYXY["000005"][:, [1, 0, 3, 2]].astype(float)
    cells[0, 1] = BOXES_XYXY["000007"][:, [1, 0, 3, 2]].astype(float)
    scipy.io.savemat(path, {"images": np.array(["000005", "000007"]), "boxes": cells})
    got = read_precomputed_proposals(path)
    assert list(got) == ["000005", "000007"]
    np.testing.assert_array_equal(got["000005"], BOXES_XYXY["000005"])


# ---- boxes inside their image (sizes from the dataset's images table) ----------------------

SIZES = {"000005": (100, 80), "000007": (100, 120)}  # (width, height) px


def test_boxes_on_the_image_border_are_inside(tmp_path):
    path = tmp_path / "props.mat"
    write_voc_mat(path, {"000005": [[1, 1, 100, 80], [50, 2, 50, 2]], "000007": [[1, 1, 1, 1]]})
    got = read_precomputed_proposals(path, image_ids=["000005", "000007"], image_sizes=SIZES)
    np.testing.assert_array_equal(got["000005"], [[1, 1, 100, 80], [50, 2, 50, 2]])


@pytest.mark.parametrize(
    ("box", "hint"),
    [
        ([0, 5, 30, 40], True),  # 0-based x1
        ([5, 0, 30, 40], True),  # 0-based y1
        ([5, 5, 101, 40], False),  # past the right edge
        ([5, 5, 30, 81], False),  # past the bottom edge
        ([-3.5, 5, 30, 40], False),
    ],
)
def test_box_outside_its_image_names_file_image_and_box(tmp_path, box, hint):
    path = tmp_path / "SelectiveSearchVOC2007test.mat"
    write_voc_mat(path, {"000007": [[3, 4, 100, 120]], "000005": [[1, 2, 30, 40], box, box]})
    with pytest.raises(DatasetError) as info:
        read_precomputed_proposals(path, image_ids=["000005", "000007"], image_sizes=SIZES)
    assert info.value.path == str(path)
    expected = (
        f"image '000005': 2 box(es) outside the 100x80 image, first {[float(v) for v in box]}; "
        "expected VOC 1-based inclusive xyxy with 1 <= x1 <= x2 <= 100 and 1 <= y1 <= y2 <= 80"
    )
    assert info.value.problem == expected + (" (0-based boxes? add 1 to every coordinate)" * hint)


def test_images_without_a_size_are_not_bounds_checked(tmp_path):
    # the published VOC2007 files cover a whole split; a dataset slice knows only its own images
    path = tmp_path / "props.parquet"
    write_parquet(
        path,
        {"image_id": ["000005", "other"], "x1": [1.0, 0.0], "y1": [1.0, 0.0]}
        | {"x2": [9.0, 5000.0], "y2": [9.0, 5000.0]},
    )
    got = read_precomputed_proposals(path, image_sizes=SIZES)
    assert got["other"].tolist() == [[0.0, 0.0, 5000.0, 5000.0]]
    got = read_precomputed_proposals(path, image_ids=["000005"], image_sizes=SIZES)
    assert list(got) == ["000005"]


def test_proposals_step_checks_boxes_against_the_images_table(tmp_path):
    """`extract_proposals` passes the dataset's image sizes: a 0-based file fails in the step,
    naming file, image and box, and nothing is written."""
    from pipelines.rcnn.data import IMAGES_SCHEMA, extract_proposals

    dataset = tmp_path / "dataset"
    dataset.mkdir()
    rows = [
        {"image_id": i, "split": "test", "path": f"{i}.jpg", "width": w, "height": h}
        for i, (w, h) in SIZES.items()
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA), dataset / "images.parquet")
    out = tmp_path / "out"
    out.mkdir()
    ctx = SimpleNamespace(input_dir=lambda name: dataset, input_file=lambda name: None, out_dir=out)
    path = tmp_path / "zero_based.mat"
    write_voc_mat(path, {"000005": [[9, 9, 20, 20], [0, 0, 99, 79]], "000007": [[0, 0, 9, 9]]})
    params = dict(
        method="precomputed",
        mode="",
        base_k=0,
        inc_k=0,
        sigma=0.0,
        min_width_px=20,
        resize_width_px=0,
        max_per_image=1,  # the bad box is past the kept one: still a 0-based file
        precomputed_path=str(path),
        images_per_task=4,
    )
    with pytest.raises(
        DatasetError,
        match=r"zero_based\.mat: image '000005': 1 box\(es\) outside the 100x80 image, "
        r"first \[0\.0, 0\.0, 99\.0, 79\.0\]; .* \(0-based boxes\? add 1 to every coordinate\)",
    ):
        extract_proposals(ctx, **params)
    assert list(out.iterdir()) == []

    write_voc_mat(path, {"000005": [[9, 9, 20, 20], [1, 1, 100, 80]], "000007": [[1, 1, 9, 9]]})
    extract_proposals(ctx, **params)
    table = pq.read_table(out / "proposals.parquet")
    assert table.column("image_id").to_pylist() == ["000005", "000007"]
    assert table.column("x2").to_pylist() == [20.0, 9.0]
