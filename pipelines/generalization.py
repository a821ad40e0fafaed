"""Rethinking generalization — Zhang, Bengio, Hardt, Recht, Vinyals, "Understanding deep learning
requires rethinking generalization", ICLR 2017 (arXiv 1611.03530).

Steps: ``dataset`` (CIFAR-10 binary / MNIST IDX at ``data.root``, or a generated CIFAR-10-format
set) → ``randomize`` (§2's corruptions, drawn once and saved) → ``randomization`` (Tune sweep:
conditions × models × seeds, Figure 1a) → ``corruption`` (Tune sweep: label noise p × models,
Figure 1b/1c) → ``regularizers`` (Tune sweep: weight decay × random crop × dropout, true and random
labels, Table 1) → ``expressivity`` (Theorem 1, §4) → ``min_norm`` (kernel interpolation, §5) →
``report`` (sweep.parquet, curves.parquet, figures, report.md beside the paper's numbers).
``experiments`` picks which of the five run. Adaptors for the sweeps are below; the report in
``generalization_report.py``.

Commands::

    paperline run generalization                     # tiny: generated set, MLPs, minutes on CPU
    paperline run generalization --preset ci         # what the Ray end-to-end test runs
    paperline run generalization --preset paper --set data.root=/data/cifar-10-batches-bin \
        --set min_norm.root=/data/mnist --address auto
"""

from __future__ import annotations

import dataclasses
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
from stages.generalization.randomize import CONDITIONS

MODELS = ("small_inception", "small_inception_no_bn", "small_alexnet", "mlp_3x512", "mlp_1x512")
EXPERIMENTS = ("randomization", "corruption", "regularizers", "expressivity", "min_norm")


@dataclass(frozen=True)
class DataConfig:
    source: Literal["cifar10", "mnist", "synthetic"] = "cifar10"  # §2: CIFAR-10
    root: str = ""  # cifar-10-batches-bin (or MNIST IDX) directory for real sources
    num_train: int = 0  # 0 = the whole split; synthetic: images generated
    num_test: int = 0
    seed: int = 0  # the generated set's seed and the subset draw

    def __post_init__(self):
        check(self.num_train >= 0 and self.num_test >= 0, "data.num_train/num_test must be >= 0")
        check(
            self.source != "synthetic" or (self.num_train > 0 and self.num_test > 0),
            "data.num_train/num_test must be > 0 for the synthetic source",
        )
        check(
            not self.root or self.source not in ("synthetic", "digits"),
            f"data.root is only read by real sources; data.source={self.source} would ignore "
            f"{self.root!r} (set data.source=cifar10 to read it)",
        )


@dataclass(frozen=True)
class TrainConfig:
    models: tuple[str, ...] = MODELS  # App. A
    width: float = 1.0  # channel/unit multiplier (1 = App. A; CPU presets shrink it)
    lr: float = 0.01  # App. A: small AlexNet and MLPs
    lr_inception: float = 0.1  # App. A: small Inception (with and without BN)
    momentum: float = 0.9  # App. A
    lr_decay: float = 0.95  # per epoch, App. A
    batch_size: int = 128
    crop_px: int = 28  # App. A: centre crop 28x28
    max_steps: int = 30_000  # budget (≈77 CIFAR epochs); Fig. 1a fits within ≈25k steps
    target_train_acc: float = 1.0  # §2: "until training accuracy reaches 100%"
    log_every: int = 50  # steps between curve points
    eval_every_epochs: int = 1  # full train-set scoring (also whenever the epoch nears 100%)
    seeds: tuple[int, ...] = (0,)
    cpus_per_trial: float = 1.0
    gpu: bool = True  # one GPU per trial when the cluster has GPUs

    def __post_init__(self):
        check(len(self.models) > 0, "train.models must name at least one model")
        check(self.width > 0, f"train.width must be > 0, got {self.width}")
        check(self.lr > 0 and self.lr_inception > 0, "train.lr/lr_inception must be > 0")
        check(0 <= self.momentum < 1, "train.momentum must be in [0, 1)")
        check(0 < self.lr_decay <= 1, "train.lr_decay must be in (0, 1]")
        check(self.batch_size >= 1 and self.max_steps >= 1 and self.log_every >= 1,
              "train.batch_size/max_steps/log_every must be >= 1")  # fmt: skip
        check(0 < self.target_train_acc <= 1, "train.target_train_acc must be in (0, 1]")
        check(len(self.seeds) > 0, "train.seeds must hold at least one seed")


