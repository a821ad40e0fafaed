"""Property-based fuzzing (hypothesis) of the two parsers that take user input: VOC annotation XML
and `--set KEY=VALUE`. Whatever the input, the result is a valid value or the parser's own error
type (DatasetError / ConfigError) — never another exception, never a silently wrong value."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data.errors import DatasetError
from data.voc import VOC_CLASSES, read_annotation
from pipelines.config import ConfigError, apply_overrides, parse_set_args

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

_number = st.one_of(
    st.integers(-5, 60).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["", " ", "ten", "1e3", "0x10", "-0", "3.5"]),
)


@st.composite
def annotations(draw) -> str:
    """Annotation-shaped XML with random sizes, boxes, flags and structural damage."""
    w, h = draw(_number), draw(_number)
    objects = []
    for _ in range(draw(st.integers(0, 3))):
        fields = {k: draw(_number) for k in ("xmin", "ymin", "xmax", "ymax")}
        drop = draw(st.sampled_from([None, "xmin", "ymax", "bndbox", "name"]))
        name = draw(st.sampled_from(["dog", "person", "unicorn", "", "<b>x</b>"]))
        box = "".join(f"<{k}>{v}</{k}>" for k, v in fields.items() if k != drop)
        parts = [
            "" if drop == "name" else f"<name>{name}</name>",
            "" if drop == "bndbox" else f"<bndbox>{box}</bndbox>",
            f"<difficult>{draw(st.sampled_from(['0', '1', '2', 'x']))}</difficult>",
        ]
        objects.append("<object>" + "".join(parts) + "</object>")
    size = (
        ""
        if draw(st.booleans()) and draw(st.booleans())
        else (f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>")
    )
    xml = f"<annotation><filename>img.jpg</filename>{size}{''.join(objects)}</annotation>"
    cut = draw(st.one_of(st.none(), st.integers(0, len(xml))))
    return xml if cut is None else xml[:cut]


@FUZZ
@given(text=annotations())
def test_voc_parser_returns_valid_boxes_or_a_dataset_error(tmp_path: Path, text: str):
    path = tmp_path / "a.xml"
    path.write_text(text)
    try:
        image = read_annotation(path, classes=VOC_CLASSES)
    except DatasetError as e:
        assert str(path) in str(e)  # the message names the file
        return
    assert image.width >= 1 and image.height >= 1
    for obj in image.objects:
        x1, y1, x2, y2 = obj.box_xyxy
        assert all(math.isfinite(v) for v in obj.box_xyxy)
        assert 1 <= x1 <= x2 <= image.width and 1 <= y1 <= y2 <= image.height
        assert obj.name in VOC_CLASSES


@FUZZ
@given(data=st.binary(max_size=300))
def test_voc_parser_on_arbitrary_bytes(tmp_path: Path, data: bytes):
    path = tmp_path / "b.xml"
    path.write_bytes(data)
    try:
        read_annotation(path)
    except DatasetError:
        pass


# ---- --set -------------------------------------------------------------------------------------
def _rcnn_config():
    from pipelines.rcnn.config import RCNNConfig

    return RCNNConfig()


_keys = st.one_of(
    st.sampled_from(
        ["svm.C", "svm.neg_iou", "svm.mode", "data.num_train", "cnn.small_widths", "bbox.enabled",
         "proposals.max_per_image", "svm", "nope", "svm.nope", "data.seed.x", ""]
    ),
    st.text(max_size=12),
)  # fmt: skip
_values = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        ["0", "-1", "1e-3", "nan", "inf", "true", "(1,2)", "(8,16,32,64)", "hnm", "none", "2.5"]
    ),
)


@FUZZ
@given(pairs=st.lists(st.tuples(_keys, _values), max_size=3))
def test_set_parser_gives_a_valid_config_or_a_config_error(pairs):
    cfg = _rcnn_config()
    try:
        overrides = parse_set_args([f"{k}={v}" for k, v in pairs])
        new = apply_overrides(cfg, overrides)
    except ConfigError as e:
        assert str(e)
        return
    for key, text in overrides.items():
        value = new
        for part in key.split("."):
            value = getattr(value, part)
        assert value is not None or text.lower() in ("none", "null", "")
        if isinstance(value, float):  # an accepted number is finite and inside its range
            assert math.isfinite(value), (key, text)
            if key == "svm.neg_iou":
                assert 0 <= value <= 1
            if key == "svm.C":
                assert value > 0
        if key == "cnn.small_widths":
            assert isinstance(value, tuple) and len(value) == 4 and all(w >= 1 for w in value)


@pytest.mark.parametrize("arg", ["=1", "svm.C", "  =x"])
def test_set_parser_malformed_items(arg):
    with pytest.raises(ConfigError, match="--set expects KEY=VALUE"):
        parse_set_args([arg])
