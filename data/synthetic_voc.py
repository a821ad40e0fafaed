"""A deterministic detection data set in PASCAL VOC format, for demos and tests of R-CNN.

Coloured shapes (circles/ellipses, rectangles, triangles, stars) over random crops of
scikit-learn's two bundled sample photos, so backgrounds are cluttered natural images and nothing
is downloaded. Objects vary in scale, aspect ratio and rotation, later objects partly occlude earlier
ones, and some run off the image: the devkit's ``difficult`` and ``truncated`` flags mean something.
Ground-truth boxes are the bounding boxes of each object's *visible* pixels, in VOC 1-based
inclusive coordinates, and match the instance masks in ``SegmentationObject/`` exactly.

Image ``<id>`` depends only on ``(seed, id)``; the same arguments give byte-identical files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import sklearn.datasets

from data.voc import VOCObject, write_annotation

SHAPE_CLASSES: tuple[str, ...] = ("circle", "rectangle", "triangle", "star")
SPLITS = ("train", "val", "trainval", "test")

MIN_OBJECT_PX = 24  # smallest object scale (geometric mean of its box sides)
MAX_OBJECT_FRAC = 0.45  # largest object scale, as a fraction of the image's smaller side
MAX_ASPECT = 2.0  # ellipses and rectangles: width/height in [1/2, 2]
OFF_IMAGE_FRAC = 0.35  # an object may extend this far (fraction of its size) past the border
NEAR_PROB = 0.5  # chance that a new object is placed next to an earlier one (occlusion)
MAX_HIDDEN_FRAC = 0.5  # a new object may hide at most half of an earlier one
PLACEMENT_TRIES = 20  # then the object is skipped
MIN_VISIBLE_PX = 30  # fewer visible pixels: the object is dropped, not annotated
DIFFICULT_VISIBLE_FRAC = 0.4  # less of the object visible: difficult
DIFFICULT_BOX_PX = 16  # visible box narrower or shorter than this: difficult
VAL_FRAC = 0.2  # of trainval
JPEG_QUALITY = 95


@dataclass(frozen=True)
class _Shape:
    name: str
    x0: int  # top-left of ``mask`` in image pixels; negative when it runs off the image
    y0: int
    mask: np.ndarray  # bool (h, w): the whole shape, including any part outside the image

    def clip(self, width: int, height: int) -> tuple[tuple[slice, slice], np.ndarray]:
        """The image region ``(rows, cols)`` the shape covers and its mask cropped to it."""
        h, w = self.mask.shape
        ix0, iy0 = max(self.x0, 0), max(self.y0, 0)
        ix1, iy1 = min(self.x0 + w, width), min(self.y0 + h, height)
        local = self.mask[iy0 - self.y0 : iy1 - self.y0, ix0 - self.x0 : ix1 - self.x0]
        return (slice(iy0, iy1), slice(ix0, ix1)), local


@lru_cache(maxsize=1)
def _sample_photos() -> tuple[np.ndarray, ...]:
    return tuple(
        cv2.cvtColor(photo, cv2.COLOR_RGB2BGR)
        for photo in sklearn.datasets.load_sample_images().images
    )


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A random crop of a sample photo at the image's aspect ratio, resized: BGR (H, W, 3)."""
    photos = _sample_photos()
    photo = photos[rng.integers(len(photos))]
    ph, pw = photo.shape[:2]
    crop_h = rng.uniform(0.5, 1.0) * min(ph, pw)
    crop_w = min(crop_h * width / height, pw)
    crop_h = int(crop_w * height / width)
    crop_w = int(crop_w)
    y0, x0 = rng.integers(ph - crop_h + 1), rng.integers(pw - crop_w + 1)
    crop = photo[y0 : y0 + crop_h, x0 : x0 + crop_w]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return cv2.resize(np.ascontiguousarray(crop), (width, height), interpolation=cv2.INTER_AREA)


