"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017): 60,000 + 10,000 real 28×28 grey product photos in 10
classes, in MNIST's IDX format (the same four file names, gzipped), so :func:`data.mnist.read_mnist`
reads it. Debian's ``dataset-fashion-mnist`` package installs the files into :data:`DEFAULT_ROOT`;
``make data`` does that (or says where to put the files). Nothing downloads at run time.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)  # fmt: skip
INSTALL_HINT = (
    f"run `make data` (installs Debian's dataset-fashion-mnist into {DEFAULT_ROOT}), or put the "
    "four IDX files (" + ", ".join(f"{f}.gz" for f in FILES) + ") into a directory and set it"
)


def missing_files(root: str | Path) -> list[str]:
    """The IDX files (plain or ``.gz``) missing from ``root``; all four when it is no directory."""
    root = Path(root).expanduser()
    if not root.is_dir():
        return list(FILES)
    return [f for f in FILES if not (root / f).is_file() and not (root / f"{f}.gz").is_file()]


def problem(root: str | Path) -> str | None:
    """Why ``root`` is no MNIST-format IDX directory (a sentence for an error), or None."""
    missing = missing_files(root)
    if not missing:
        return None
    if not Path(root).expanduser().is_dir():
        return f"{root} is not a directory"
    return f"{root} lacks {', '.join(missing)} (plain or .gz)"
