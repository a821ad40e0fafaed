"""PASCAL VOC reader: a tiny hand-written VOC directory read back exactly, and every error case."""

import os
import re
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest

from data.errors import DatasetError
from data.voc import (
    OBJECTS_SCHEMA,
    VOC_CLASSES,
    VOCImage,
    VOCObject,
    load_image,
    objects_table,
    read_annotation,
    read_split_ids,
    read_train_test_ids,
    read_voc,
    write_annotation,
)

W, H = 40, 30
OBJECTS = {
    "000001": (
        VOCObject("dog", (1.0, 2.0, 40.0, 30.0), difficult=True, truncated=False),
        VOCObject("person", (5.5, 6.0, 7.0, 6.0), difficult=False, truncated=True),
    ),
    "000002": (),  # an image with no objects is valid
    "000003": (VOCObject("tvmonitor", (3.0, 4.0, 3.0, 4.0), difficult=False, truncated=False),),
}


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for image_id, objects in OBJECTS.items():
        write_annotation(tmp_path / "Annotations" / f"{image_id}.xml", image_id, W, H, objects)
        (tmp_path / "JPEGImages").mkdir(exist_ok=True)
        image = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
        assert cv2.imwrite(str(tmp_path / "JPEGImages" / f"{image_id}.jpg"), image)
    main = tmp_path / "ImageSets" / "Main"
    main.mkdir(parents=True)
    (main / "trainval.txt").write_text("000001\n\n  000002 \n000003\n")
    (main / "dog_trainval.txt").write_text("000001  1\n000002 -1\n000003 -1\n")
    return tmp_path


def test_read_voc_round_trip(voc_root: Path):
    images = read_voc(voc_root, "trainval")
    assert [im.image_id for im in images] == ["000001", "000002", "000003"]
    for image in images:
        assert image == VOCImage(
            image_id=image.image_id,
            image_path=str(voc_root / "JPEGImages" / f"{image.image_id}.jpg"),
            width=W,
            height=H,
            objects=OBJECTS[image.image_id],
        )
        assert os.path.isabs(image.image_path)
    assert images[0].objects[1].box_xyxy == (5.5, 6.0, 7.0, 6.0)


def test_read_split_ids_strips_blank_lines(voc_root: Path):
    assert read_split_ids(voc_root, "trainval") == ["000001", "000002", "000003"]


def test_objects_table(voc_root: Path):
    table = objects_table(read_voc(voc_root, "trainval"))
    assert table.schema == OBJECTS_SCHEMA
    assert table.schema.field("x1").type == pa.float32()
    assert table.to_pydict() == {
        "image_id": ["000001", "000001", "000003"],
        "class": ["dog", "person", "tvmonitor"],
        "x1": [1.0, 5.5, 3.0],
        "y1": [2.0, 6.0, 4.0],
        "x2": [40.0, 7.0, 3.0],
        "y2": [30.0, 6.0, 4.0],
        "difficult": [True, False, False],
        "truncated": [False, True, False],
    }
    assert objects_table([]).num_rows == 0


def test_load_image_is_bgr(tmp_path: Path):
    image = np.zeros((3, 5, 3), dtype=np.uint8)
    image[..., 2] = 200  # red in BGR
    cv2.imwrite(str(tmp_path / "red.png"), image)
    loaded = load_image(tmp_path / "red.png")
    assert loaded.shape == (3, 5, 3) and loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded, image)


def test_load_image_checks_the_annotation_size(tmp_path: Path):
    path = tmp_path / "im.png"
    cv2.imwrite(str(path), np.zeros((3, 5, 3), dtype=np.uint8))
    assert load_image(path, (5, 3)).shape == (3, 5, 3)  # (width, height)
    with pytest.raises(DatasetError, match=r"im\.png: image is 5x3 px but its annotation's <size> "
                       r"says 3x5"):  # fmt: skip
        load_image(path, (3, 5))