def _polygon_mask(points: np.ndarray) -> np.ndarray:
    points = np.rint(points - points.min(axis=0)).astype(np.int32)  # (N, 2) x, y
    mask = np.zeros(points.max(axis=0)[::-1] + 1, dtype=np.uint8)
    cv2.fillPoly(mask, [points], 1)
    return mask.astype(bool)


def _shape_mask(rng: np.random.Generator, name: str, scale_px: float) -> np.ndarray:
    """Bool mask of one shape whose box sides have geometric mean about ``scale_px``."""
    if name in ("circle", "rectangle"):
        aspect = np.exp(rng.uniform(-np.log(MAX_ASPECT), np.log(MAX_ASPECT)))  # width / height
        w, h = max(int(scale_px * np.sqrt(aspect)), 3), max(int(scale_px / np.sqrt(aspect)), 3)
        if name == "rectangle":
            return np.ones((h, w), dtype=bool)
        mask = np.zeros((h, w), dtype=np.uint8)
        cv2.ellipse(mask, (((w - 1) / 2, (h - 1) / 2), (w, h), 0), 1, -1)  # box form: diameters
        return mask.astype(bool)
    radius = scale_px / 2
    turn = rng.uniform(0, 2 * np.pi)
    if name == "triangle":
        # Jittered corners: not only equilateral triangles.
        angles = turn + np.deg2rad([0, 120, 240] + rng.uniform(-15, 15, size=3))
        radii = np.full(3, radius)
    elif name == "star":
        angles = turn + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, radius, radius * rng.uniform(0.4, 0.55))
    else:
        raise ValueError(f"no drawing for class {name!r}; known: {', '.join(SHAPE_CLASSES)}")
    return _polygon_mask(np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1))


def _place(
    rng: np.random.Generator, name: str, width: int, height: int, near: _Shape | None
) -> _Shape:
    """A random shape; with ``near``, centred within reach of it so that they overlap often."""
    # Log-uniform scale: as many small objects (the hard ones) as large ones.
    max_px = MAX_OBJECT_FRAC * min(width, height)
    scale_px = np.exp(rng.uniform(np.log(MIN_OBJECT_PX), np.log(max_px)))
    mask = _shape_mask(rng, name, scale_px)
    h, w = mask.shape
    lo_x, hi_x = (0.5 - OFF_IMAGE_FRAC) * w, width - (0.5 - OFF_IMAGE_FRAC) * w
    lo_y, hi_y = (0.5 - OFF_IMAGE_FRAC) * h, height - (0.5 - OFF_IMAGE_FRAC) * h
    if near is None:
        cx, cy = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
    else:
        nh, nw = near.mask.shape
        cx = near.x0 + nw / 2 + rng.uniform(-0.5, 0.5) * (nw + w)
        cy = near.y0 + nh / 2 + rng.uniform(-0.5, 0.5) * (nh + h)
        cx, cy = np.clip(cx, lo_x, hi_x), np.clip(cy, lo_y, hi_y)
    return _Shape(name, int(round(cx - w / 2)), int(round(cy - h / 2)), mask)


def _layout(
    rng: np.random.Generator, classes: Sequence[str], width: int, height: int, max_objects: int
) -> list[_Shape]:
    """Shapes in drawing order; each hides at most MAX_HIDDEN_FRAC of any earlier one."""
    top = np.zeros((height, width), dtype=np.int32)  # 1 + index of the topmost shape, 0 = none
    shapes: list[_Shape] = []
    for _ in range(rng.integers(1, max_objects + 1)):
        name = classes[rng.integers(len(classes))]
        for _try in range(PLACEMENT_TRIES):
            near = None
            if shapes and rng.random() < NEAR_PROB:
                near = shapes[rng.integers(len(shapes))]
            shape = _place(rng, name, width, height, near)
            region, local = shape.clip(width, height)
            hidden = np.bincount(top[region][local], minlength=len(shapes) + 1)[1:]
            areas = np.array([s.mask.sum() for s in shapes])
            if np.all(hidden <= MAX_HIDDEN_FRAC * areas):
                top[region][local] = len(shapes) + 1
                shapes.append(shape)
                break
    return shapes


