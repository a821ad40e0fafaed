"""A deterministic 10-class image set written in the CIFAR-10 binary format, for demos and tests.

CIFAR-10 itself needs a download; the BN, MobileNetV2, randomization and semi-supervised pipelines
read this set through the same reader (``data.cifar.read_cifar10``) on small presets. Each class is
a shape family (filled disc, ring, square, triangle, cross, horizontal bars, vertical bars, diagonal
bars, checkerboard, star) drawn over a random 32x32 crop of scikit-learn's two bundled sample
photos, with per-image jitter of position, scale, rotation, colour and brightness plus pixel noise,
so that a small CNN learns it in minutes but not in one step, and random labels cannot be told
apart from true ones by a constant.

Image ``i`` of a split depends only on ``(seed, split, i)``: the same arguments give identical files.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import sklearn.datasets

from data.cifar import _SPLIT_FILES, CIFAR10_CLASSES, write_cifar10_batch

SYNTHETIC_CLASSES: tuple[str, ...] = (
    "disc", "ring", "square", "triangle", "cross",
    "hbars", "vbars", "dbars", "checker", "star",
)  # fmt: skip
SIZE = 32
NOISE_STD = 12.0  # per-pixel Gaussian noise, in 0..255 units
_SPLIT_SEED = {"train": 0, "test": 1}


@lru_cache(maxsize=1)
def _backgrounds() -> tuple[np.ndarray, ...]:
    """The sample photos at a quarter size, RGB uint8 (so a 32x32 crop shows texture, not flat sky)."""
    photos = sklearn.datasets.load_sample_images().images
    return tuple(
        cv2.resize(p, (p.shape[1] // 4, p.shape[0] // 4), interpolation=cv2.INTER_AREA)
        for p in photos
    )


def _shape_mask(cls: int, rng: np.random.Generator) -> np.ndarray:
    """bool (32, 32): the class's shape at a random scale, position and rotation."""
    canvas = np.zeros((SIZE * 2, SIZE * 2), np.uint8)  # drawn at 2x, then rotated and shrunk
    c, r = SIZE, int(rng.uniform(0.35, 0.5) * SIZE)
    name = SYNTHETIC_CLASSES[cls]
    if name == "disc":
        cv2.circle(canvas, (c, c), r, 1, -1)
    elif name == "ring":
        cv2.circle(canvas, (c, c), r, 1, max(3, r // 3))
    elif name == "square":
        cv2.rectangle(canvas, (c - r, c - r), (c + r, c + r), 1, -1)
    elif name == "triangle":
        pts = np.array([[c, c - r], [c - r, c + r * 3 // 4], [c + r, c + r * 3 // 4]])
        cv2.fillPoly(canvas, [pts.astype(np.int32)], 1)
    elif name == "cross":
        w = max(3, r // 3)
        cv2.rectangle(canvas, (c - r, c - w), (c + r, c + w), 1, -1)
        cv2.rectangle(canvas, (c - w, c - r), (c + w, c + r), 1, -1)
    elif name in ("hbars", "vbars", "dbars"):
        period = int(rng.integers(8, 13))
        yy, xx = np.mgrid[0 : SIZE * 2, 0 : SIZE * 2]
        coord = {"hbars": yy, "vbars": xx, "dbars": xx + yy}[name]
        canvas[:] = (coord % period) < period // 2
        # bars keep their orientation (it is what tells the three classes apart) up to a tilt
        return _shrink(_rotate(canvas, rng.uniform(-10, 10)), rng)
    elif name == "checker":
        period = int(rng.integers(10, 16))
        yy, xx = np.mgrid[0 : SIZE * 2, 0 : SIZE * 2]
        canvas[:] = ((yy // period) + (xx // period)) % 2
    elif name == "star":
        angles = np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        pts = np.stack([c + radii * np.sin(angles), c - radii * np.cos(angles)], axis=1)
        cv2.fillPoly(canvas, [pts.astype(np.int32)], 1)
    canvas = _rotate(canvas, rng.uniform(0, 360))
    return _shrink(canvas, rng)


def _rotate(canvas: np.ndarray, degrees: float) -> np.ndarray:
    m = cv2.getRotationMatrix2D((SIZE - 0.5, SIZE - 0.5), degrees, 1.0)
    return cv2.warpAffine(canvas, m, canvas.shape[::-1], flags=cv2.INTER_NEAREST)


def _shrink(canvas: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    small = cv2.resize(canvas, (SIZE, SIZE), interpolation=cv2.INTER_NEAREST)
    dx, dy = rng.integers(-5, 6, size=2)
    return np.roll(small, (int(dy), int(dx)), axis=(0, 1)).astype(bool)


def make_image(cls: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 (32, 32, 3) RGB image of class ``cls``."""
    photos = _backgrounds()
    photo = photos[int(rng.integers(len(photos)))]
    y = int(rng.integers(photo.shape[0] - SIZE))
    x = int(rng.integers(photo.shape[1] - SIZE))
    image = photo[y : y + SIZE, x : x + SIZE].astype(np.float32)
    image *= rng.uniform(0.6, 1.2)
    mask = _shape_mask(cls, rng)
    # a class-specific hue with jitter; colour alone is made unreliable by the jitter and by a
    # 25% chance of a random colour, so the shape has to be learnt
    hue = (cls * 18 + rng.normal(0, 6)) % 180 if rng.random() > 0.25 else rng.uniform(0, 180)
    hsv = np.uint8([[[hue, rng.uniform(120, 255), rng.uniform(120, 255)]]])
    colour = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)
    alpha = rng.uniform(0.7, 1.0)
    image[mask] = alpha * colour + (1 - alpha) * image[mask]
    image += rng.normal(0, NOISE_STD, size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def make_split(n: int, split: str = "train", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images ``uint8 (n, 32, 32, 3)`` and balanced labels ``int64 (n,)`` (class i % 10,
    then shuffled)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    labels = np.arange(n, dtype=np.int64) % 10
    np.random.default_rng([seed, _SPLIT_SEED[split], 7]).shuffle(labels)
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i in range(n):
        images[i] = make_image(int(labels[i]), np.random.default_rng([seed, _SPLIT_SEED[split], i]))
    return images, labels


def generate_cifar10(
    root: str | Path, n_train: int = 5000, n_test: int = 1000, seed: int = 0
) -> Path:
    """Write ``data_batch_1..5.bin``, ``test_batch.bin`` and ``batches.meta.txt`` under ``root``
    (readable by ``data.cifar.read_cifar10``). The training images are split evenly over the five
    batches as in CIFAR-10, so ``n_train >= 5`` (one image per batch file) and ``n_test >= 1``.
    Returns ``root``."""
    root = Path(root)
    names = _SPLIT_FILES["train"]
    if n_train < len(names) or n_test < 1:
        raise ValueError(
            f"{root}: a generated CIFAR-10 set needs n_train >= {len(names)} (one image per "
            f"data_batch_*.bin) and n_test >= 1, got n_train={n_train}, n_test={n_test}"
        )
    root.mkdir(parents=True, exist_ok=True)
    images, labels = make_split(n_train, "train", seed)
    for k, part in enumerate(np.array_split(np.arange(n_train), len(names))):
        write_cifar10_batch(root / names[k], images[part], labels[part])
    images, labels = make_split(n_test, "test", seed)
    write_cifar10_batch(root / _SPLIT_FILES["test"][0], images, labels)
    # the real set's label names; the file documents what the synthetic classes are
    (root / "batches.meta.txt").write_text("\n".join(CIFAR10_CLASSES) + "\n")
    (root / "SYNTHETIC.txt").write_text(
        "Generated by data/synthetic_cifar.py; label k is the shape family "
        + ", ".join(f"{k}={name}" for k, name in enumerate(SYNTHETIC_CLASSES))
        + f"; seed={seed}, n_train={n_train}, n_test={n_test}\n"
    )
    return root