def test_voc_classes_devkit_order():
    assert len(VOC_CLASSES) == 20
    assert VOC_CLASSES[0] == "aeroplane" and VOC_CLASSES[14] == "person"
    assert VOC_CLASSES[-1] == "tvmonitor"


# ---- directory-level errors ----------------------------------------------------------------


def test_missing_root(tmp_path: Path):
    with pytest.raises(DatasetError, match=r"nowhere: .*Annotations/, JPEGImages/"):
        read_voc(tmp_path / "nowhere", "trainval")


def test_missing_split_lists_present_splits(voc_root: Path):
    with pytest.raises(DatasetError, match=r"Main/test\.txt: .*splits present: trainval\)$"):
        read_voc(voc_root, "test")


@pytest.mark.parametrize("bad_id", ["../secret", "a/b", "/etc/passwd", "a\\b", ".."])
def test_split_id_escaping_root(voc_root: Path, bad_id: str):
    (voc_root / "ImageSets" / "Main" / "trainval.txt").write_text(f"000001\n{bad_id}\n")
    with pytest.raises(DatasetError, match=r"trainval\.txt:2: image id .*not a plain file name"):
        read_split_ids(voc_root, "trainval")


def test_split_name_escaping_root(voc_root: Path):
    with pytest.raises(DatasetError, match="split '../x' is not a plain file name"):
        read_split_ids(voc_root, "../x")