def _instance_map(shapes: Sequence[_Shape], width: int, height: int) -> np.ndarray:
    """uint8 (H, W): k where the k-th shape (1-based) is on top, 0 for background."""
    index = np.zeros((height, width), dtype=np.uint8)
    for k, shape in enumerate(shapes, start=1):
        region, local = shape.clip(width, height)
        index[region][local] = k
    return index


def _paint(rng: np.random.Generator, image: np.ndarray, shape: _Shape) -> None:
    """Fill the shape in place: saturated colour, soft shading, pixel noise, darker outline."""
    height, width = image.shape[:2]
    hsv = np.array(
        [[[rng.integers(180), rng.integers(170, 256), rng.integers(140, 256)]]], np.uint8
    )
    colour = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)
    h, w = shape.mask.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    gx, gy = rng.uniform(-0.25, 0.25, size=2)
    shade = 1 + gx * (xx / w - 0.5) * 2 + gy * (yy / h - 0.5) * 2  # (h, w) lighting gradient
    fill = colour * shade[..., None] + rng.normal(0, 6, size=(h, w, 3)).astype(np.float32)
    inner = cv2.erode(shape.mask.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=2,
                      borderType=cv2.BORDER_CONSTANT, borderValue=0)  # fmt: skip
    fill[shape.mask & ~inner.astype(bool)] = colour * 0.45
    fill = np.clip(fill, 0, 255).astype(np.uint8)

    region, local = shape.clip(width, height)
    iy, ix = region[0].start - shape.y0, region[1].start - shape.x0  # region origin in the mask
    patch = fill[iy : iy + local.shape[0], ix : ix + local.shape[1]]
    image[region][local] = patch[local]


def _render(
    rng: np.random.Generator, classes: Sequence[str], width: int, height: int, max_objects: int
) -> tuple[np.ndarray, np.ndarray, list[VOCObject], int]:
    """One image: BGR (H, W, 3), instance map (H, W), its objects, and how many are occluded."""
    image = _background(rng, width, height)
    shapes = _layout(rng, classes, width, height, max_objects)
    counts = np.bincount(_instance_map(shapes, width, height).ravel(), minlength=len(shapes) + 1)
    # Dropping a shape only uncovers others, so one pass leaves every kept shape >= MIN_VISIBLE_PX.
    shapes = [s for s, n in zip(shapes, counts[1:], strict=True) if n >= MIN_VISIBLE_PX]
    index = _instance_map(shapes, width, height)

    objects, occluded = [], 0
    for k, shape in enumerate(shapes, start=1):
        _paint(rng, image, shape)
        region, local = shape.clip(width, height)
        rows, cols = np.nonzero(index[region] == k)
        x1, x2 = region[1].start + cols.min() + 1, region[1].start + cols.max() + 1  # 1-based
        y1, y2 = region[0].start + rows.min() + 1, region[0].start + rows.max() + 1
        visible_frac = len(rows) / shape.mask.sum()
        small = min(x2 - x1 + 1, y2 - y1 + 1) < DIFFICULT_BOX_PX
        objects.append(
            VOCObject(
                name=shape.name,
                box_xyxy=(float(x1), float(y1), float(x2), float(y2)),
                difficult=bool(visible_frac < DIFFICULT_VISIBLE_FRAC or small),
                truncated=bool(x1 == 1 or y1 == 1 or x2 == width or y2 == height),
            )
        )
        occluded += int(len(rows) < local.sum())
    return image, index, objects, occluded


def _write_split_files(
    main: Path,
    splits: dict[str, list[str]],
    objects: dict[str, list[VOCObject]],
    classes: Sequence[str],
) -> None:
    main.mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for name in classes:
            lines = []
            for image_id in ids:
                mine = [o for o in objects[image_id] if o.name == name]
                # Devkit flags: 1 present, 0 only difficult instances, -1 absent.
                flag = -1 if not mine else 0 if all(o.difficult for o in mine) else 1
                lines.append(f"{image_id} {flag:2d}\n")
            (main / f"{name}_{split}.txt").write_text("".join(lines))