@dataclass(frozen=True)
class RandomizationConfig:
    conditions: tuple[str, ...] = CONDITIONS  # §2, Figure 1a
    models: tuple[str, ...] = ()  # () = train.models
    seed: int = 0  # base seed of every corruption draw (combined with the trial seed)

    def __post_init__(self):
        bad = set(self.conditions) - set(CONDITIONS)
        check(not bad, f"randomization.conditions: unknown {sorted(bad)}; valid: {CONDITIONS}")


@dataclass(frozen=True)
class CorruptionConfig:
    ps: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # Figure 1b/1c
    models: tuple[str, ...] = ()  # () = train.models

    def __post_init__(self):
        check(all(0 <= p <= 1 for p in self.ps), f"corruption.ps must lie in [0, 1], got {self.ps}")


@dataclass(frozen=True)
class RegularizerConfig:
    models: tuple[str, ...] = ()  # () = train.models
    weight_decays: tuple[float, ...] = (0.0, 5e-4)  # Table 1 "weight decay" no/yes (5e-4 ours)
    random_crops: tuple[bool, ...] = (False, True)  # Table 1 "random crop"
    dropouts: tuple[float, ...] = (0.0, 0.5)  # dropout before hidden FC layers (§3's list)
    labels: tuple[str, ...] = ("true_labels", "random_labels")  # Table 1 row groups

    def __post_init__(self):
        check(all(w >= 0 for w in self.weight_decays), "regularizers.weight_decays must be >= 0")
        check(all(0 <= d < 1 for d in self.dropouts), "regularizers.dropouts must be in [0, 1)")
        check(set(self.labels) <= {"true_labels", "random_labels"},
              "regularizers.labels must be true_labels and/or random_labels")  # fmt: skip


@dataclass(frozen=True)
class ExpressivityConfig:
    ns: tuple[int, ...] = (10, 100, 1000)  # sample sizes n
    ds: tuple[int, ...] = (2, 100, 3072)  # dimensions d (3072 = a CIFAR image)
    digits_n: int = 1797  # real inputs: the digits with random labels (all 1797)
    seed: int = 0

    def __post_init__(self):
        check(all(n >= 1 for n in self.ns) and all(d >= 1 for d in self.ds),
              "expressivity.ns/ds must be >= 1")  # fmt: skip
        check(self.digits_n >= 0, "expressivity.digits_n must be >= 0")


@dataclass(frozen=True)
class MinNormConfig:
    source: Literal["mnist", "digits"] = "mnist"  # §5: MNIST
    root: str = ""  # MNIST IDX directory (source=mnist)
    num_train: int = 10_000  # §5 used all 60k (a 30 GB kernel); 10k needs 0.8 GB
    num_test: int = 10_000
    kernels: tuple[str, ...] = ("linear", "gaussian", "random_features")
    ps: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    seed: int = 0

    def __post_init__(self):
        check(self.num_train >= 10 and self.num_test >= 1, "min_norm.num_train/num_test too small")
        bad = set(self.kernels) - {"linear", "gaussian", "random_features"}
        check(not bad, f"min_norm.kernels: unknown {sorted(bad)}")
        check(all(0 <= p <= 1 for p in self.ps), "min_norm.ps must lie in [0, 1]")


