"""Batch Normalization's experiment steps: the Tune sweeps over the experiments' trainables
(``stages/training/bn_experiments.py``), the Ray Train run of per-worker vs synchronised statistics,
and the curves/finals they write for the report. The variants table is in ``config.py``; every
function here takes explicit arguments."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.space import Grid
from pipelines.batchnorm.config import VARIANTS
from pipelines.batchnorm.data import cifar_root
from pipelines.engine import StepContext

# ----------------------------------------------------------------------------------------------
# the experiments' trainables (module level: Tune pickles them) and step adaptors


def _sweep(ctx: StepContext, trainable, space: dict, memory_mb: int = 0) -> list[dict]:
    # concurrent sweep steps take turns inside the Ray executor (Tune's registry is global)
    return ctx.sweep(trainable, space, metric="test_acc", mode="max", memory_mb=memory_mb)


# what a unit holds of MNIST: the npz's uint8 images, converted to float32 and scaled (two float
# copies at once, 4 bytes each per pixel); CIFAR: float32 at image_px (converted, resized,
# normalised: three copies at the peak) of every image read
MNIST_DATA_COPIES = 1 + 2 * 4
CIFAR_SIZES = {"train": 50_000, "test": 10_000}


def _mnist_mb(ctx: StepContext, hidden, batch: int) -> int:
    """A §4.1 trial's (or worker's) memory request: the data, and the BN network at ``batch``."""
    from pipelines.memory import input_bytes, trainer_mb
    from stages.training.memory import meta_model

    net = meta_model("bn_mnist_mlp", bn=True, hidden=tuple(hidden))
    return trainer_mb([(net, (batch, 28, 28))], data_bytes=input_bytes(ctx, "mnist_data", "mnist.npz"),
                      data_copies=MNIST_DATA_COPIES)  # fmt: skip


def _variants_mb(params: dict) -> int:
    """A §4.2 trial's memory request: CIFAR at ``image_px`` as float32, three copies at the peak,
    and the widest Inception (BN) at the batch."""
    from pipelines.memory import trainer_mb
    from stages.training.memory import meta_model

    px = params["image_px"]
    n = sum(params[f"max_{s}"] or n for s, n in CIFAR_SIZES.items())
    net = meta_model("bn_inception_small", width=params["width"], bn=True)
    return trainer_mb([(net, (params["batch_size"], 3, px, px))], data_bytes=n * 3 * px * px * 4,
                      data_copies=3)  # fmt: skip


CURVES_SCHEMA = pa.schema(
    [
        ("experiment", pa.string()),
        ("variant", pa.string()),
        ("seed", pa.int64()),
        ("step", pa.int64()),
        ("metric", pa.string()),
        ("value", pa.float64()),
    ]
)
CURVE_METRICS = ("test_acc", "train_loss", "p15", "p50", "p85")


def is_final_record(rec: dict) -> bool:
    """The trials' closing record (``final``), as it comes back in Tune's history."""
    return rec.get("final") in (True, 1)  # Tune's history fills missing keys with NaN


def write_curves(path: Path, experiment: str, trials: list[dict], variant_of) -> int:
    """Long-format curves of every trial's reports: (experiment, variant, seed, step, metric, value)."""
    rows = []
    for t in trials:
        if t["error"]:
            continue
        for rec in t["history"]:
            if is_final_record(rec):
                continue
            for metric in CURVE_METRICS:
                value = rec.get(metric)
                if value is not None and np.isfinite(value):
                    rows.append(
                        (experiment, variant_of(t["config"]), int(t["config"]["seed"]),
                         int(rec["step"]), metric, float(value))
                    )  # fmt: skip
    return write_rows(path, rows)


def write_rows(path: Path, rows: list[tuple]) -> int:
    cols = list(zip(*rows, strict=True)) if rows else [[] for _ in CURVES_SCHEMA]
    arrays = [pa.array(c, f.type) for c, f in zip(cols, CURVES_SCHEMA, strict=True)]
    pq.write_table(pa.Table.from_arrays(arrays, schema=CURVES_SCHEMA), path)
    return len(rows)


def _finals(trials: list[dict], variant_of) -> list[dict]:
    out = []
    for t in trials:
        if t["error"]:
            raise RuntimeError(f"trial {t['config']} failed: {t['error']}")
        final = next((r for r in reversed(t["history"]) if is_final_record(r)), {})
        out.append({"variant": variant_of(t["config"]), "seed": int(t["config"]["seed"]),
                    **{k: v for k, v in final.items() if not isinstance(v, dict)}})  # fmt: skip
    return out


def _mnist_variant(c: dict) -> str:
    return "BN" if c["bn"] else "Baseline"


