"""R-CNN on a user's own VOC-format detection set (issue 20): classes from its annotations, metrics
over those classes only, no segmentation masks, no test split file.

The fixture is written here the way a labelling tool writes a set (labelImg's Pascal VOC output),
not the way our generator does: a ``<path>`` and ``<source>`` of the tool's machine, no
``<segmented>``, no ``SegmentationObject/``, one class, ``.jpg`` images of real-photo texture.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from cluster.resources import Resources
from data.errors import DatasetError
from pipelines import runner
from pipelines.config import ConfigError
from pipelines.engine import StepContext
from pipelines.rcnn.data import HOLDOUT_SPLIT, make_dataset

W, H = 128, 96
CLASS = "mug"

LABELIMG_XML = """<annotation>
\t<folder>photos</folder>
\t<filename>{image_id}.jpg</filename>
\t<path>C:\\Users\\lab\\photos\\{image_id}.jpg</path>
\t<source>
\t\t<database>Unknown</database>
\t</source>
\t<size>
\t\t<width>{w}</width>
\t\t<height>{h}</height>
\t\t<depth>3</depth>
\t</size>
{objects}</annotation>
"""
OBJECT_XML = """\t<object>
\t\t<name>{name}</name>
\t\t<pose>Unspecified</pose>
\t\t<truncated>0</truncated>
\t\t<difficult>0</difficult>
\t\t<bndbox>
\t\t\t<xmin>{x1}</xmin>
\t\t\t<ymin>{y1}</ymin>
\t\t\t<xmax>{x2}</xmax>
\t\t\t<ymax>{y2}</ymax>
\t\t</bndbox>
\t</object>
"""


def write_own_set(root: Path, n_trainval: int = 8, n_test: int = 4, seed: int = 0) -> Path:
    """``n_trainval`` + ``n_test`` images with one or two "mug"s each (a filled ellipse with a
    handle, in one of a few colours) over a crop of a bundled photo; trainval.txt and test.txt."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two real 427x640 RGB photos
    rng = np.random.default_rng(seed)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"IMG_{i:04d}" for i in range(n_trainval + n_test)]
    for image_id in ids:
        photo = photos[int(rng.integers(2))]
        y0, x0 = int(rng.integers(0, 427 - 2 * H)), int(rng.integers(0, 640 - 2 * W))
        img = cv2.resize(photo[y0 : y0 + 2 * H, x0 : x0 + 2 * W, ::-1], (W, H)).copy()
        objects = []
        for _ in range(int(rng.integers(1, 3))):
            bw, bh = int(rng.integers(24, 44)), int(rng.integers(24, 40))
            x1, y1 = int(rng.integers(1, W - bw - 1)), int(rng.integers(1, H - bh - 1))
            colour = [(30, 30, 220), (220, 220, 240), (40, 160, 40)][int(rng.integers(3))]
            centre = (x1 - 1 + bw * 2 // 5, y1 - 1 + bh // 2)
            cv2.ellipse(img, centre, (bw * 2 // 5, bh // 2 - 1), 0, 0, 360, colour, -1)
            cv2.circle(img, (x1 - 1 + bw * 4 // 5, y1 - 1 + bh // 2), bh // 4, colour, 3)
            objects.append(
                OBJECT_XML.format(name=CLASS, x1=x1, y1=y1, x2=x1 + bw - 1, y2=y1 + bh - 1)
            )
        assert cv2.imwrite(str(root / "JPEGImages" / f"{image_id}.jpg"), img)
        xml = LABELIMG_XML.format(image_id=image_id, w=W, h=H, objects="".join(objects))
        (root / "Annotations" / f"{image_id}.xml").write_text(xml)
    main = root / "ImageSets" / "Main"
    (main / "trainval.txt").write_text("\n".join(ids[:n_trainval]) + "\n")
    (main / "test.txt").write_text("\n".join(ids[n_trainval:]) + "\n")
    return root


@pytest.fixture(scope="module")
def own_set(tmp_path_factory) -> Path:
    return write_own_set(tmp_path_factory.mktemp("own") / "my_mugs")


def dataset_step(tmp_path: Path, root: Path, **params) -> Path:
    out = tmp_path / "out"
    out.mkdir(parents=True)
    ctx = StepContext("rcnn", "dataset", "k", {}, out, Resources(), work_uri="")
    kwargs = dict(source="voc", root=str(root), train_split="trainval", test_split="test",
                  max_images=0, download=False, num_train=0, num_test=0, width_px=0,
                  height_px=0, max_objects=0, seed=0, classes=("auto",))  # fmt: skip
    make_dataset(ctx, **{**kwargs, **params})
    return out


def test_auto_classes_are_the_sets_own(tmp_path, own_set):
    out = dataset_step(tmp_path, own_set)
    assert json.loads((out / "classes.json").read_text()) == [CLASS]
    objects = pq.read_table(out / "objects.parquet").to_pydict()
    assert set(objects["class"]) == {CLASS} and len(objects["class"]) >= 12


def test_unknown_class_names_the_file_and_the_class(tmp_path, own_set):
    with pytest.raises(
        DatasetError, match=r"IMG_0000\.xml: object\[0\] \(mug\): unknown class 'mug'"
    ):
        dataset_step(tmp_path, own_set, classes=("cup", "bottle"))
    (tmp_path / "out").rmdir()
    with pytest.raises(DatasetError, match=r"IMG_0000\.xml.*unknown class 'mug'; valid: aeroplane"):
        dataset_step(tmp_path, own_set, classes=("voc",))
    (tmp_path / "out").rmdir()
    out = dataset_step(tmp_path, own_set, classes=("mug", "kettle"))  # explicit superset: fine
    assert json.loads((out / "classes.json").read_text()) == ["mug", "kettle"]


def test_holdout_fraction_is_a_seeded_disjoint_test_split(tmp_path, own_set):
    (own_set / "ImageSets" / "Main" / "test.txt").rename(own_set / "test.txt.bak")
    try:
        splits = []
        for seed in (0, 0, 1):
            out = dataset_step(
                tmp_path / str(len(splits)), own_set, holdout_fraction=0.2, seed=seed
            )
            images = pq.read_table(out / "images.parquet").to_pydict()
            split_of = dict(zip(images["image_id"], images["split"], strict=True))
            splits.append(split_of)
            assert json.loads((out / "splits.json").read_text()) == {
                "train": "trainval",
                "test": HOLDOUT_SPLIT,
            }
        assert len(splits[0]) == 8 and sum(s == HOLDOUT_SPLIT for s in splits[0].values()) == 2
        assert splits[0] == splits[1] and splits[0] != splits[2]  # seeded by data.seed
    finally:
        (own_set / "test.txt.bak").rename(own_set / "ImageSets" / "Main" / "test.txt")


def test_config_refuses_missing_root_and_split_before_any_work(tmp_path, own_set):
    kw = dict(store=str(tmp_path / "store"), runs=tmp_path / "runs", log=lambda _: None)
    with pytest.raises(ConfigError, match=r"data\.root is not set"):
        runner.run("rcnn", "voc2007", executor="local", **kw)
    with pytest.raises(ConfigError, match=r"data\.root: .*nowhere is not a directory"):
        runner.run("rcnn", "voc2007", {"data.root": str(tmp_path / "nowhere")}, **kw)
    with pytest.raises(
        ConfigError,
        match=r"data\.test_split=val: .*val\.txt not found \(splits present: test, trainval\).*"
        r"data\.holdout_fraction",
    ):
        runner.run("rcnn", "ci", {"data.source": "voc", "data.root": str(own_set),
                                  "data.test_split": "val"}, **kw)  # fmt: skip
    with pytest.raises(ConfigError, match="data.classes: auto and voc stand alone"):
        runner.run("rcnn", "ci", {"data.classes": "auto,mug"}, **kw)
    assert not (tmp_path / "store").exists() and not (tmp_path / "runs").exists()


# the `ci` preset's small CNN, cut to what 12 small images need: ≈ 30 s of CPU in-process
OWN_SET_RUN = {
    "data.source": "voc",
    "proposals.max_per_image": "50",
    "proposals.images_per_task": "8",
    "pretrain.epochs": "5",
    "finetune.iterations": "40",
    "finetune.batch_size": "32",  # 8 foreground + 24 background windows
    "finetune.lr_step": "30",
    "features.images_per_shard": "8",
}


def test_own_set_without_masks_runs_to_its_report(tmp_path, own_set):
    kw = dict(store=str(tmp_path / "store"), runs=tmp_path / "runs", log=lambda _: None)
    result = runner.run(
        "rcnn",
        "ci",
        {**OWN_SET_RUN, "data.root": str(own_set)},
        executor="local",
        progress=False,
        **kw,
    )
    assert all(m["status"] == "computed" for m in result.manifest)
    m = result.metrics
    assert list(m["AP_voc07"]) == [CLASS] and list(m["AP_area"]) == [CLASS]  # only its class
    assert math.isfinite(m["mAP_voc07"]) and m["mAP_voc07"] == m["AP_voc07"][CLASS]
    assert m["mAP_voc07"] >= 0.4  # measured 0.76 (batch 128): big, plain objects
    assert "no instance masks" in m["region_features_skipped"]
    report = (result.run_dir / "report.md").read_text()
    assert report.startswith("# R-CNN — detection results")  # real data: no generated-data note
    assert "Skipped: no instance masks (SegmentationObject/<id>.png)" in report
    assert f"| {CLASS} |" in report and "aeroplane" not in report