@dataclass(frozen=True)
class GeneralizationConfig:
    experiments: tuple[str, ...] = EXPERIMENTS
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    randomization: RandomizationConfig = field(default_factory=RandomizationConfig)
    corruption: CorruptionConfig = field(default_factory=CorruptionConfig)
    regularizers: RegularizerConfig = field(default_factory=RegularizerConfig)
    expressivity: ExpressivityConfig = field(default_factory=ExpressivityConfig)
    min_norm: MinNormConfig = field(default_factory=MinNormConfig)

    def __post_init__(self):
        bad = set(self.experiments) - set(EXPERIMENTS)
        check(not bad, f"experiments: unknown {sorted(bad)}; valid: {', '.join(EXPERIMENTS)}")
        from stages.models import small_nets  # noqa: F401  (registers the App. A models)
        from stages.models.registry import names

        for section in ("train", "randomization", "corruption", "regularizers"):
            unknown = set(getattr(self, section).models) - set(names())
            check(not unknown, f"{section}.models: unknown {sorted(unknown)}; known: {MODELS}")


_SMALL_DATA = {"data.source": "synthetic", "data.seed": 0, "train.gpu": False}
PRESETS = {
    # minutes on 2 cores: MLPs on a generated 10-class CIFAR-format set, digits for §4/§5
    "tiny": {
        **_SMALL_DATA,
        "data.num_train": 1000,
        "data.num_test": 500,
        "train.models": ("mlp_1x512", "mlp_3x512"),
        "train.max_steps": 1500,
        "train.log_every": 10,
        "train.eval_every_epochs": 10,
        # an epoch here is 8 steps, not CIFAR's 390: 0.95 per epoch would stop 3x512 short of 100%
        "train.lr_decay": 0.99,
        "corruption.models": ("mlp_1x512",),
        "regularizers.models": ("mlp_1x512",),
        "expressivity.ns": (10, 100, 500),
        "expressivity.ds": (2, 100, 3072),
        "min_norm.source": "digits",
        "min_norm.num_train": 1000,
        "min_norm.num_test": 797,
    },
    # the Ray end-to-end test: one MLP, true vs random labels, three noise levels
    "ci": {
        **_SMALL_DATA,
        "data.num_train": 500,
        "data.num_test": 200,
        "experiments": ("randomization", "corruption", "expressivity", "min_norm"),
        "train.models": ("mlp_1x512",),
        "train.max_steps": 600,
        "train.log_every": 10,
        "train.eval_every_epochs": 10,
        "randomization.conditions": ("true_labels", "random_labels"),
        "corruption.ps": (0.0, 0.5, 1.0),
        "expressivity.ns": (10, 100),
        "expressivity.ds": (2, 100),
        "expressivity.digits_n": 300,
        "min_norm.source": "digits",
        "min_norm.num_train": 400,
        "min_norm.num_test": 200,
        "min_norm.ps": (0.0, 0.5, 1.0),
    },
    # App. A on CIFAR-10 (data.root) with GPU trials; §5 on MNIST (min_norm.root)
    "paper": {},
}


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


def _clean(ctx: StepContext) -> tuple[Path, dict]:
    d = ctx.input_dir("dataset")
    return d, json.loads((d / "meta.json").read_text())


def make_randomized(ctx: StepContext, *, variants: tuple, seeds: tuple, seed: int) -> None:
    from stages.generalization.randomize import ARRAYS, save_variants

    d, meta = _clean(ctx)
    clean = {name: np.load(d / f"{name}.npy") for name in ARRAYS}
    rows = save_variants(
        ctx.out_dir, clean, variants, seeds, num_classes=meta["num_classes"], base_seed=seed
    )
    ctx.write_json("variants.json", rows)


