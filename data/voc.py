"""PASCAL VOC directory reader (and the annotation writer the synthetic generator uses).

A VOC directory holds ``JPEGImages/<id>.jpg``, ``Annotations/<id>.xml`` and
``ImageSets/Main/<split>.txt`` (one image id per line). Boxes stay exactly as the devkit writes
them: ``(xmin, ymin, xmax, ymax)``, 1-based, inclusive pixel coordinates, so a box covering the
single top-left pixel is ``(1, 1, 1, 1)`` and its width is ``xmax - xmin + 1``.

Every problem raises :class:`~data.errors.DatasetError` naming the file (and object or line) and
what was expected, before any expensive work starts.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.parsers import expat

import cv2
import numpy as np
import pyarrow as pa

from data.errors import DatasetError

# Devkit order (VOCdevkit/VOCcode/VOCinit.m); class index i in models = position in this tuple.
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip

OBJECTS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("class", pa.string()),
        ("x1", pa.float32()),  # VOC 1-based inclusive, as in the XML
        ("y1", pa.float32()),
        ("x2", pa.float32()),
        ("y2", pa.float32()),
        ("difficult", pa.bool_()),
        ("truncated", pa.bool_()),
    ]
)

_LAYOUT = "a VOC directory contains Annotations/, JPEGImages/ and ImageSets/Main/<split>.txt"


@dataclass(frozen=True)
class VOCObject:
    name: str
    box_xyxy: tuple[float, float, float, float]  # VOC 1-based inclusive pixel coordinates
    difficult: bool
    truncated: bool


@dataclass(frozen=True)
class VOCImage:
    image_id: str
    image_path: str  # absolute path of JPEGImages/<id>.jpg
    width: int
    height: int
    objects: tuple[VOCObject, ...]


def _check_plain_name(path: object, what: str, name: str) -> None:
    # Ids become file names under the root; one with a separator or ".." could read any file.
    if not name or "/" in name or "\\" in name or ".." in name or os.path.isabs(name):
        raise DatasetError(path, f"{what} {name!r} is not a plain file name (no '/', '\\' or '..')")


def _check_inside(path: Path, real_root: Path) -> None:
    """A file of the data set must stay inside its root: a symlink out of it (to ``/etc`` or to
    another user's files on a shared cluster) is refused. Point the root at the real directory."""
    if not path.resolve().is_relative_to(real_root):
        raise DatasetError(
            path, f"resolves to {path.resolve()}, outside the dataset root {real_root} (symlink)"
        )


def read_split_ids(root: str | Path, split: str) -> list[str]:
    """Image ids listed in ``root/ImageSets/Main/<split>.txt``, in file order."""
    main = Path(root) / "ImageSets" / "Main"
    split_file = main / f"{split}.txt"
    _check_plain_name(split_file, "split", split)
    if not split_file.is_file():
        # Per-class files are "<class>_<split>.txt"; the image splits are the names without "_".
        found = sorted(p.stem for p in main.glob("*.txt") if "_" not in p.stem)
        have = f"splits present: {', '.join(found)}" if found else f"no split files in {main}"
        raise DatasetError(split_file, f"split file not found ({have})")

    ids: list[str] = []
    first_line: dict[str, int] = {}
    for line_no, line in enumerate(split_file.read_text().splitlines(), start=1):
        image_id = line.strip()
        if not image_id:
            continue
        where = f"{split_file}:{line_no}"
        if len(image_id.split()) != 1:
            raise DatasetError(where, f"expected one image id per line, got {image_id!r}")
        _check_plain_name(where, "image id", image_id)
        if image_id in first_line:
            raise DatasetError(
                where, f"duplicate image id {image_id!r} (first on line {first_line[image_id]})"
            )
        first_line[image_id] = line_no
        ids.append(image_id)
    return ids


def read_train_test_ids(
    root: str | Path, train_split: str, test_split: str
) -> tuple[list[str], list[str]]:
    """Image ids of a train and a test split, checked as a pair before any annotation is parsed.

    Each split must list at least one image (an empty test split gives mAP = NaN, an empty train
    split nothing to train on) and the two must share none: a shared image leaks test data into
    training and appears twice in every table keyed by image id.
    """
    main = Path(root) / "ImageSets" / "Main"
    ids = {}
    for role, split in (("train", train_split), ("test", test_split)):
        ids[role] = read_split_ids(root, split)
        if not ids[role]:
            raise DatasetError(
                main / f"{split}.txt",
                f"{role} split {split!r} lists no image ids; expected one image id per line",
            )
    train = set(ids["train"])
    shared = [i for i in ids["test"] if i in train]
    if shared:
        raise DatasetError(
            main / f"{test_split}.txt",
            f"test split {test_split!r} shares {len(shared)} of its {len(ids['test'])} image "
            f"id(s) with train split {train_split!r} ({main / f'{train_split}.txt'}), e.g. "
            f"{shared[:5]}; expected disjoint splits (VOC2007: trainval and test)",
        )
    return ids["train"], ids["test"]


class _DeclarationFound(Exception):
    pass


def _refuse_declarations(data: bytes, path: Path) -> None:
    """Reject DOCTYPE/ENTITY declarations (entity expansion attacks) in any encoding.

    A byte search misses UTF-16 documents, so expat itself reports the declarations; it stops at
    the first one, before any entity is expanded.
    """

    def refuse(*_args: object) -> None:
        raise _DeclarationFound

    parser = expat.ParserCreate()
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    try:
        parser.Parse(data, True)
    except _DeclarationFound:
        raise DatasetError(
            path, "DOCTYPE/ENTITY declarations are not allowed; expected a plain devkit annotation"
        ) from None
    except expat.ExpatError as e:
        raise DatasetError(
            path, f"malformed XML ({e}); expected an <annotation> document"
        ) from None


def _text(node: ET.Element, key: str, path: Path, where: str) -> str:
    child = node.find(key)
    if child is None or child.text is None or not child.text.strip():
        raise DatasetError(path, f"{where}missing <{key}>")
    return child.text.strip()


def _positive_int(node: ET.Element, key: str, path: Path) -> int:
    text = _text(node, key, path, "")
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise DatasetError(path, f"<{key}> = {text!r}; expected a positive integer")
    return value


def _flag(node: ET.Element, key: str, path: Path, where: str) -> bool:
    child = node.find(key)
    if child is None or child.text is None or not child.text.strip():
        return False
    if child.text.strip() not in ("0", "1"):
        raise DatasetError(path, f"{where}<{key}> = {child.text.strip()!r}; expected 0 or 1")
    return child.text.strip() == "1"


def _parse_object(
    obj: ET.Element, index: int, width: int, height: int, classes: Sequence[str] | None, path: Path
) -> VOCObject:
    where = f"object[{index}]: "
    name = _text(obj, "name", path, where)
    where = f"object[{index}] ({name}): "
    if classes is not None and name not in classes:
        raise DatasetError(path, f"{where}unknown class {name!r}; valid: {', '.join(classes)}")
    bndbox = obj.find("bndbox")
    if bndbox is None:
        raise DatasetError(path, f"{where}missing <bndbox>")
    coords = []
    for key in ("xmin", "ymin", "xmax", "ymax"):
        text = _text(bndbox, key, path, where + "<bndbox> ")
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise DatasetError(path, f"{where}<{key}> = {text!r}; expected a number")
        coords.append(value)
    x1, y1, x2, y2 = coords
    box = f"box (xmin, ymin, xmax, ymax) = ({x1:g}, {y1:g}, {x2:g}, {y2:g})"
    if x2 < x1 or y2 < y1:
        raise DatasetError(path, f"{where}degenerate {box}; expected xmin <= xmax, ymin <= ymax")
    if x1 < 1 or y1 < 1 or x2 > width or y2 > height:
        raise DatasetError(
            path,
            f"{where}{box} lies outside the {width}x{height} image; expected "
            f"1 <= xmin <= xmax <= {width} and 1 <= ymin <= ymax <= {height} (1-based)",
        )
    return VOCObject(
        name=name,
        box_xyxy=(x1, y1, x2, y2),
        difficult=_flag(obj, "difficult", path, where),
        truncated=_flag(obj, "truncated", path, where),
    )


def read_annotation(xml_path: str | Path, classes: Sequence[str] | None = None) -> VOCImage:
    """Parse and validate one ``Annotations/<id>.xml``.

    ``image_id`` is the ``<filename>`` stem (else the XML stem); ``image_path`` is
    ``<xml dir>/../JPEGImages/<id>.jpg``. With ``classes``, object names outside it are errors.
    """
    path = Path(xml_path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetError(path, f"cannot read annotation ({e.strerror})") from None
    _refuse_declarations(data, path)
    root = ET.fromstring(data)
    if root.tag != "annotation":
        raise DatasetError(path, f"root element is <{root.tag}>; expected <annotation>")

    filename = root.findtext("filename")
    image_id = Path(filename.strip()).stem if filename and filename.strip() else path.stem
    _check_plain_name(path, "<filename> stem", image_id)
    size = root.find("size")
    if size is None:
        raise DatasetError(path, "missing <size>")
    width, height = _positive_int(size, "width", path), _positive_int(size, "height", path)
    objects = tuple(
        _parse_object(obj, i, width, height, classes, path)
        for i, obj in enumerate(root.findall("object"))
    )
    voc_root = Path(os.path.abspath(path)).parent.parent
    return VOCImage(
        image_id=image_id,
        image_path=str(voc_root / "JPEGImages" / f"{image_id}.jpg"),
        width=width,
        height=height,
        objects=objects,
    )


def read_voc(
    root: str | Path,
    split: str,
    classes: Sequence[str] | None = VOC_CLASSES,
    check_images: bool = True,
) -> list[VOCImage]:
    """All annotations of one split, in split-file order; checks every file exists up front."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(root, f"dataset root not found; {_LAYOUT}")
    real_root = root.resolve()
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    _check_inside(split_file, real_root)
    images = []
    for image_id in read_split_ids(root, split):
        xml_path = root / "Annotations" / f"{image_id}.xml"
        if not xml_path.is_file():
            raise DatasetError(
                xml_path, f"annotation missing for image {image_id!r} ({split_file})"
            )
        _check_inside(xml_path, real_root)
        _check_inside(root / "JPEGImages" / f"{image_id}.jpg", real_root)
        image = read_annotation(xml_path, classes)
        if image.image_id != image_id:
            raise DatasetError(
                xml_path, f"<filename> names image {image.image_id!r}; expected {image_id!r}"
            )
        if check_images and not os.path.isfile(image.image_path):
            raise DatasetError(image.image_path, f"image missing for {image_id!r} ({split_file})")
        images.append(image)
    return images


def load_image(path: str | Path, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode a JPEG/PNG to a BGR ``uint8`` array of shape ``(H, W, 3)``; with ``expected_size``
    ``(width, height)`` (the annotation's ``<size>``), a decoded image of another size is a
    DatasetError: its boxes, checked against the annotation, would not be the image's."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DatasetError(path, f"cannot read image ({e.strerror})") from None
    # libjpeg decodes a truncated JPEG with only a warning (grey bottom rows), so check that the
    # end-of-image marker is there ourselves.
    if data[:2] == b"\xff\xd8" and not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
        raise DatasetError(path, "truncated JPEG: no end-of-image marker (FF D9) at the end")
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetError(path, f"cannot decode image ({len(data)} bytes); expected a JPEG or PNG")
    if expected_size is not None and (image.shape[1], image.shape[0]) != tuple(expected_size):
        raise DatasetError(
            path,
            f"image is {image.shape[1]}x{image.shape[0]} px but its annotation's <size> says "
            f"{expected_size[0]}x{expected_size[1]}; expected the two to agree",
        )
    return image


def objects_table(images: Sequence[VOCImage]) -> pa.Table:
    """One row per object with :data:`OBJECTS_SCHEMA` (boxes VOC 1-based inclusive)."""
    rows = [(image.image_id, obj) for image in images for obj in image.objects]
    boxes = np.array([obj.box_xyxy for _, obj in rows], dtype=np.float32).reshape(-1, 4)
    columns = [
        [image_id for image_id, _ in rows],
        [obj.name for _, obj in rows],
        *(boxes[:, k] for k in range(4)),
        [obj.difficult for _, obj in rows],
        [obj.truncated for _, obj in rows],
    ]
    return pa.Table.from_arrays(
        [pa.array(c, type=f.type) for c, f in zip(columns, OBJECTS_SCHEMA, strict=True)],
        schema=OBJECTS_SCHEMA,
    )


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def write_annotation(
    path: str | Path,
    image_id: str,
    width: int,
    height: int,
    objects: Sequence[VOCObject],
    folder: str = "VOC2007",
    segmented: bool = False,
) -> None:
    """Write a devkit-style ``Annotations/<id>.xml`` (boxes VOC 1-based inclusive)."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = folder
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    size = ET.SubElement(root, "size")
    for key, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    ET.SubElement(root, "segmented").text = str(int(segmented))
    for obj in objects:
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = obj.name
        ET.SubElement(node, "pose").text = "Unspecified"
        ET.SubElement(node, "truncated").text = str(int(obj.truncated))
        ET.SubElement(node, "difficult").text = str(int(obj.difficult))
        bndbox = ET.SubElement(node, "bndbox")
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), obj.box_xyxy, strict=True):
            ET.SubElement(bndbox, key).text = _number(value)
    ET.indent(root, space="\t")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(ET.tostring(root, encoding="utf-8", xml_declaration=False) + b"\n")