def test_duplicate_split_id(voc_root: Path):
    (voc_root / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n000003\n000001\n")
    with pytest.raises(DatasetError, match=r"trainval\.txt:3: duplicate .*'000001'.*line 1"):
        read_split_ids(voc_root, "trainval")


def test_two_tokens_on_a_split_line(voc_root: Path):
    with pytest.raises(DatasetError, match=r"dog_trainval\.txt:1: expected one image id per line"):
        read_split_ids(voc_root, "dog_trainval")


def test_missing_annotation(voc_root: Path):
    (voc_root / "Annotations" / "000002.xml").unlink()
    with pytest.raises(DatasetError, match=r"000002\.xml: annotation missing .*trainval\.txt"):
        read_voc(voc_root, "trainval")


def test_missing_image_only_with_check_images(voc_root: Path):
    (voc_root / "JPEGImages" / "000003.jpg").unlink()
    with pytest.raises(DatasetError, match=r"000003\.jpg: image missing"):
        read_voc(voc_root, "trainval")
    assert len(read_voc(voc_root, "trainval", check_images=False)) == 3


def test_filename_disagrees_with_split_id(voc_root: Path):
    write_annotation(voc_root / "Annotations" / "000002.xml", "000009", W, H, [])
    with pytest.raises(DatasetError, match=r"000002\.xml: <filename> names image '000009'"):
        read_voc(voc_root, "trainval")


# ---- annotation errors -------------------------------------------------------------------


def annotation(objects_xml: str = "", size_xml: str = "<width>40</width><height>30</height>"):
    return (
        f"<annotation><filename>img.jpg</filename><size>{size_xml}<depth>3</depth></size>"
        f"{objects_xml}</annotation>"
    )


def box_object(xmin="1", ymin="1", xmax="10", ymax="10", name="dog", extra=""):
    return (
        f"<object><name>{name}</name>{extra}<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
        f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
    )


def test_annotation_defaults_and_id(tmp_path: Path):
    path = tmp_path / "Annotations" / "other.xml"
    path.parent.mkdir()
    path.write_text(annotation(box_object("2", "3", "4.5", "5")))
    image = read_annotation(path)
    assert image.image_id == "img"  # from <filename>, not the XML stem
    assert image.image_path == str(tmp_path / "JPEGImages" / "img.jpg")
    assert image.objects == (VOCObject("dog", (2.0, 3.0, 4.5, 5.0), False, False),)
    path.write_text("<annotation><size><width>4</width><height>3</height></size></annotation>")
    assert read_annotation(path).image_id == "other"  # no <filename>: the XML stem


BAD_ANNOTATIONS = {
    "malformed": (annotation(box_object())[:-5], r"malformed XML"),
    "wrong root": ("<voc><size/></voc>", r"root element is <voc>"),
    "missing size": ("<annotation></annotation>", r"missing <size>"),
    "zero width": (annotation(size_xml="<width>0</width><height>3</height>"), r"<width> = '0'"),
    "float height": (annotation(size_xml="<width>4</width><height>3.5</height>"), r"<height>"),
    "missing name": (annotation("<object><bndbox/></object>"), r"object\[0\]: missing <name>"),
    "missing bndbox": (
        annotation("<object><name>dog</name></object>"),
        r"object\[0\] \(dog\): missing <bndbox>",
    ),
    "missing ymax": (
        annotation(box_object().replace("<ymax>10</ymax>", "")),
        r"object\[0\] \(dog\): <bndbox> missing <ymax>",
    ),
    "non-numeric": (annotation(box_object(xmax="ten")), r"<xmax> = 'ten'; expected a number"),
    "nan": (annotation(box_object(ymin="nan")), r"<ymin> = 'nan'; expected a number"),
    "degenerate": (
        annotation(box_object() + box_object(xmin="9", xmax="8")),
        r"object\[1\] \(dog\): degenerate box .* = \(9, 1, 8, 10\)",
    ),
    "negative": (
        annotation(box_object(xmin="-3")),
        r"object\[0\] \(dog\): box .* = \(-3, 1, 10, 10\) lies outside the 40x30 image",
    ),
    "zero-based": (annotation(box_object(ymin="0")), r"\(1, 0, 10, 10\) lies outside"),
    "out of image": (
        annotation(box_object(ymax="31")),
        r"\(1, 1, 10, 31\) lies outside the 40x30 image; expected .*<= 30",
    ),
    "bad difficult": (
        annotation(box_object(extra="<difficult>2</difficult>")),
        r"object\[0\] \(dog\): <difficult> = '2'; expected 0 or 1",
    ),
    "unknown class": (
        annotation(box_object(name="unicorn")),
        r"object\[0\] \(unicorn\): unknown class 'unicorn'; valid: aeroplane, .*tvmonitor",
    ),
    "doctype": (
        '<?xml version="1.0"?><!DOCTYPE annotation SYSTEM "file:///etc/passwd">' + annotation(),
        r"DOCTYPE/ENTITY declarations are not allowed",
    ),
    "entity": (
        '<!DOCTYPE a [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;">]>'
        + annotation(box_object(name="&lol2;")),
        r"DOCTYPE/ENTITY declarations are not allowed",
    ),
    "path in filename": (
        annotation().replace("img.jpg", ".."),
        r"<filename> stem '\.\.' is not a plain file name",
    ),
}


@pytest.mark.parametrize("case", BAD_ANNOTATIONS)
def test_bad_annotation(tmp_path: Path, case: str):
    text, message = BAD_ANNOTATIONS[case]
    path = tmp_path / "bad.xml"
    path.write_text(text)
    with pytest.raises(DatasetError, match=re.escape(str(path)) + ": .*" + message):
        read_annotation(path, classes=VOC_CLASSES)


def test_entity_hidden_in_utf16_is_rejected(tmp_path: Path):
    # A byte search for "<!ENTITY" misses UTF-16; the expat-level check does not.
    text = '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE a [<!ENTITY x "y">]><annotation/>'
    path = tmp_path / "wide.xml"
    path.write_bytes(text.encode("utf-16"))
    with pytest.raises(DatasetError, match=r"wide\.xml: DOCTYPE/ENTITY"):
        read_annotation(path)


def test_unknown_class_accepted_without_class_list(tmp_path: Path):
    path = tmp_path / "ok.xml"
    path.write_text(annotation(box_object(name="unicorn")))
    assert read_annotation(path).objects[0].name == "unicorn"


def test_bad_annotation_fails_read_voc(voc_root: Path):
    (voc_root / "Annotations" / "000003.xml").write_text(annotation(box_object(name="unicorn")))
    with pytest.raises(DatasetError, match=r"000003\.xml: object\[0\] \(unicorn\): unknown class"):
        read_voc(voc_root, "trainval")


# ---- image errors ------------------------------------------------------------------------


def test_corrupt_jpeg_random_bytes(voc_root: Path):
    path = voc_root / "JPEGImages" / "000001.jpg"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(DatasetError, match=r"000001\.jpg: cannot decode image \(500 bytes\)"):
        load_image(path)


def test_truncated_jpeg(voc_root: Path):
    path = voc_root / "JPEGImages" / "000001.jpg"
    assert load_image(path).shape == (H, W, 3)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"000001\.jpg: truncated JPEG"):
        load_image(path)