def generate_voc(
    root: str | Path,
    *,
    num_train: int,
    num_test: int,
    seed: int = 0,
    image_size: tuple[int, int] = (320, 240),
    max_objects: int = 4,
    classes: Sequence[str] = SHAPE_CLASSES,
) -> dict:
    """Write a VOC directory under ``root``; ``image_size`` is ``(width, height)``.

    ``num_train`` images form trainval (ids 000001...), split deterministically into val (~20%)
    and train; ``num_test`` images follow with the next ids. Writes JPEGImages/, Annotations/,
    ImageSets/Main/ (split and per-class files), SegmentationObject/ (uint8 PNG: 0 background,
    k = k-th object in the XML) and SegmentationClass/ (uint8 PNG: 0 background, 1 + class index).
    Returns counts per split: ``images``, ``objects`` per class, ``difficult``, ``truncated`` and
    ``occluded`` (partly hidden by a later object).
    """
    width, height = image_size
    unknown = [c for c in classes if c not in SHAPE_CLASSES]
    if not classes or unknown or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be distinct names from {SHAPE_CLASSES}, got {classes}")
    if min(width, height) < 64:
        raise ValueError(f"image_size {image_size} too small; both sides must be >= 64 px")
    if not 1 <= max_objects <= 254:  # instance indices are uint8 PNG values
        raise ValueError(f"max_objects must be in 1..254, got {max_objects}")
    if num_train < 0 or num_test < 0 or num_train + num_test > 999_999 or seed < 0:
        raise ValueError("need 0 <= num_train + num_test <= 999999 images and seed >= 0")

    root = Path(root)
    for sub in ("JPEGImages", "Annotations", "SegmentationObject", "SegmentationClass"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    objects: dict[str, list[VOCObject]] = {}
    occluded: dict[str, int] = {}
    for number in range(1, num_train + num_test + 1):
        image_id = f"{number:06d}"
        rng = np.random.default_rng([seed, number])  # image content depends on (seed, id) only
        image, index, objects[image_id], occluded[image_id] = _render(
            rng, classes, width, height, max_objects
        )
        class_of = np.array([0] + [1 + classes.index(o.name) for o in objects[image_id]], np.uint8)
        jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])[1]
        (root / "JPEGImages" / f"{image_id}.jpg").write_bytes(jpeg.tobytes())
        cv2.imwrite(str(root / "SegmentationObject" / f"{image_id}.png"), index)
        cv2.imwrite(str(root / "SegmentationClass" / f"{image_id}.png"), class_of[index])
        write_annotation(
            root / "Annotations" / f"{image_id}.xml", image_id, width, height,
            objects[image_id], segmented=True,
        )  # fmt: skip

    trainval = [f"{n:06d}" for n in range(1, num_train + 1)]
    num_val = int(round(VAL_FRAC * num_train))
    val_pick = np.random.default_rng([seed, 0]).permutation(num_train)[:num_val]
    val = [trainval[i] for i in sorted(val_pick)]
    splits = {
        "train": [i for i in trainval if i not in val],
        "val": val,
        "trainval": trainval,
        "test": [f"{n:06d}" for n in range(num_train + 1, num_train + num_test + 1)],
    }
    _write_split_files(root / "ImageSets" / "Main", splits, objects, classes)

    def per_split(count) -> dict[str, int]:
        return {split: sum(count(i) for i in ids) for split, ids in splits.items()}

    return {
        "root": str(root),
        "classes": list(classes),
        "image_size": [width, height],
        "seed": seed,
        "images": {split: len(ids) for split, ids in splits.items()},
        "objects": {
            split: {c: sum(o.name == c for i in ids for o in objects[i]) for c in classes}
            for split, ids in splits.items()
        },
        "difficult": per_split(lambda i: sum(o.difficult for o in objects[i])),
        "truncated": per_split(lambda i: sum(o.truncated for o in objects[i])),
        "occluded": per_split(lambda i: occluded[i]),
    }