def _sweep(ctx: StepContext, experiment: str, grids: dict, train: dict, seeds: tuple) -> None:
    """Run ``run_trial`` over ``grids`` × seeds under Tune; write rows.parquet and curves.parquet."""
    from stages.training.fit_labels import run_trial

    clean_dir, meta = _clean(ctx)
    space = {
        **train,
        "clean_dir": str(clean_dir),
        "variants_dir": str(ctx.input_dir("randomize")),
        "num_classes": meta["num_classes"],
        "in_channels": meta["in_channels"],
        "weight_decay": 0.0,
        "random_crop": False,
        "dropout": 0.0,
        **{k: Grid(tuple(v)) for k, v in grids.items()},
        "seed": Grid(tuple(seeds)),
    }
    # concurrent sweep steps take turns inside the Ray executor (Tune's registry is global)
    results = ctx.sweep(run_trial, space, metric="train_acc", mode="max")
    rows, curves = [], []
    for r in results:
        c, m = r["config"], r["metrics"]
        condition, _, p = c["variant"].partition(":")
        p = float(p) if p else float(condition == "random_labels")
        regs = [n for n, on in (("wd", c["weight_decay"] > 0), ("crop", c["random_crop"]),
                                ("dropout", c["dropout"] > 0)) if on]  # fmt: skip
        key = dict(experiment=experiment, model=c["model"], condition=condition, p=p,
                   regularisers="+".join(regs) or "none", seed=int(c["seed"]))  # fmt: skip
        final = bool(m.get("final")) and not r["error"]
        rows.append(
            {
                **key,
                "weight_decay": float(c["weight_decay"]),
                "random_crop": bool(c["random_crop"]),
                "dropout": float(c["dropout"]),
                "steps_to_fit": int(m["steps_to_fit"])
                if final and m["steps_to_fit"] >= 0
                else None,
                "train_acc": float(m["train_acc"]) if final else None,
                "test_acc": float(m["test_acc"]) if final else None,
                **{k: (float(m[k]) if final else None) for k in _SUMMARY},
                "num_params": int(m["num_params"]) if final else None,
                "error": r["error"],
            }
        )
        for h in r["history"]:
            if h.get("final") == 0:
                curves.append({**key, **{k: float(h[k]) for k in _CURVE}})
    pq.write_table(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), ctx.out_dir / "rows.parquet")
    pq.write_table(
        pa.Table.from_pylist(curves, schema=CURVE_SCHEMA), ctx.out_dir / "curves.parquet"
    )


_SUMMARY = ("weight_l2", "margin_p10", "margin_median", "final_loss", "steps", "epochs", "wall_s")
_CURVE = ("step", "epoch", "lr", "loss", "batch_acc", "train_acc")
_KEY_FIELDS = [
    pa.field("experiment", pa.string()),
    pa.field("model", pa.string()),
    pa.field("condition", pa.string()),
    pa.field("p", pa.float64()),
    pa.field("regularisers", pa.string()),
    pa.field("seed", pa.int64()),
]
ROW_SCHEMA = pa.schema(
    _KEY_FIELDS
    + [pa.field("weight_decay", pa.float64()), pa.field("random_crop", pa.bool_()),
       pa.field("dropout", pa.float64()), pa.field("steps_to_fit", pa.int64()),
       pa.field("train_acc", pa.float64()), pa.field("test_acc", pa.float64())]
    + [pa.field(k, pa.float64()) for k in _SUMMARY]
    + [pa.field("num_params", pa.int64()), pa.field("error", pa.string())]
)  # fmt: skip
CURVE_SCHEMA = pa.schema(_KEY_FIELDS + [pa.field(k, pa.float64()) for k in _CURVE])


def sweep_randomization(ctx, *, train, seeds, models, conditions) -> None:
    _sweep(ctx, "randomization", {"model": models, "variant": conditions}, train, seeds)


def sweep_corruption(ctx, *, train, seeds, models, ps) -> None:
    variants = tuple(f"corrupt:{p:g}" for p in ps)
    _sweep(ctx, "corruption", {"model": models, "variant": variants}, train, seeds)


