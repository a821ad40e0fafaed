"""The dataset step: CIFAR-10 binary at ``data.root``, or a generated set in that format."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.engine import StepContext


# ----------------------------------------------------------------------------------------------
# dataset
def make_dataset(ctx: StepContext, *, root: str, num_train: int, num_test: int, seed: int) -> None:
    """Generate the set (no root) or check the real one. ``dataset.json`` says where it is and how
    many images of each split the training steps use: with a root, the first ``num_train`` /
    ``num_test`` (0 = all; more than the split holds = all of it)."""
    from data.cifar import read_cifar10
    from data.synthetic_cifar import generate_cifar10

    if root:
        source = str(Path(root).expanduser().resolve())
        total = {s: len(read_cifar10(source, s)[1]) for s in ("train", "test")}  # fails early
        wanted = {"train": num_train, "test": num_test}
        n = {s: min(wanted[s], total[s]) if wanted[s] else total[s] for s in total}
        info = {"root_num_train": total["train"], "root_num_test": total["test"]}
    else:
        source = str(generate_cifar10(ctx.out_dir / "cifar", num_train, num_test, seed))
        n, info = {"train": num_train, "test": num_test}, {}
    info |= {"root": source, "generated": not root, "num_train": n["train"], "num_test": n["test"]}
    ctx.write_json("dataset.json", info)


def dataset_info(ctx: StepContext) -> dict:
    """``dataset.json`` of the ``dataset`` input, with ``root`` the directory to read."""
    info = json.loads((ctx.input_dir("dataset") / "dataset.json").read_text())
    if info["generated"]:  # relative to the artifact: its staging directory was renamed
        info["root"] = str(ctx.input_dir("dataset") / "cifar")
    return info


def dataset_root(ctx: StepContext) -> str:
    return dataset_info(ctx)["root"]
