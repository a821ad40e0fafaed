"""The R-CNN dataset step refuses empty and overlapping splits before writing anything."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from cluster.resources import Resources
from data.errors import DatasetError
from data.voc import VOCObject, write_annotation
from pipelines import runner
from pipelines.engine import StepContext, StepFailed
from pipelines.rcnn.data import make_dataset

W, H = 40, 30
IDS = ("000001", "000002", "000003", "000004")


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    root = tmp_path / "VOC2007"
    rng = np.random.default_rng(0)
    (root / "JPEGImages").mkdir(parents=True)
    for image_id in IDS:
        dog = VOCObject("dog", (2.0, 3.0, 20.0, 25.0), difficult=False, truncated=False)
        write_annotation(root / "Annotations" / f"{image_id}.xml", image_id, W, H, [dog])
        image = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
        assert cv2.imwrite(str(root / "JPEGImages" / f"{image_id}.jpg"), image)
    main = root / "ImageSets" / "Main"
    main.mkdir(parents=True)
    (main / "trainval.txt").write_text("000001\n000002\n000003\n")
    (main / "val.txt").write_text("000003\n")  # part of trainval, as in VOC2007
    (main / "test.txt").write_text("000004\n")
    return root


def run_dataset(tmp_path: Path, root: Path, **params) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    ctx = StepContext("rcnn", "dataset", "k", {}, out, Resources(), work_uri="")
    kwargs = dict(
        source="voc",
        root=str(root),
        train_split="trainval",
        test_split="test",
        max_images=0,
        download=False,
        num_train=0,
        num_test=0,
        width_px=0,
        height_px=0,
        max_objects=0,
        seed=0,
    )
    make_dataset(ctx, **{**kwargs, **params})
    return out


def test_disjoint_splits_make_the_index_tables(tmp_path, voc_root):
    out = run_dataset(tmp_path, voc_root)
    images = pq.read_table(out / "images.parquet").to_pydict()
    assert images["image_id"] == ["000001", "000002", "000003", "000004"]
    assert images["split"] == ["trainval"] * 3 + ["test"]


def test_empty_test_split_is_refused_before_writing(tmp_path, voc_root):
    (voc_root / "ImageSets" / "Main" / "test.txt").write_text("\n")
    with pytest.raises(DatasetError, match=r"Main/test\.txt: test split 'test' lists no image ids"):
        run_dataset(tmp_path, voc_root)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("max_images", [0, 1])
def test_empty_train_split_is_refused_whatever_the_limit(tmp_path, voc_root, max_images):
    (voc_root / "ImageSets" / "Main" / "train.txt").write_text("")
    with pytest.raises(DatasetError, match=r"Main/train\.txt: train split 'train' lists no image"):
        run_dataset(tmp_path, voc_root, train_split="train", max_images=max_images)
    assert list((tmp_path / "out").iterdir()) == []


def test_overlap_is_refused_even_when_the_limited_slices_are_disjoint(tmp_path, voc_root):
    # max_images=1 keeps 000001 of trainval and 000003 of val: disjoint slices, but the config
    # trains on val's images once the limit is lifted, so it is refused up front.
    with pytest.raises(
        DatasetError,
        match=r"Main/val\.txt: test split 'val' shares 1 of its 1 image id\(s\) with train split "
        r"'trainval' \(.*trainval\.txt\), e.g. \['000003'\]",
    ):
        run_dataset(tmp_path, voc_root, test_split="val", max_images=1)
    assert list((tmp_path / "out").iterdir()) == []


def test_a_refused_split_publishes_nothing_a_rerun_would_trust(tmp_path, voc_root):
    def run():
        return runner.run(
            "rcnn",
            "ci",
            {"data.source": "voc", "data.root": str(voc_root)},
            store=str(tmp_path / "store"),
            runs=tmp_path / "runs",
            executor="local",
            until="dataset",
            progress=False,
            log=lambda _: None,
        )

    test_txt = voc_root / "ImageSets" / "Main" / "test.txt"
    test_txt.write_text("000002\n000004\n")  # 000002 is also in trainval
    with pytest.raises(StepFailed) as info:
        run()
    assert isinstance(info.value.error, DatasetError)
    assert info.value.error.path == str(test_txt)
    test_txt.write_text("000004\n")  # same config, same step key: must recompute, not reuse
    result = run()
    assert result.computed() == ["dataset"]
    images = pq.read_table(result.artifacts["dataset"].local_dir() / "images.parquet")
    assert images.column("split").to_pylist() == ["trainval"] * 3 + ["test"]