def sweep_regularizers(
    ctx, *, train, seeds, models, weight_decays, random_crops, dropouts, labels
) -> None:
    grids = {"model": models, "weight_decay": weight_decays, "random_crop": random_crops,
             "dropout": dropouts, "variant": labels}  # fmt: skip
    _sweep(ctx, "regularizers", grids, train, seeds)


def _digits_flat(n: int) -> tuple[np.ndarray, np.ndarray]:
    from data.digits import load_digits

    x, y = load_digits(28)
    return x[:n].reshape(min(n, len(x)), -1) / 255.0, y[:n]


def run_expressivity(ctx: StepContext, *, ns: tuple, ds: tuple, digits_n: int, seed: int) -> None:
    from stages.generalization.expressivity import expressivity_grid

    real = _digits_flat(digits_n)[0] if digits_n else None
    rows = expressivity_grid(ns, ds, seed, real_inputs=real)
    pq.write_table(pa.Table.from_pylist(rows), ctx.out_dir / "expressivity.parquet")
    ctx.write_json(
        "metrics.json",
        {
            "expressivity_max_abs_error": max(r["max_abs_error"] for r in rows),
            "expressivity_weights_match": all(
                r["weights_used"] == r["weights_theorem"] for r in rows
            ),
        },
    )


def run_min_norm(
    ctx: StepContext, *, source: str, root: str, num_train: int, num_test: int,
    kernels: tuple, ps: tuple, seed: int,
) -> None:  # fmt: skip
    from threadpoolctl import threadpool_limits

    from stages.generalization.min_norm import corruption_curve

    if source == "digits":
        x, y = _digits_flat(10**9)
        order = np.random.default_rng(seed).permutation(len(x))
        if num_train + num_test > len(x):
            raise ValueError(
                f"min_norm: the digits hold {len(x)} images, asked {num_train}+{num_test}"
            )
        tr, te = order[:num_train], order[num_train : num_train + num_test]
        xtr, ytr, xte, yte = x[tr], y[tr], x[te], y[te]
    else:
        if not root:
            raise ValueError(
                "min_norm.root: set it to the MNIST IDX directory (or min_norm.source=digits)"
            )
        from data.mnist import read_mnist

        (xtr, ytr), (xte, yte) = read_mnist(root, "train"), read_mnist(root, "test")
        xtr, ytr = xtr[:num_train].reshape(-1, 784) / 255.0, ytr[:num_train].astype(np.int64)
        xte, yte = xte[:num_test].reshape(-1, 784) / 255.0, yte[:num_test].astype(np.int64)
    with threadpool_limits(ctx.resources.threads()):  # BLAS pinned to the step's CPUs
        rows = corruption_curve(
            xtr, ytr, xte, yte, kernels=kernels, ps=ps, num_classes=10, seed=seed
        )
    pq.write_table(pa.Table.from_pylist(rows), ctx.out_dir / "min_norm.parquet")


def _models(section_models: tuple[str, ...], cfg: GeneralizationConfig) -> tuple[str, ...]:
    return section_models or cfg.train.models


