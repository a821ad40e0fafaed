"""The dataset steps: MNIST IDX (or scikit-learn's digits) and CIFAR-10 binary (or a generated set
in that format)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipelines.engine import StepContext


# ----------------------------------------------------------------------------------------------
# datasets
def make_mnist(ctx: StepContext, *, root: str, digits_test: int, seed: int) -> None:
    """``mnist.npz`` (uint8 x_train (N, 28, 28), y_train, x_test, y_test) from MNIST IDX files, or
    scikit-learn's 1797 digits at 28×28 split by ``seed`` into train / ``digits_test`` test."""
    if root:
        from data.mnist import read_mnist

        (x_tr, y_tr), (x_te, y_te) = read_mnist(root, "train"), read_mnist(root, "test")
        source = f"MNIST IDX at {root}"
    else:
        from data.digits import load_digits

        x, y = load_digits(28)
        perm = np.random.default_rng(seed).permutation(len(y))
        te, tr = perm[:digits_test], perm[digits_test:]
        x_tr, y_tr, x_te, y_te = x[tr], y[tr], x[te], y[te]
        source = "scikit-learn digits (UCI optdigits) resized to 28x28"
    np.savez(ctx.out_dir / "mnist.npz", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    ctx.write_json("meta.json", {"source": source, "n_train": len(y_tr), "n_test": len(y_te)})


def make_cifar(ctx: StepContext, *, root: str, n_train: int, n_test: int, seed: int) -> None:
    """The CIFAR-10 binary directory the variant trials read: ``root`` (checked here, before any
    trial starts) or a generated set in that format written into this artifact."""
    from data.cifar import read_cifar10

    if root:
        path, source = Path(root).expanduser().resolve(), f"CIFAR-10 binary at {root}"
    else:
        from data.synthetic_cifar import generate_cifar10

        path = generate_cifar10(ctx.out_dir / "cifar10", n_train, n_test, seed)
        source = "generated CIFAR-10-format set (data/synthetic_cifar.py)"
    sizes = {split: len(read_cifar10(path, split)[1]) for split in ("train", "test")}
    # relative inside the artifact: ctx.out_dir is a staging directory renamed on completion
    where = str(path) if root else "cifar10"
    ctx.write_json("meta.json", {"source": source, "root": where, **sizes})


def cifar_root(ctx: StepContext, name: str):
    """The CIFAR directory of input ``name``: the user's path, or a reference into the artifact
    (a generated set) that each trial resolves on its own node."""
    root = json.loads((ctx.input_dir(name) / "meta.json").read_text())["root"]
    return root if Path(root).is_absolute() else ctx.input_file(name, root)
