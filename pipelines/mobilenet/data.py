"""The dataset step: CIFAR-10 binary (or MNIST-format IDX: Fashion-MNIST) at ``data.root``, or a
generated CIFAR-10-format set."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.engine import StepContext


# ----------------------------------------------------------------------------------------------
# dataset
def make_dataset(
    ctx: StepContext,
    *,
    root: str,
    num_train: int,
    num_test: int,
    seed: int,
    source: str = "cifar10",
) -> None:
    """Generate the set (no root) or check the real one. ``dataset.json`` says where it is, its
    ``format`` (``cifar10`` or ``mnist``: IDX files, grey 28 px) and how many images of each split
    the training steps use: with a root, the first ``num_train`` / ``num_test`` (0 = all; more
    than the split holds = all of it)."""
    from data.cifar import read_cifar10
    from data.mnist import read_mnist
    from data.synthetic_cifar import generate_cifar10

    read = read_mnist if source == "mnist" else read_cifar10
    if root:
        root_dir = str(Path(root).expanduser().resolve())
        total = {s: len(read(root_dir, s)[1]) for s in ("train", "test")}  # fails early
        wanted = {"train": num_train, "test": num_test}
        n = {s: min(wanted[s], total[s]) if wanted[s] else total[s] for s in total}
        info = {"root_num_train": total["train"], "root_num_test": total["test"]}
        if source != "cifar10":  # cached cifar10 artifacts have no "format": it is the default
            info["format"] = source
    else:
        root_dir = str(generate_cifar10(ctx.out_dir / "cifar", num_train, num_test, seed))
        n, info = {"train": num_train, "test": num_test}, {}
    info |= {
        "root": root_dir,
        "generated": not root,
        "num_train": n["train"],
        "num_test": n["test"],
    }
    ctx.write_json("dataset.json", info)


def dataset_info(ctx: StepContext) -> dict:
    """``dataset.json`` of the ``dataset`` input, with ``root`` the directory to read."""
    info = json.loads((ctx.input_dir("dataset") / "dataset.json").read_text())
    if info["generated"]:  # relative to the artifact: its staging directory was renamed
        info["root"] = ctx.input_file("dataset", "cifar")  # resolved where it is read
    return info


def dataset_root(ctx: StepContext) -> str:
    return dataset_info(ctx)["root"]
