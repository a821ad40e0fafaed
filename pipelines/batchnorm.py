"""Batch Normalization — Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training
by Reducing Internal Covariate Shift", ICML 2015 (arXiv 1502.03167). REFERENCE §2.

Steps: ``mnist_data`` / ``cifar_data`` (datasets) → ``mnist`` (§4.1, Figure 1: the 3×100 sigmoid
MLP with and without BN; Tune sweep over BN × seed) → ``variants`` (§4.2, Figures 2 and 3: Baseline,
BN-Baseline, BN-x5, BN-x30, BN-x5-Sigmoid, Baseline-Sigmoid on a small Inception-style net and a
CIFAR-10-format set; Tune sweep over variant × seed) → ``batch_size`` (the summary's criticism: BN vs
no BN down to minibatches of 1–2, train-mode vs inference-mode accuracy; Tune sweep) →
``multi_worker`` (Ray Train, 2 workers: per-worker vs synchronised BN statistics) → ``report``
(metrics.json, curves.parquet, report.md with Figures 1–3 beside the paper's numbers). Step
adaptors here; the report writer in ``batchnorm_report.py``; the BN layer in
``stages/models/batchnorm.py``; the loops in ``stages/training/bn_experiments.py``.

Choices where the paper is silent: plain SGD (no momentum) at lr 0.5 for both MNIST nets (the
paper names no optimiser), initial weights N(0, 0.1²) ("small random Gaussian"), ε = 1e-5, moving
averages (momentum 0.1) for inference during training and Algorithm 2's exact population
statistics for the final numbers; SGD with momentum 0.9 for the conv variants.

Commands::

    paperline run batchnorm                      # preset tiny: digits + generated CIFAR set
    paperline run batchnorm --preset ci          # what the test suite runs
    paperline run batchnorm --preset paper --set data.root=/data/mnist \
        --set data.cifar_root=/data/cifar-10-batches-bin --address auto
    paperline run batchnorm --until mnist --set mnist.steps=3000   # Figure 1 only
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.resources import Resources
from cluster.space import Grid
from pipelines.config import check
from pipelines.engine import Step, StepContext
from pipelines.registry import PipelineSpec
from stages.training.bn_experiments import (
    batch_size_trial,
    is_final_record,
    mnist_trial,
    variant_trial,
)


# ----------------------------------------------------------------------------------------------
# Config: defaults are the paper's setting; presets are small deltas.
@dataclass(frozen=True)
class DataConfig:
    root: str = ""  # §4.1 MNIST IDX directory; "" = scikit-learn's digits resized to 28×28
    digits_test: int = 500  # digits held out as the test set (of 1797; digits only)
    cifar_root: str = ""  # CIFAR-10 binary batches (§4.2 stand-in); "" = a generated set
    cifar_train: int = 5000  # size of the generated CIFAR-format set
    cifar_test: int = 1000
    seed: int = 0

    def __post_init__(self):
        check(0 < self.digits_test < 1797, "data.digits_test must be in (0, 1797)")
        check(self.cifar_train >= 10 and self.cifar_test >= 10, "data.cifar_train/test >= 10")


@dataclass(frozen=True)
class MnistConfig:
    enabled: bool = True
    steps: int = 50_000  # §4.1
    batch_size: int = 60  # §4.1
    optimizer: Literal["sgd", "adam"] = "sgd"  # not stated in the paper (our choice)
    lr: float = 0.5  # not stated; the same for both nets
    init_std: float = 0.1  # "small random Gaussian values" (§4.1); σ is our choice
    hidden: tuple[int, ...] = (100, 100, 100)  # §4.1
    eval_every: int = 500
    probe_size: int = 500  # the fixed probe batch: the first test images
    probe_unit: int = 0  # the "typical" last-hidden-layer sigmoid of Fig. 1(b, c)
    seeds: tuple[int, ...] = (0,)
    bn_kind: Literal["ours", "torch"] = "ours"
    population_batches: int = 100  # Algorithm 2: training minibatches for E[x], Var[x]

    def __post_init__(self):
        check(self.steps >= 1 and self.eval_every >= 1, "mnist.steps/eval_every must be >= 1")
        check(self.batch_size >= 1 and self.lr > 0, "mnist.batch_size >= 1, mnist.lr > 0")
        check(len(self.seeds) >= 1 and len(self.hidden) >= 1, "mnist.seeds/hidden: at least one")
        check(0 <= self.probe_unit < self.hidden[-1], "mnist.probe_unit must index a last unit")
        check(self.probe_size >= 2, "mnist.probe_size must be >= 2")


@dataclass(frozen=True)
class VariantsConfig:
    enabled: bool = True
    # §4.2 / Figure 3 rows; Baseline-Sigmoid is the text's "Inception with sigmoid"
    variants: tuple[str, ...] = (
        "Baseline", "BN-Baseline", "BN-x5", "BN-x30", "BN-x5-Sigmoid", "Baseline-Sigmoid",
    )  # fmt: skip
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 20_000
    batch_size: int = 32  # §4.2
    lr: float = 0.01  # Baseline's lr (SGD, momentum 0.9); the paper's 0.0015 is Inception's
    momentum: float = 0.9
    weight_decay: float = 4e-5
    dropout: float = 0.4  # GoogLeNet's dropout before the classifier
    lrn: bool = True  # GoogLeNet's local response normalisation
    lr_decay_rate: float = 0.96  # exponential decay per lr_decay_steps (Inception)
    lr_decay_steps: int = 2000  # "accelerated" variants decay 6× faster (§4.2.1)
    width: float = 1.0  # SmallInception channel multiplier
    image_px: int = 32  # CIFAR images resized to this side (area), 32 = native
    eval_every: int = 500
    max_train: int = 0  # 0 = every training image
    max_test: int = 0

    def __post_init__(self):
        unknown = set(self.variants) - set(VARIANTS)
        check(not unknown, f"variants.variants: unknown {sorted(unknown)}; valid: {list(VARIANTS)}")
        check("Baseline" in self.variants, "variants.variants must include Baseline (the target)")
        check(self.steps >= 1 and self.eval_every >= 1, "variants.steps/eval_every >= 1")
        check(self.lr > 0 and 0 <= self.dropout < 1, "variants.lr > 0, variants.dropout in [0, 1)")
        check(
            8 <= self.image_px <= 32, f"variants.image_px must be in [8, 32], got {self.image_px}"
        )


# name -> (lr multiple, BN, nonlinearity, "accelerating BN networks" changes of §4.2.1)
VARIANTS: dict[str, tuple[float, bool, str, bool]] = {
    "Baseline": (1, False, "relu", False),
    "BN-Baseline": (1, True, "relu", False),
    "BN-x5": (5, True, "relu", True),
    "BN-x30": (30, True, "relu", True),
    "BN-x5-Sigmoid": (5, True, "sigmoid", True),
    "Baseline-Sigmoid": (1, False, "sigmoid", False),
}


@dataclass(frozen=True)
class BatchSizeConfig:
    enabled: bool = True
    sizes: tuple[int, ...] = (1, 2, 4, 16, 60)  # down to the summary's "minibatch of 1"
    # "examples": every size sees the same training examples (size m runs steps·60/m steps, 60 =
    # mnist.batch_size); "steps": the same number of steps at every size
    budget: Literal["examples", "steps"] = "examples"
    steps: int = 5000  # at m = mnist.batch_size (scaled per size under budget=examples)
    lr: float = 0.5  # the same lr at every size
    eval_every: int = 500
    seeds: tuple[int, ...] = (0,)

    def __post_init__(self):
        check(all(s >= 1 for s in self.sizes) and self.sizes, "batch_size.sizes must be >= 1")
        check(self.steps >= 1 and self.lr > 0, "batch_size.steps >= 1, batch_size.lr > 0")


@dataclass(frozen=True)
class MultiWorkerConfig:
    enabled: bool = True
    num_workers: int = 2  # Ray Train workers (DDP)
    per_worker_batch: int = 30  # 2 × 30 = §4.1's minibatch of 60
    steps: int = 5000
    lr: float = 0.5
    eval_every: int = 500
    seed: int = 0

    def __post_init__(self):
        check(self.num_workers >= 1 and self.per_worker_batch >= 1, "multi_worker sizes >= 1")
        check(self.steps >= 1 and self.lr > 0, "multi_worker.steps >= 1, multi_worker.lr > 0")


@dataclass(frozen=True)
class BatchNormConfig:
    data: DataConfig = field(default_factory=DataConfig)
    mnist: MnistConfig = field(default_factory=MnistConfig)
    variants: VariantsConfig = field(default_factory=VariantsConfig)
    batch_size: BatchSizeConfig = field(default_factory=BatchSizeConfig)
    multi_worker: MultiWorkerConfig = field(default_factory=MultiWorkerConfig)
    # a GPU per sweep trial and per Train worker when the cluster has any ("auto"), or CPU only
    gpus: Literal["none", "auto"] = "none"


PRESETS = {
    # digits + a generated CIFAR-format set; a few minutes on 2 cores
    "tiny": {
        "mnist.steps": 2000,
        "mnist.eval_every": 50,
        "mnist.seeds": (0, 1),
        "mnist.population_batches": 20,
        "variants.steps": 300,
        "variants.eval_every": 25,
        "variants.seeds": (0, 1),
        "variants.lr_decay_steps": 300,
        "variants.width": 0.5,
        "variants.image_px": 16,
        "data.cifar_train": 2000,
        "data.cifar_test": 500,
        "batch_size.sizes": (1, 2, 4, 16, 60),
        "batch_size.steps": 300,
        "batch_size.eval_every": 50,
        "multi_worker.steps": 600,
        "multi_worker.per_worker_batch": 4,
        "multi_worker.eval_every": 100,
    },
    # the size the test suite affords: one seed, short curves
    "ci": {
        "mnist.steps": 300,
        "mnist.eval_every": 25,
        "mnist.population_batches": 10,
        "mnist.probe_size": 200,
        "variants.steps": 40,
        "variants.eval_every": 10,
        "variants.seeds": (0,),
        "variants.lr_decay_steps": 40,
        "variants.width": 0.25,
        "variants.image_px": 16,
        "variants.max_test": 200,
        "data.cifar_train": 400,
        "data.cifar_test": 200,
        "batch_size.sizes": (1, 2, 60),
        "batch_size.budget": "steps",
        "batch_size.steps": 100,
        "batch_size.eval_every": 50,
        "multi_worker.steps": 60,
        "multi_worker.per_worker_batch": 4,
        "multi_worker.eval_every": 30,
    },
    # §4.1 at full length on MNIST (data.root), CIFAR-10 for the variants (data.cifar_root)
    "paper": {"variants.seeds": (0, 1, 2, 3, 4), "gpus": "auto"},
}


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


def cifar_root(dataset_dir: Path) -> str:
    return str(dataset_dir / json.loads((dataset_dir / "meta.json").read_text())["root"])


# ----------------------------------------------------------------------------------------------
# the experiments' trainables (module level: Tune pickles them) and step adaptors


def _sweep(ctx: StepContext, trainable, space: dict) -> list[dict]:
    # concurrent sweep steps take turns inside the Ray executor (Tune's registry is global)
    return ctx.sweep(trainable, space, metric="test_acc", mode="max")


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
    data = str(ctx.input_dir("mnist_data") / "mnist.npz")
    space = {**params, "data_path": data, "bn": Grid((False, True)), "seed": Grid(params["seeds"])}
    del space["seeds"]
    trials = _sweep(ctx, mnist_trial, space)
    write_curves(ctx.out_dir / "curves.parquet", "mnist", trials, _mnist_variant)
    ctx.write_json("finals.json", _finals(trials, _mnist_variant))


def run_variants(
    ctx: StepContext, variants: tuple[str, ...], seeds: tuple[int, ...], **params
) -> None:
    root = cifar_root(ctx.input_dir("cifar_data"))
    settings = {v: variant_settings(v, params) for v in variants}
    space = {
        **params,
        "cifar_root": root,
        "settings": settings,
        "variant": Grid(variants),
        "seed": Grid(seeds),
    }
    trials = _sweep(ctx, variant_trial, space)
    write_curves(ctx.out_dir / "curves.parquet", "variants", trials, lambda c: c["variant"])
    finals = _finals(trials, lambda c: c["variant"])
    ctx.write_json("finals.json", finals)
    ctx.write_json("variant_settings.json", settings)


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
    }


def _bs_variant(c: dict) -> str:
    return f"{'BN' if c['bn'] else 'Baseline'}-m{c['batch_size']}"


def run_batch_size(
    ctx: StepContext, sizes: tuple[int, ...], seeds: tuple[int, ...], **params
) -> None:
    data = str(ctx.input_dir("mnist_data") / "mnist.npz")
    space = {
        **params,
        "data_path": data,
        "batch_size": Grid(sizes),
        "bn": Grid((False, True)),
        "seed": Grid(seeds),
    }
    trials = _sweep(ctx, batch_size_trial, space)
    write_curves(ctx.out_dir / "curves.parquet", "batch_size", trials, _bs_variant)
    ctx.write_json("budget.json", {"budget": params["budget"], "ref_batch": params["ref_batch"]})
    ctx.write_json("finals.json", _finals(trials, _bs_variant))


def run_multi_worker(ctx: StepContext, num_workers: int, **params) -> None:
    from stages.training.bn_experiments import train_data_parallel

    data = str(ctx.input_dir("mnist_data") / "mnist.npz")
    config = {**params, "data_path": data, "sync": [False, True]}
    history = ctx.train(train_data_parallel, config, num_workers=num_workers).history
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


# ----------------------------------------------------------------------------------------------
def steps(cfg: BatchNormConfig) -> list[Step]:
    from pipelines.batchnorm_report import write_report

    d, m, v, b, w = cfg.data, cfg.mnist, cfg.variants, cfg.batch_size, cfg.multi_worker
    # two trials at once on 2 cores; resources are not in the keys (results don't depend on them)
    trial = Resources(cpus=1, gpus="auto" if cfg.gpus == "auto" else 0)
    # fields that don't change a dataset's bytes stay out of its key
    mnist_data = dict(
        root=d.root, digits_test=0 if d.root else d.digits_test, seed=0 if d.root else d.seed
    )
    cifar_data = dict(
        root=d.cifar_root,
        n_train=0 if d.cifar_root else d.cifar_train,
        n_test=0 if d.cifar_root else d.cifar_test,
        seed=0 if d.cifar_root else d.seed,
    )
    mlp = dict(init_std=m.init_std, hidden=m.hidden)
    out = [
        Step(
            "mnist_data",
            make_mnist,
            params=mnist_data,
            description="MNIST IDX or digits → mnist.npz",
        )
    ]
    experiments = []
    if m.enabled:
        params = {f: getattr(m, f) for f in _MNIST_FIELDS}
        out.append(
            Step(
                "mnist",
                run_mnist,
                kind="sweep",
                inputs=("mnist_data",),
                params=params,
                resources=trial,
                description="§4.1 / Fig. 1: sigmoid MLP with vs without BN",
            )
        )
        experiments.append("mnist")
    if v.enabled:
        out.append(Step("cifar_data", make_cifar, params=cifar_data, description="CIFAR-10 binary"))
        out.append(
            Step(
                "variants",
                run_variants,
                kind="sweep",
                inputs=("cifar_data",),
                params={f: getattr(v, f) for f in _VARIANT_FIELDS},
                version="2",  # He-initialised convolutions
                resources=trial,
                description="§4.2 / Figs. 2-3: BN variants on a small Inception-style net",
            )
        )
        experiments.append("variants")
    if b.enabled:
        out.append(
            Step(
                "batch_size",
                run_batch_size,
                kind="sweep",
                inputs=("mnist_data",),
                params=dict(
                    sizes=b.sizes,
                    seeds=b.seeds,
                    budget=b.budget,
                    ref_batch=m.batch_size,
                    steps=b.steps,
                    lr=b.lr,
                    eval_every=b.eval_every,
                    bn_kind=m.bn_kind,
                    **mlp,
                ),
                resources=trial,
                description="BN vs no BN across minibatch sizes; train vs inference mode",
            )
        )
        experiments.append("batch_size")
    if w.enabled:
        out.append(
            Step(
                "multi_worker",
                run_multi_worker,
                kind="train",
                inputs=("mnist_data",),
                params=dict(
                    num_workers=w.num_workers,
                    per_worker_batch=w.per_worker_batch,
                    steps=w.steps,
                    lr=w.lr,
                    eval_every=w.eval_every,
                    seed=w.seed,
                    **mlp,
                ),
                resources=trial,  # per worker
                description="Ray Train DDP: per-worker vs synchronised BN statistics",
            )
        )
        experiments.append("multi_worker")
    out.append(
        Step(
            "report",
            write_report,
            inputs=(*experiments, "mnist_data"),
            params=dict(experiments=tuple(experiments)),
            version="3",  # best accuracy and steps-to-target for every experiment
            publish=REPORT_FILES,
            description="metrics.json, curves.parquet, report.md with Figures 1-3",
        )
    )
    return out


_MNIST_FIELDS = (
    "steps", "batch_size", "optimizer", "lr", "init_std", "hidden", "eval_every", "probe_size",
    "probe_unit", "seeds", "bn_kind", "population_batches",
)  # fmt: skip
_VARIANT_FIELDS = (
    "variants", "seeds", "steps", "batch_size", "lr", "momentum", "weight_decay", "dropout", "lrn",
    "lr_decay_rate", "lr_decay_steps", "width", "image_px", "eval_every", "max_train", "max_test",
)  # fmt: skip
REPORT_FILES = (
    "report.md", "metrics.json", "curves.parquet", "figure1.png", "figure2.png", "batch_size.png",
)  # fmt: skip


PIPELINE = PipelineSpec(
    name="batchnorm",
    summary="Batch Normalization (Ioffe & Szegedy 2015): Fig. 1 MNIST, Figs. 2-3 variants, batch size, DDP",
    config=BatchNormConfig,
    presets=PRESETS,
    default_preset="tiny",
    steps=steps,
    metric="mnist_steps_ratio",
    mode="max",
)
