"""The dataset steps: the clean set (CIFAR-10 binary / MNIST IDX, or a generated CIFAR-10-format set)
and §2's randomized variants of it, drawn once and saved."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipelines.engine import StepContext


# ----------------------------------------------------------------------------------------------
# Step adaptors: config values in, artifacts out. The computing lives in stages/.
def make_dataset(
    ctx: StepContext, *, source: str, root: str, num_train: int, num_test: int, seed: int
) -> None:
    """Write the clean arrays as uint8 (N, 32, 32, C) .npy (MNIST zero-padded 28 → 32, so every
    source takes App. A's 28x28 crop) and meta.json."""
    if source == "synthetic":
        from data.synthetic_cifar import make_split

        splits = {
            "train": make_split(num_train, "train", seed),
            "test": make_split(num_test, "test", seed),
        }
    else:
        if not root:
            raise ValueError(
                f"data.root: set it to the {source} directory (or data.source=synthetic)"
            )
        if source == "cifar10":
            from data.cifar import read_cifar10 as read
        else:
            from data.mnist import read_mnist as read
        splits = {s: read(root, s) for s in ("train", "test")}
    for split, limit in (("train", num_train), ("test", num_test)):
        x, y = splits[split]
        if x.ndim == 3:  # MNIST (N, 28, 28) → (N, 32, 32, 1)
            x = np.pad(x, ((0, 0), (2, 2), (2, 2)))[..., None]
        if limit and limit < len(x):  # a seeded subset, in the file's order
            keep = np.sort(
                np.random.default_rng([seed, len(split)]).choice(len(x), limit, replace=False)
            )
            x, y = x[keep], y[keep]
        np.save(ctx.out_dir / f"{split}_x.npy", np.ascontiguousarray(x))
        np.save(ctx.out_dir / f"{split}_y.npy", y.astype(np.int64))
        splits[split] = (x, y)
    x, y = splits["train"]
    meta = {"source": source, "num_classes": 10, "in_channels": int(x.shape[-1]),
            "num_train": len(x), "num_test": len(splits["test"][0])}  # fmt: skip
    ctx.write_json("meta.json", meta)


def clean_set(ctx: StepContext) -> tuple[Path, dict]:
    d = ctx.input_dir("dataset")
    return d, json.loads((d / "meta.json").read_text())


def make_randomized(ctx: StepContext, *, variants: tuple, seeds: tuple, seed: int) -> None:
    from stages.generalization.randomize import ARRAYS, save_variants

    d, meta = clean_set(ctx)
    clean = {name: np.load(d / f"{name}.npy") for name in ARRAYS}
    rows = save_variants(
        ctx.out_dir, clean, variants, seeds, num_classes=meta["num_classes"], base_seed=seed
    )
    ctx.write_json("variants.json", rows)