def test_missing_image(tmp_path: Path):
    with pytest.raises(DatasetError, match=r"gone\.jpg: cannot read image"):
        load_image(tmp_path / "gone.jpg")


def test_symlink_out_of_the_root_is_refused(voc_root: Path, tmp_path_factory):
    outside = tmp_path_factory.mktemp("elsewhere") / "secret.jpg"
    outside.write_bytes((voc_root / "JPEGImages" / "000002.jpg").read_bytes())
    target = voc_root / "JPEGImages" / "000002.jpg"
    target.unlink()
    target.symlink_to(outside)
    with pytest.raises(DatasetError, match=r"000002\.jpg: resolves to .*outside the dataset root"):
        read_voc(voc_root, "trainval")


def test_symlinked_root_itself_is_fine(voc_root: Path, tmp_path_factory):
    link = tmp_path_factory.mktemp("links") / "VOC2007"
    link.symlink_to(voc_root)
    assert len(read_voc(link, "trainval")) == 3


# ---- a train/test pair of splits ---------------------------------------------------------


def test_train_test_ids_of_disjoint_splits(voc_root: Path):
    (voc_root / "ImageSets" / "Main" / "test.txt").write_text("000004\n000005\n")
    assert read_train_test_ids(voc_root, "trainval", "test") == (
        ["000001", "000002", "000003"],
        ["000004", "000005"],
    )


@pytest.mark.parametrize("text", ["", "\n  \n\n"])
def test_empty_test_split_is_named(voc_root: Path, text: str):
    (voc_root / "ImageSets" / "Main" / "test.txt").write_text(text)
    with pytest.raises(
        DatasetError,
        match=r"Main/test\.txt: test split 'test' lists no image ids; expected one image id",
    ):
        read_train_test_ids(voc_root, "trainval", "test")


def test_empty_train_split_is_named(voc_root: Path):
    (voc_root / "ImageSets" / "Main" / "train.txt").write_text("")
    with pytest.raises(DatasetError, match=r"Main/train\.txt: train split 'train' lists no image"):
        read_train_test_ids(voc_root, "train", "trainval")


def test_overlapping_splits_name_the_shared_ids(voc_root: Path):
    (voc_root / "ImageSets" / "Main" / "val.txt").write_text("000007\n000003\n000001\n")
    with pytest.raises(DatasetError) as info:
        read_train_test_ids(voc_root, "trainval", "val")
    assert info.value.path == str(voc_root / "ImageSets" / "Main" / "val.txt")
    assert info.value.problem == (
        "test split 'val' shares 2 of its 3 image id(s) with train split 'trainval' "
        f"({voc_root / 'ImageSets' / 'Main' / 'trainval.txt'}), e.g. ['000003', '000001']; "
        "expected disjoint splits (VOC2007: trainval and test)"
    )


def test_same_split_for_train_and_test_is_refused(voc_root: Path):
    with pytest.raises(DatasetError, match=r"shares 3 of its 3 image id\(s\) with train split"):
        read_train_test_ids(voc_root, "trainval", "trainval")
