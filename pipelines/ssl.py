"""Learning to weight unlabeled data — Ren, Yeh & Schwing, "Not All Unlabeled Data are Equal:
Learning to Weight Data in Semi-supervised Learning", NeurIPS 2020 (arXiv 2007.01293; REFERENCE §5).

FixMatch with one weight λ_u per unlabeled example, learned by influence-function hypergradients on
the last layer (inner step: SGD on θ with the current λ; outer step every ``inner_steps``: masked
Adam on the λ of the current batch), against the simpler alternatives: uniform λ (FixMatch), one
scalar λ tuned on validation data by a Tune sweep, MC-dropout confidence weights, supervised only.

Steps: ``dataset`` (CIFAR-10 binary, a generated CIFAR-10-format set, or scikit-learn's digits) →
``train_<method>`` (Ray Train, N workers; every labelled-set size × seed in turn) and
``scalar_sweep`` (Ray Tune over labelled sizes × seeds × λ) → ``report`` (``results.parquet``,
``metrics.json``, ``report.md``: median of the last k evaluations per run, mean ± spread over seeds,
λ histograms, λ vs pseudo-label correctness, outer/inner step cost).

Commands::

    paperline run ssl                      # preset tiny: digits, small conv net, embedded Ray
    paperline run ssl --preset ci          # what the test suite runs
    paperline run ssl --preset paper --set data.root=/data/cifar-10-batches-bin --address auto
    paperline run ssl --set weights.outer_lr=0.05      # recomputes train_learned and the report
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from cluster.resources import Resources
from cluster.space import Grid
from pipelines.config import check
from pipelines.engine import Step, StepContext
from pipelines.registry import PipelineSpec
from pipelines.ssl_report import write_report


@dataclass(frozen=True)
class DataConfig:
    source: Literal["cifar10", "synthetic", "digits"] = "cifar10"  # §5: CIFAR-10 (and SVHN)
    root: str = ""  # directory of CIFAR-10 binary batches (source=cifar10); never downloaded
    digits_size_px: int = 16  # source=digits: 8x8 originals resized
    digits_test: int = 497  # source=digits: images held out as the test split
    num_train: int = 5000  # source=synthetic: generated CIFAR-10-format set
    num_test: int = 1000
    seed: int = 0

    def __post_init__(self):
        check(self.digits_size_px >= 8, "data.digits_size_px must be >= 8")
        check(0 < self.digits_test < 1797, "data.digits_test must be in (0, 1797)")
        check(
            self.num_train >= 100 and self.num_test >= 10, "data.num_train >= 100, num_test >= 10"
        )
        check(
            not self.root or self.source not in ("synthetic", "digits"),
            f"data.root is only read by real sources; data.source={self.source} would ignore "
            f"{self.root!r} (set data.source=cifar10 to read it)",
        )


@dataclass(frozen=True)
class ExperimentConfig:
    labels_per_class: tuple[int, ...] = (25, 100, 400)  # CIFAR-10 with 250 / 1000 / 4000 labels
    val_per_class: int = 100  # 1000 training images held out as labelled validation (code)
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = ("supervised", "uniform", "scalar", "mcdropout", "learned")
    num_workers: int = 1  # Ray Train workers per training step (DDP; λ updates all-reduced)
    cpus_per_worker: int = 4  # augmentation runs on the CPU beside each GPU worker

    def __post_init__(self):
        from stages.ssl.train import METHODS

        check(all(n >= 1 for n in self.labels_per_class), "experiment.labels_per_class >= 1")
        check(self.val_per_class >= 1, "experiment.val_per_class must be >= 1")
        check(len(self.seeds) >= 1, "experiment.seeds must name at least one seed")
        bad = [m for m in self.methods if m not in METHODS]
        check(not bad and self.methods, f"experiment.methods must be among {METHODS}, got {bad}")
        check(self.num_workers >= 1 and self.cpus_per_worker >= 1, "experiment.num_workers >= 1")


@dataclass(frozen=True)
class FixMatchConfig:
    model: str = "wrn_28_2"  # §5 setup (code): WRN-28-2
    widths: tuple[int, ...] = ()  # ssl_convnet only: conv widths (empty = its default)
    steps: int = 2**20  # FixMatch's 2^20 iterations
    batch_size: int = 64  # labelled; unlabeled = mu · batch_size
    mu: int = 7
    lr: float = 0.03  # cosine decay
    weight_decay: float = 5e-4
    threshold: float = 0.95
    unlabeled_coef: float = 1.0
    ema_decay: float = 0.999
    flip: bool = True  # weak augmentation (off for digits: a flipped digit is another symbol)
    translate_frac: float = 0.125
    ra_ops: int = 2
    ra_bins: int = 10
    ra_group: int = 1  # images per RandAugment draw (1 = per image, as FixMatch)
    cutout_frac: float = 0.5
    eval_every: int = 1024  # FixMatch's "epoch" of 1024 iterations
    last_k: int = 20  # metric: median accuracy of the last 20 checkpoints

    def __post_init__(self):
        check(self.steps >= 1 and self.batch_size >= 1 and self.mu >= 1, "fixmatch sizes >= 1")
        check(
            0 <= self.threshold <= 1, f"fixmatch.threshold must be in [0, 1], got {self.threshold}"
        )
        check(0 <= self.ema_decay < 1, "fixmatch.ema_decay must be in [0, 1)")
        check(self.eval_every >= 1 and self.last_k >= 1, "fixmatch.eval_every/last_k >= 1")
        check(self.ra_group >= 1, "fixmatch.ra_group must be >= 1")


@dataclass(frozen=True)
class WeightsConfig:
    inner_steps: int = 512  # θ steps per λ update (paper's runs)
    outer_lr: float = 0.01  # masked Adam, β = (0.9, 0.999); λ starts at 1, clipped to [0, 2]
    damping: float = 0.0  # on top of the L2 term, which already damps the last-layer Hessian
    val_batch: int = 0  # validation examples per outer step (0 = all)
    lambda_snapshots: int = 5

    def __post_init__(self):
        check(self.inner_steps >= 1, "weights.inner_steps must be >= 1")
        check(self.outer_lr >= 0 and self.damping >= 0, "weights.outer_lr/damping must be >= 0")


@dataclass(frozen=True)
class BaselineConfig:
    # scalar λ candidates for the Tune sweep; λ = 1 comes from train_uniform when it runs
    scalar_grid: tuple[float, ...] = (0.25, 0.5, 2.0, 4.0)
    mc_samples: int = 8  # MC-dropout passes over the head
    mc_dropout: float = 0.5

    def __post_init__(self):
        check(all(w >= 0 for w in self.scalar_grid), "baselines.scalar_grid must be >= 0")
        check(self.mc_samples >= 1 and 0 <= self.mc_dropout < 1, "baselines.mc_* out of range")


@dataclass(frozen=True)
class SSLConfig:
    data: DataConfig = field(default_factory=DataConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    fixmatch: FixMatchConfig = field(default_factory=FixMatchConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)


_SMALL_CPU = {
    "data.source": "digits",
    "experiment.labels_per_class": (4, 25, 100),
    "experiment.val_per_class": 10,
    "experiment.seeds": (0, 1),
    "experiment.cpus_per_worker": 1,
    "fixmatch.model": "ssl_convnet",
    "fixmatch.steps": 300,
    "fixmatch.batch_size": 16,
    "fixmatch.mu": 3,
    "fixmatch.lr": 0.1,  # short runs of a small net: 0.03 leaves 4-label digits unconfident
    "fixmatch.ema_decay": 0.95,  # an EMA horizon of ~7 % of a 300-step run
    "fixmatch.flip": False,
    "fixmatch.ra_group": 8,
    "fixmatch.eval_every": 30,
    "fixmatch.last_k": 3,
    "weights.inner_steps": 1,  # so each λ is updated ~10 times in 300 steps (paper: ~18)
    "baselines.scalar_grid": (0.5, 2.0),
}
PRESETS = {
    # bundled digits, a small conv net: minutes on 2 cores (train steps: 2 DDP workers, 1 CPU each)
    "tiny": {**_SMALL_CPU, "experiment.num_workers": 2},
    # one labelled size, one seed, few steps: what the test suite affords
    "ci": {
        **_SMALL_CPU,
        "experiment.labels_per_class": (4,),
        "experiment.seeds": (0,),
        "fixmatch.steps": 60,  # enough for the first confident pseudo-labels
        "fixmatch.eval_every": 10,
        "fixmatch.last_k": 2,
        "fixmatch.ema_decay": 0.9,
        "baselines.scalar_grid": (0.5,),
    },
    # CIFAR-10 binary at --set data.root=..., WRN-28-2, GPU workers: the paper's setting
    "paper": {"data.source": "cifar10"},
}


# ----------------------------------------------------------------------------------------------
def make_dataset(
    ctx: StepContext,
    *,
    source: str,
    root: str,
    digits_size_px: int,
    digits_test: int,
    num_train: int,
    num_test: int,
    seed: int,
) -> None:
    """``data.npz``: uint8 ``train_images (N, C, H, W)``, ``train_labels (N,)``, test likewise."""
    from data.cifar import read_cifar10

    if source == "digits":
        from data.digits import load_digits

        images, labels = load_digits(digits_size_px)
        perm = np.random.default_rng(seed).permutation(len(labels))
        te, tr = perm[:digits_test], perm[digits_test:]
        splits = {"train": (images[tr, None], labels[tr]), "test": (images[te, None], labels[te])}
    else:
        if source == "synthetic":
            from data.synthetic_cifar import generate_cifar10

            root = str(ctx.out_dir / "cifar10")
            generate_cifar10(root, n_train=num_train, n_test=num_test, seed=seed)
        elif not root:
            raise ValueError("data.root: set it to a directory of CIFAR-10 binary batches")
        splits = {}
        for split in ("train", "test"):
            images, labels = read_cifar10(root, split)  # (N, 32, 32, 3) RGB
            splits[split] = (np.ascontiguousarray(images.transpose(0, 3, 1, 2)), labels)
    arrays = {
        f"{s}_{k}": v for s, (x, y) in splits.items() for k, v in (("images", x), ("labels", y))
    }
    np.savez(ctx.out_dir / "data.npz", **arrays)
    ctx.write_json(
        "metrics.json",
        {"dataset_train": len(arrays["train_labels"]), "dataset_test": len(arrays["test_labels"])},
    )


def train_method(
    ctx: StepContext, *, settings: dict, runs: list, val_per_class: int, num_workers: int
) -> None:
    """Every (labelled size, seed) run of one method in one Ray Train job; rows → ``runs.pt``."""
    import torch

    from stages.ssl.train import ssl_train_fn

    config = {
        "settings": settings,
        "runs": runs,
        "val_per_class": val_per_class,
        "data_path": str(ctx.input_dir("dataset") / "data.npz"),
    }
    result = ctx.train(ssl_train_fn, config, num_workers=num_workers)
    torch.save(result.checkpoint["results"], ctx.out_dir / "runs.pt")


def scalar_trial(config: dict, report, *, data_path: str, settings: dict, val_per_class: int):
    """Tune trainable: one scalar-λ run in-process; reports its numeric results."""
    import torch

    from stages.ssl.train import TrainSettings, train_run
    from stages.training.context import LocalTrainContext

    with np.load(data_path) as f:
        data = {k: f[k] for k in f.files}
    s = TrainSettings(**{**settings, "scalar_weight": float(config["scalar_weight"])})
    row = train_run(  # the trial's GPU where Tune gave it one (the step asks for gpus="auto")
        LocalTrainContext(device="cuda" if torch.cuda.is_available() else "cpu"),
        data,
        s,
        labels_per_class=int(config["labels_per_class"]),
        val_per_class=val_per_class,
        seed=int(config["seed"]),
    )
    report({k: v for k, v in row.items() if isinstance(v, int | float | str)})


def sweep_scalar(
    ctx: StepContext,
    *,
    settings: dict,
    labels_per_class: tuple[int, ...],
    seeds: tuple[int, ...],
    grid: tuple[float, ...],
    val_per_class: int,
) -> None:
    """Tune over labelled size × seed × λ; the report picks λ per size on validation accuracy."""
    trainable = functools.partial(
        scalar_trial,
        data_path=str(ctx.input_dir("dataset") / "data.npz"),
        settings=settings,
        val_per_class=val_per_class,
    )
    space = {
        "labels_per_class": Grid(tuple(labels_per_class)),
        "seed": Grid(tuple(seeds)),
        "scalar_weight": Grid(tuple(grid)),
    }
    trials = ctx.sweep(trainable, space, metric="val_accuracy", mode="max")
    failed = [t for t in trials if t["error"]]
    if failed:
        raise RuntimeError(f"{len(failed)} scalar-λ trials failed; first: {failed[0]['error']}")
    rows = [{**t["metrics"], **{k: t["config"][k] for k in space}} for t in trials]
    (ctx.out_dir / "trials.json").write_text(json.dumps(rows, indent=1, default=float))


def _scalar_grid(cfg: SSLConfig) -> tuple[float, ...]:
    """The scalar-λ sweep's values. λ = 1 is FixMatch itself, so with one training worker the
    report reuses the uniform runs as that candidate; with several, the uniform runs train
    differently from the single-process Tune trials (half batches, per-worker BatchNorm
    statistics), so the sweep trains λ = 1 itself and every candidate is trained alike."""
    grid = cfg.baselines.scalar_grid
    if cfg.experiment.num_workers > 1 and 1.0 not in grid:
        grid = (*grid, 1.0)
    return grid


def _settings(cfg: SSLConfig, method: str) -> dict:
    """The run settings of one method; knobs it does not use stay at their defaults, so changing
    them leaves its artifact cached."""
    from stages.ssl.train import TrainSettings

    f, w, b = cfg.fixmatch, cfg.weights, cfg.baselines
    s = TrainSettings(
        method=method,
        model=f.model,
        model_kwargs=(("widths", f.widths),) if f.widths else (),
        steps=f.steps,
        batch_size=f.batch_size,
        mu=f.mu,
        lr=f.lr,
        weight_decay=f.weight_decay,
        threshold=f.threshold,
        unlabeled_coef=f.unlabeled_coef,
        ema_decay=f.ema_decay,
        flip=f.flip,
        translate_frac=f.translate_frac,
        ra_ops=f.ra_ops,
        ra_bins=f.ra_bins,
        ra_group=f.ra_group,
        cutout_frac=f.cutout_frac,
        eval_every=f.eval_every,
        last_k=f.last_k,
    )
    if method == "learned":
        s = dataclasses.replace(
            s,
            inner_steps=w.inner_steps,
            outer_lr=w.outer_lr,
            damping=w.damping,
            val_batch=w.val_batch,
            lambda_snapshots=w.lambda_snapshots,
        )
    if method == "mcdropout":
        s = dataclasses.replace(s, mc_samples=b.mc_samples, mc_dropout=b.mc_dropout)
    return dataclasses.asdict(s)


def steps(cfg: SSLConfig) -> list[Step]:
    d, e = cfg.data, cfg.experiment
    data_params = dict(source=d.source, root="", digits_size_px=0, digits_test=0, num_train=0,
                       num_test=0, seed=0)  # fmt: skip
    if d.source == "digits":
        data_params.update(digits_size_px=d.digits_size_px, digits_test=d.digits_test, seed=d.seed)
    elif d.source == "synthetic":
        data_params.update(num_train=d.num_train, num_test=d.num_test, seed=d.seed)
    else:
        data_params.update(root=d.root)
    resources = Resources(cpus=e.cpus_per_worker, gpus="auto")
    runs = [{"labels_per_class": n, "seed": s} for n in e.labels_per_class for s in e.seeds]
    out = [
        Step("dataset", make_dataset, kind="task", params=data_params,
             description="read or generate the image set; uint8 arrays in data.npz"),
    ]  # fmt: skip
    trained = [m for m in e.methods if m != "scalar"]
    for method in trained:
        out.append(
            Step(
                f"train_{method}",
                train_method,
                kind="train",
                inputs=("dataset",),
                params=dict(
                    settings=_settings(cfg, method),
                    runs=runs,
                    val_per_class=e.val_per_class,
                    num_workers=e.num_workers,
                ),
                resources=resources,
                description=f"{method}: every labelled size × seed under Ray Train",
            )
        )
    if "scalar" in e.methods:
        out.append(
            Step(
                "scalar_sweep",
                sweep_scalar,
                kind="sweep",
                inputs=("dataset",),
                params=dict(
                    settings=_settings(cfg, "scalar"),
                    labels_per_class=e.labels_per_class,
                    seeds=e.seeds,
                    grid=_scalar_grid(cfg),
                    val_per_class=e.val_per_class,
                ),
                resources=Resources(cpus=e.cpus_per_worker, gpus="auto"),
                description="one scalar λ for all unlabeled examples, tuned on validation (Tune)",
            )
        )
    out.append(
        Step(
            "report",
            write_report,
            kind="task",
            version="3",
            inputs=(
                "dataset",
                *(f"{m}=train_{m}" for m in trained),
                *(("scalar=scalar_sweep",) if "scalar" in e.methods else ()),
            ),
            params=dict(
                methods=e.methods,
                source=d.source,
                model=cfg.fixmatch.model,
                steps=cfg.fixmatch.steps,
                last_k=cfg.fixmatch.last_k,
                inner_steps=cfg.weights.inner_steps,
            ),
            publish=(
                "report.md",
                "results.parquet",
                "lambda_hist.png",
                "accuracy.png",
                "lambda_vs_correct.png",
            ),
            description="table over methods × labels × seeds, λ analysis, outer-step cost",
        )  # fmt: skip
    )
    return out


PIPELINE = PipelineSpec(
    name="ssl",
    summary="Learned per-example weights for unlabeled data (Ren et al. 2020) vs FixMatch",
    config=SSLConfig,
    presets=PRESETS,
    default_preset="tiny",
    steps=steps,
    metric="accuracy_learned",
)
