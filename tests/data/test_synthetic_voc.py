"""Synthetic VOC generator: deterministic bytes, and annotations that agree with the masks."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from data.synthetic_voc import SHAPE_CLASSES, generate_voc
from data.voc import read_split_ids, read_voc

W, H = 320, 240


def all_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("small")
    return root, generate_voc(root, num_train=12, num_test=6, seed=0)


@pytest.fixture(scope="module")
def forty(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("forty")
    return root, generate_voc(root, num_train=32, num_test=8, seed=0)


def test_same_arguments_same_bytes(small, tmp_path: Path):
    root, summary = small
    again = generate_voc(tmp_path, num_train=12, num_test=6, seed=0)
    assert {k: v for k, v in again.items() if k != "root"} == {
        k: v for k, v in summary.items() if k != "root"
    }
    first, second = all_files(root), all_files(tmp_path)
    assert len(first) == 18 * 4 + 4 + 4 * 4  # jpg, xml, 2 png per image; 4 + 16 split files
    assert first == second


def test_image_depends_on_seed_and_id_only(small, forty, tmp_path: Path):
    for name in ("JPEGImages/000005.jpg", "Annotations/000012.xml"):
        assert (small[0] / name).read_bytes() == (forty[0] / name).read_bytes()
    generate_voc(tmp_path, num_train=1, num_test=0, seed=1)
    other = (tmp_path / "JPEGImages/000001.jpg").read_bytes()
    assert other != (small[0] / "JPEGImages/000001.jpg").read_bytes()


def test_splits(small):
    root, summary = small
    ids = {split: read_split_ids(root, split) for split in ("train", "val", "trainval", "test")}
    assert ids["trainval"] == [f"{i:06d}" for i in range(1, 13)]
    assert ids["test"] == [f"{i:06d}" for i in range(13, 19)]
    assert len(ids["val"]) == 2  # round(0.2 * 12)
    assert sorted(ids["train"] + ids["val"]) == ids["trainval"]
    assert not set(ids["train"]) & set(ids["val"])
    assert summary["images"] == {"train": 10, "val": 2, "trainval": 12, "test": 6}


def test_read_back_counts_match_summary(small):
    root, summary = small
    for split, count in (("trainval", 12), ("test", 6)):
        images = read_voc(root, split, classes=SHAPE_CLASSES)
        assert len(images) == count == summary["images"][split]
        per_class = {
            c: sum(o.name == c for im in images for o in im.objects) for c in SHAPE_CLASSES
        }
        assert per_class == summary["objects"][split]
        difficult = sum(o.difficult for im in images for o in im.objects)
        assert difficult == summary["difficult"][split]
        assert all(1 <= len(im.objects) <= 4 for im in images)
        assert all((im.width, im.height) == (W, H) for im in images)


def test_boxes_are_visible_mask_extents(forty):
    root, _ = forty
    images = read_voc(root, "trainval", SHAPE_CLASSES) + read_voc(root, "test", SHAPE_CLASSES)
    for image in images:
        instance = cv2.imread(str(root / "SegmentationObject" / f"{image.image_id}.png"), -1)
        category = cv2.imread(str(root / "SegmentationClass" / f"{image.image_id}.png"), -1)
        assert instance.shape == category.shape == (H, W) and instance.dtype == np.uint8
        assert set(np.unique(instance)) <= set(range(len(image.objects) + 1))  # no 255 anywhere
        np.testing.assert_array_equal(category == 0, instance == 0)
        assert cv2.imread(image.image_path).shape == (H, W, 3)
        for k, obj in enumerate(image.objects, start=1):
            rows, cols = np.nonzero(instance == k)
            assert len(rows) >= 30
            x1, y1, x2, y2 = obj.box_xyxy
            assert 1 <= x1 <= x2 <= W and 1 <= y1 <= y2 <= H
            assert (x1, y1, x2, y2) == (
                cols.min() + 1,
                rows.min() + 1,
                cols.max() + 1,
                rows.max() + 1,
            )
            assert np.all(category[rows, cols] == 1 + SHAPE_CLASSES.index(obj.name))
            assert obj.truncated == (x1 == 1 or y1 == 1 or x2 == W or y2 == H)
            if min(x2 - x1 + 1, y2 - y1 + 1) < 16:
                assert obj.difficult


def test_objects_are_drawn_where_the_masks_say(small):
    root, _ = small
    # Shapes carry saturated colour: inside the masks, pixels are far more saturated on average
    # than in the photo background (the sample photos are mostly muted).
    saturation_inside, saturation_outside = [], []
    for image_id in read_split_ids(root, "trainval"):
        hsv = cv2.cvtColor(
            cv2.imread(str(root / "JPEGImages" / f"{image_id}.jpg")), cv2.COLOR_BGR2HSV
        )
        instance = cv2.imread(str(root / "SegmentationObject" / f"{image_id}.png"), -1)
        saturation_inside.append(hsv[..., 1][instance > 0].mean())
        saturation_outside.append(hsv[..., 1][instance == 0].mean())
    assert np.mean(saturation_inside) > np.mean(saturation_outside) + 40


def test_forty_images_have_every_class_and_hard_cases(forty):
    root, summary = forty
    assert all(
        summary["objects"]["trainval"][c] + summary["objects"]["test"][c] > 0 for c in SHAPE_CLASSES
    )
    assert summary["difficult"]["trainval"] + summary["difficult"]["test"] >= 1
    assert summary["truncated"]["trainval"] + summary["truncated"]["test"] >= 1
    assert summary["occluded"]["trainval"] + summary["occluded"]["test"] >= 1
    # Occlusion visible in the files: a later object's pixels inside an earlier object's box.
    overlaps = 0
    for image in read_voc(root, "trainval", SHAPE_CLASSES):
        instance = cv2.imread(str(root / "SegmentationObject" / f"{image.image_id}.png"), -1)
        for j, obj in enumerate(image.objects, start=1):
            x1, y1, x2, y2 = (int(v) for v in obj.box_xyxy)
            inside = instance[y1 - 1 : y2, x1 - 1 : x2]
            overlaps += int(np.any(inside > j))
    assert overlaps >= 1


@pytest.mark.parametrize("split", ["train", "val", "trainval", "test"])
def test_per_class_split_files_match_annotations(small, split: str):
    root, _ = small
    images = {im.image_id: im for im in read_voc(root, split, SHAPE_CLASSES)}
    for name in SHAPE_CLASSES:
        lines = (root / "ImageSets" / "Main" / f"{name}_{split}.txt").read_text().splitlines()
        flags = {line.split()[0]: int(line.split()[1]) for line in lines}
        assert list(flags) == list(images)
        for image_id, flag in flags.items():
            mine = [o for o in images[image_id].objects if o.name == name]
            expected = -1 if not mine else 0 if all(o.difficult for o in mine) else 1
            assert flag == expected
        assert all(len(line) == 9 for line in lines)  # devkit "%s %2d": "000001 -1", "000002  1"


def test_class_subset_and_bad_arguments(tmp_path: Path):
    summary = generate_voc(tmp_path, num_train=3, num_test=0, classes=("star",), max_objects=2)
    images = read_voc(tmp_path, "trainval", classes=("star",))
    assert {o.name for im in images for o in im.objects} == {"star"}
    assert sum(len(im.objects) for im in images) == summary["objects"]["trainval"]["star"]
    with pytest.raises(ValueError, match="classes must be distinct names"):
        generate_voc(tmp_path, num_train=1, num_test=0, classes=("hexagon",))
    with pytest.raises(ValueError, match="too small"):
        generate_voc(tmp_path, num_train=1, num_test=0, image_size=(32, 32))