def load_instance_mask(
    root: str | Path, image_id: str, *, expected_shape: tuple[int, int] | None = None
) -> np.ndarray:
    """``root/SegmentationObject/<image_id>.png`` as ``uint8 (H, W)`` instance indices.

    0 is background, ``k`` the k-th object of ``Annotations/<image_id>.xml`` and 255 VOC's
    "void" band around objects, kept as 255 (callers treat it as not-object). With
    ``expected_shape = (H, W)`` a mask of another size is an error.
    """
    # Pillow arrives with matplotlib. Real VOC masks are palette PNGs, and PIL returns their
    # palette *indices* ("P" mode); cv2.imread would expand them to the palette's BGR colours.
    from PIL import Image, UnidentifiedImageError

    path = Path(root) / "SegmentationObject" / f"{image_id}.png"
    _check_plain_name(path, "image id", image_id)
    if not path.is_file():
        raise DatasetError(path, f"instance mask missing for image {image_id!r}")
    try:
        with Image.open(path) as img:
            mode = img.mode
            mask = np.array(img)  # "P" -> palette indices, "L" -> grey values
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(path, f"cannot decode instance mask ({e}); expected a PNG") from None
    if mode not in ("P", "L") or mask.dtype != np.uint8 or mask.ndim != 2:
        raise DatasetError(
            path, f"PNG mode {mode!r}, shape {mask.shape}; expected a single-channel 8-bit "
            "index image (mode 'P' or 'L')",
        )  # fmt: skip
    if expected_shape is not None and mask.shape != tuple(expected_shape):
        raise DatasetError(
            path, f"mask is {mask.shape} (H, W); expected {tuple(expected_shape)} like its image"
        )
    return mask
