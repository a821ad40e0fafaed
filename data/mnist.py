"""MNIST in its original IDX format (http://yann.lecun.com/exdb/mnist/), plain or gzipped.

An IDX file is a 4-byte magic ``00 00 <dtype code> <ndim>``, then ``ndim`` big-endian uint32
dimensions, then the array in C order, big-endian.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from data.errors import DatasetError

# IDX dtype codes -> big-endian numpy dtypes (the table on the MNIST page).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except OSError as e:  # includes gzip.BadGzipFile
        raise DatasetError(path, f"cannot read IDX file ({e})") from None
    except (EOFError, zlib.error) as e:
        raise DatasetError(path, f"corrupt or truncated gzip stream ({e})") from None


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX array (``.gz`` decompressed on the fly) in native byte order."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DatasetError(path, f"bad magic {data[:4].hex(' ')}; expected 00 00 <dtype> <ndim>")
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        codes = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise DatasetError(path, f"unknown IDX dtype code 0x{code:02X}; expected one of {codes}")
    if ndim == 0:
        raise DatasetError(path, "IDX header declares 0 dimensions; expected at least 1")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(
            path, f"header needs {header} bytes for {ndim} dims, file has {len(data)}"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = len(data) - header
    if found != expected:
        problem = "truncated" if found < expected else "trailing bytes"
        raise DatasetError(
            path,
            f"{problem}: dims {dims} of {dtype.name} need {expected} payload bytes, found {found}",
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))  # a writable native-order copy


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` as IDX (gzipped if ``path`` ends with ``.gz``); inverse of :func:`read_idx`."""
    array = np.asarray(array)
    codes = {dtype.newbyteorder("="): code for code, dtype in IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(f"IDX cannot store dtype {array.dtype}; expected one of {list(codes)}")
    if array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"IDX stores 1 to 255 dimensions, got {array.ndim}")
    header = bytes([0, 0, codes[native], array.ndim]) + np.array(array.shape, ">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=native.newbyteorder(">")).tobytes()
    path = Path(path)
    if path.name.endswith(".gz"):
        # mtime=0 and no file name in the gzip header: the same array gives the same bytes.
        with open(path, "wb") as raw, gzip.GzipFile("", "wb", fileobj=raw, mtime=0) as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _find(root: Path, name: str) -> Path:
    # torchvision keeps the files in <root>/MNIST/raw; the original archive unpacks anywhere.
    candidates = [d / f"{name}{ext}" for d in (root, root / "MNIST" / "raw") for ext in ("", ".gz")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise DatasetError(root, f"MNIST file {name} not found; looked for {tried}")


def read_mnist(root: str | Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """MNIST ``split`` ("train" or "test"): images ``uint8 (N, 28, 28)``, labels ``uint8 (N,)``."""
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"unknown MNIST split {split!r}; expected one of {list(_SPLIT_PREFIX)}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(root, "MNIST root not found; expected a directory with the IDX files")
    prefix = _SPLIT_PREFIX[split]
    images_path = _find(root, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(root, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)

    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DatasetError(
            images_path, f"images are {images.dtype} {images.shape}; expected uint8 (N, 28, 28)"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DatasetError(
            labels_path, f"labels are {labels.dtype} {labels.shape}; expected uint8 (N,)"
        )
    if len(images) != len(labels):
        raise DatasetError(
            labels_path, f"{len(labels)} labels for {len(images)} images in {images_path}"
        )
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        raise DatasetError(
            labels_path, f"label {labels[bad[0]]} at index {bad[0]}; expected digits 0..9"
        )
    return images, labels
