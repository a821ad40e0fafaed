"""CIFAR-10, binary version (``cifar-10-binary.tar.gz`` from https://www.cs.toronto.edu/~kriz/cifar.html).

Each batch file is a sequence of 3073-byte records: one label byte, then the 32x32 image as three
row-major planes R, G, B. The Python version of the data set is pickled, and we never unpickle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data.errors import DatasetError

# batches.meta.txt order: label k is CIFAR10_CLASSES[k].
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
RECORD_BYTES = 1 + 3 * 32 * 32
_SPLIT_FILES = {
    "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("test_batch.bin",),
}


def _batch_dir(root: Path, names: tuple[str, ...]) -> Path:
    candidates = (root, root / "cifar-10-batches-bin")
    for directory in candidates:
        if all((directory / name).is_file() for name in names):
            return directory
    for pickled in (root / "data_batch_1", root / "cifar-10-batches-py" / "data_batch_1"):
        if pickled.is_file():
            raise DatasetError(
                pickled,
                "this is the pickled Python version of CIFAR-10, which is not supported (we never "
                "unpickle); expected the binary version (cifar-10-binary.tar.gz, *.bin files)",
            )
    missing = [str(d / n) for d in candidates for n in names if not (d / n).is_file()]
    raise DatasetError(root, f"CIFAR-10 binary batches not found; missing {', '.join(missing)}")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data = path.read_bytes()
    if len(data) == 0 or len(data) % RECORD_BYTES:
        raise DatasetError(
            path,
            f"size {len(data)} bytes is not a positive multiple of {RECORD_BYTES} (1 label byte + "
            f"3072 pixel bytes per record): {len(data) // RECORD_BYTES} whole records and "
            f"{len(data) % RECORD_BYTES} bytes left over; truncated?",
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        raise DatasetError(path, f"label {labels[bad[0]]} in record {bad[0]}; expected 0..9")
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # planes -> (N, H, W, C)
    return np.ascontiguousarray(images), labels


def read_cifar10(root: str | Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 ``split`` ("train": 5 batches, "test"): images ``uint8 (N, 32, 32, 3)`` RGB,
    labels ``int64 (N,)`` indexing :data:`CIFAR10_CLASSES`."""
    if split not in _SPLIT_FILES:
        raise ValueError(f"unknown CIFAR-10 split {split!r}; expected one of {list(_SPLIT_FILES)}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(root, "CIFAR-10 root not found; expected a directory with *.bin batches")
    directory = _batch_dir(root, _SPLIT_FILES[split])
    batches = [_read_batch(directory / name) for name in _SPLIT_FILES[split]]
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def write_cifar10_batch(path: str | Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write one binary batch; inverse of the reader (images ``uint8 (N, 32, 32, 3)`` RGB)."""
    images, labels = np.asarray(images), np.asarray(labels)
    if len(images) == 0:  # the reader refuses an empty batch file, so never write one
        raise ValueError(f"{path}: no images to write; a CIFAR-10 batch needs at least one record")
    if images.dtype != np.uint8 or images.shape[1:] != (32, 32, 3) or images.ndim != 4:
        raise ValueError(f"images must be uint8 (N, 32, 32, 3), got {images.dtype} {images.shape}")
    if labels.shape != (len(images),) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise ValueError(f"labels must be (N,) = ({len(images)},) integers in 0..9")
    records = np.empty((len(images), RECORD_BYTES), dtype=np.uint8)
    records[:, 0] = labels
    records[:, 1:] = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    Path(path).write_bytes(records.tobytes())