def run_mnist(ctx: StepContext, **params) -> None:
    data = ctx.input_file("mnist_data", "mnist.npz")  # resolved by each trial
    space = {**params, "data_path": data, "bn": Grid((False, True)), "seed": Grid(params["seeds"])}
    del space["seeds"]
    from stages.training.bn_experiments import mnist_trial  # torch: only where the step runs

    mb = _mnist_mb(ctx, params["hidden"], params["batch_size"])
    trials = _sweep(ctx, mnist_trial, space, mb)
    write_curves(ctx.out_dir / "curves.parquet", "mnist", trials, _mnist_variant)
    ctx.write_json("finals.json", _finals(trials, _mnist_variant))


def run_variants(
    ctx: StepContext, variants: tuple[str, ...], seeds: tuple[int, ...], **params
) -> None:
    root = cifar_root(ctx, "cifar_data")
    settings = {v: variant_settings(v, params) for v in variants}
    space = {
        **params,
        "cifar_root": root,
        "settings": settings,
        "variant": Grid(variants),
        "seed": Grid(seeds),
    }
    from stages.training.bn_experiments import variant_trial

    trials = _sweep(ctx, variant_trial, space, _variants_mb(params))
    write_curves(ctx.out_dir / "curves.parquet", "variants", trials, lambda c: c["variant"])
    finals = _finals(trials, lambda c: c["variant"])
    ctx.write_json("finals.json", finals)
    ctx.write_json("variant_settings.json", settings)


# name -> (lr multiple, BN, nonlinearity, "accelerating BN networks" changes of §4.2.1)
def variant_settings(name: str, p: dict) -> dict:
    """Hyper-parameters of a Figure 3 row: BN-x5/x30 get §4.2.1's accelerations."""
    mult, bn, act, fast = VARIANTS[name]
    return {
        "lr": p["lr"] * mult,
        "bn": bn,
        "activation": act,
        "dropout": 0.0 if fast else p["dropout"],  # remove dropout
        "weight_decay": p["weight_decay"] / 5 if fast else p["weight_decay"],  # L2 ÷ 5
        "lr_decay_steps": max(1, p["lr_decay_steps"] // 6) if fast else p["lr_decay_steps"],
        "lrn": False if fast else p["lrn"],  # remove local response normalisation
        # shuffle training examples more thoroughly; reduce the photometric distortions
        "shuffle": "full" if fast else p["shuffle"],
        "distortion": p["distortion"] * p["distortion_reduction"] if fast else p["distortion"],
    }


def _bs_variant(c: dict) -> str:
    return f"{'BN' if c['bn'] else 'Baseline'}-m{c['batch_size']}"


def run_batch_size(
    ctx: StepContext, sizes: tuple[int, ...], seeds: tuple[int, ...], **params
) -> None:
    data = ctx.input_file("mnist_data", "mnist.npz")  # resolved by each trial
    space = {
        **params,
        "data_path": data,
        "batch_size": Grid(sizes),
        "bn": Grid((False, True)),
        "seed": Grid(seeds),
    }
    from stages.training.bn_experiments import batch_size_trial

    trials = _sweep(ctx, batch_size_trial, space, _mnist_mb(ctx, params["hidden"], max(sizes)))
    write_curves(ctx.out_dir / "curves.parquet", "batch_size", trials, _bs_variant)
    ctx.write_json("budget.json", {"budget": params["budget"], "ref_batch": params["ref_batch"]})
    ctx.write_json("finals.json", _finals(trials, _bs_variant))


def run_multi_worker(ctx: StepContext, num_workers: int, **params) -> None:
    from stages.training.bn_experiments import train_data_parallel

    data = ctx.input_file("mnist_data", "mnist.npz")  # resolved by each trial
    config = {**params, "data_path": data, "sync": [False, True]}
    mb = _mnist_mb(ctx, params["hidden"], params["per_worker_batch"])
    history = ctx.train(train_data_parallel, config, num_workers=num_workers, memory_mb=mb).history
    rows, finals, seed = [], [], params["seed"]
    for sync in (False, True):
        variant = "sync" if sync else "per_worker"
        runs = [r for r in history if bool(r["sync"]) == sync]
        rows += [
            ("multi_worker", variant, seed, int(r["step"]), "test_acc", float(r["test_acc"]))
            for r in runs
        ]
        last = runs[-1]
        finals.append(
            {
                "variant": variant,
                "seed": seed,
                **{k: float(last[k]) for k in ("test_acc", "steps_per_s", "train_s")},
                "world_size": int(last["world_size"]),
            }
        )
    write_rows(ctx.out_dir / "curves.parquet", rows)
    ctx.write_json("finals.json", finals)