def steps(cfg: GeneralizationConfig) -> list[Step]:
    d, t = cfg.data, cfg.train
    want = set(cfg.experiments)
    train_params = {
        f.name: getattr(t, f.name)
        for f in dataclasses.fields(t)
        if f.name not in ("models", "seeds", "cpus_per_trial", "gpu")
    }
    trial = Resources(cpus=t.cpus_per_trial, gpus="auto" if t.gpu else 0)
    nets = [e for e in ("randomization", "corruption", "regularizers") if e in want]
    out: list[Step] = []
    if nets:
        variants = []
        if "randomization" in want:
            variants += list(cfg.randomization.conditions)
        if "regularizers" in want:
            variants += list(cfg.regularizers.labels)
        if "corruption" in want:
            variants += [f"corrupt:{p:g}" for p in cfg.corruption.ps]
        out += [
            Step(
                "dataset",
                make_dataset,
                params=dict(
                    source=d.source,
                    root=d.root if d.source != "synthetic" else "",
                    num_train=d.num_train,
                    num_test=d.num_test,
                    seed=d.seed,
                ),
                description="read CIFAR-10/MNIST (or generate the CIFAR-format set); 32x32 NHWC",
            ),
            Step(
                "randomize",
                make_randomized,
                inputs=("dataset",),
                params=dict(
                    variants=tuple(dict.fromkeys(variants)),
                    seeds=t.seeds,
                    seed=cfg.randomization.seed,
                ),
                description="§2 corruptions drawn once per seed, saved as arrays",
            ),
        ]
        common = dict(train=train_params, seeds=t.seeds)
        if "randomization" in want:
            out.append(
                Step(
                    "randomization",
                    sweep_randomization,
                    kind="sweep",
                    inputs=("dataset", "randomize"),
                    params=dict(
                        common,
                        models=_models(cfg.randomization.models, cfg),
                        conditions=cfg.randomization.conditions,
                    ),
                    resources=trial,
                    description="Tune: conditions x models x seeds until 100% train accuracy",
                )
            )
        if "corruption" in want:
            out.append(
                Step(
                    "corruption",
                    sweep_corruption,
                    kind="sweep",
                    inputs=("dataset", "randomize"),
                    params=dict(
                        common, models=_models(cfg.corruption.models, cfg), ps=cfg.corruption.ps
                    ),
                    resources=trial,
                    description="Tune: label corruption p x models (Figure 1b/1c)",
                )
            )
        if "regularizers" in want:
            r = cfg.regularizers
            out.append(
                Step(
                    "regularizers",
                    sweep_regularizers,
                    kind="sweep",
                    inputs=("dataset", "randomize"),
                    params=dict(
                        common,
                        models=_models(r.models, cfg),
                        weight_decays=r.weight_decays,
                        random_crops=r.random_crops,
                        dropouts=r.dropouts,
                        labels=r.labels,
                    ),
                    resources=trial,
                    description="Tune: weight decay x random crop x dropout (Table 1)",
                )
            )
    if "expressivity" in want:
        e = cfg.expressivity
        out.append(
            Step(
                "expressivity",
                run_expressivity,
                params=dict(ns=e.ns, ds=e.ds, digits_n=e.digits_n, seed=e.seed),
                description="Theorem 1: 2n+d weights fit n points exactly",
            )
        )
    if "min_norm" in want:
        m = cfg.min_norm
        out.append(
            Step(
                "min_norm",
                run_min_norm,
                params=dict(
                    source=m.source,
                    root=m.root if m.source == "mnist" else "",
                    num_train=m.num_train,
                    num_test=m.num_test,
                    kernels=m.kernels,
                    ps=m.ps,
                    seed=m.seed,
                ),
                resources=Resources(cpus=1, memory_mb=0),
                description="§5: exact kernel interpolation, test error and norm vs label noise p",
            )
        )
    from pipelines.generalization_report import write_report

    out.append(
        Step(
            "report",
            write_report,
            inputs=tuple(s.name for s in out if s.name not in ("dataset", "randomize")),
            params=dict(experiments=tuple(e for e in EXPERIMENTS if e in want)),
            publish=(
                "report.md",
                "sweep.parquet",
                "curves.parquet",
                "min_norm.parquet",
                "expressivity.parquet",
                "fig1a_loss.png",
                "fig1b_convergence.png",
                "fig1c_test_error.png",
                "capacity.png",
            ),
            description="sweep.parquet, curves.parquet, figures and report.md",
        )
    )
    return out


PIPELINE = PipelineSpec(
    name="generalization",
    summary="Zhang et al. 2017: random labels, label corruption, regularisers, Theorem 1, min-norm",
    config=GeneralizationConfig,
    presets=PRESETS,
    default_preset="tiny",
    steps=steps,
    metric="random_labels_train_acc",
    mode="max",
)
