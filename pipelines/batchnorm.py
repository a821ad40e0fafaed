"""Batch Normalization — Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training
by Reducing Internal Covariate Shift", ICML 2015 (arXiv 1502.03167). REFERENCE §2.

Steps: ``mnist_data`` / ``cifar_data`` (datasets) → ``mnist`` (§4.1, Figure 1: the 3×100 sigmoid
MLP with and without BN; Tune sweep over BN × seed) → ``variants`` (§4.2, Figures 2 and 3: Baseline,
BN-Baseline, BN-x5, BN-x30, BN-x5-Sigmoid, Baseline-Sigmoid on a small Inception-style net and a
CIFAR-10-format set; Tune sweep over variant × seed) → ``batch_size`` (the summary's criticism: BN vs
no BN down to minibatches of 1–2, train-mode vs inference-mode accuracy; Tune sweep) →
``multi_worker`` (Ray Train, 2 workers: per-worker vs synchronised BN statistics) → ``report``
(metrics.json, curves.parquet, report.md with Figures 1–3 beside the paper's numbers). Config,
presets and ``steps(cfg)`` here; the step adaptors (and the variants table) in
``batchnorm_steps.py``; the report writer in ``batchnorm_report.py``; the BN layer in
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

from dataclasses import dataclass, field
from typing import Literal

from cluster.resources import Resources
from pipelines.batchnorm_steps import (  # noqa: F401 - some only re-exported: pipelines.batchnorm.X
    CURVE_METRICS,
    CURVES_SCHEMA,
    VARIANTS,
    cifar_root,
    make_cifar,
    make_mnist,
    run_batch_size,
    run_mnist,
    run_multi_worker,
    run_variants,
    variant_settings,
    write_curves,
    write_rows,
)
from pipelines.config import check
from pipelines.engine import Step
from pipelines.registry import PipelineSpec


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
                version="2",  # batch-statistics accuracy: every test batch has exactly m examples
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
