"""Batch Normalization: the frozen config dataclasses, whose defaults are the paper's setting, and
the named presets (small deltas of them). Imports nothing of the steps."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data.fashion_mnist import DEFAULT_ROOT as FASHION_MNIST_ROOT
from pipelines.config import ConfigError, check, data_paths_are_local


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
    # the small presets only: "" roots fall back to digits / a generated CIFAR-format set. The
    # paper's setting (False) refuses to start without its real data (issue 20)
    toy_fallback: bool = False

    def __post_init__(self):
        check(0 < self.digits_test < 1797, "data.digits_test must be in (0, 1797)")
        check(self.cifar_train >= 10 and self.cifar_test >= 10, "data.cifar_train/test >= 10")


def require_data(cfg: BatchNormConfig) -> None:
    """Before any step runs (`paperline run` exits 2 naming the key): the real data the enabled
    experiments read, unless ``data.toy_fallback``; and a set ``data.root`` must hold the IDX files."""
    from data.fashion_mnist import INSTALL_HINT, problem

    d = cfg.data
    uses_mnist = cfg.mnist.enabled or cfg.batch_size.enabled or cfg.multi_worker.enabled
    if not d.toy_fallback:
        if uses_mnist and not d.root:
            raise ConfigError(
                "data.root is not set: §4.1 trains on real MNIST-format IDX files (MNIST, or "
                f"Fashion-MNIST with --preset real); {INSTALL_HINT} as data.root — or run the "
                "small presets (tiny, ci), which fall back to scikit-learn's digits"
            )
        if cfg.variants.enabled and not d.cifar_root:
            raise ConfigError(
                "data.cifar_root is not set: §4.2's variants train on CIFAR-10 binary batches "
                "(cifar-10-batches-bin); set data.cifar_root, or --set variants.enabled=false"
            )
    if not data_paths_are_local():
        return
    if uses_mnist and d.root and (why := problem(d.root)):
        raise ConfigError(f"data.root: {why}; {INSTALL_HINT}")
    if cfg.variants.enabled and d.cifar_root and not Path(d.cifar_root).expanduser().is_dir():
        raise ConfigError(f"data.cifar_root: {d.cifar_root} is not a directory")


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


VARIANTS: dict[str, tuple[float, bool, str, bool]] = {
    "Baseline": (1, False, "relu", False),
    "BN-Baseline": (1, True, "relu", False),
    "BN-x5": (5, True, "relu", True),
    "BN-x30": (30, True, "relu", True),
    "BN-x5-Sigmoid": (5, True, "sigmoid", True),
    "Baseline-Sigmoid": (1, False, "sigmoid", False),
    # controls (issue 21): the plain net at BN-x5/x30's settings, to show BN is what permits them
    "Baseline-x5": (5, False, "relu", True),
    "Baseline-x30": (30, False, "relu", True),
}


@dataclass(frozen=True)
class VariantsConfig:
    enabled: bool = True
    # §4.2 / Figure 3 rows; Baseline-Sigmoid is the text's "Inception with sigmoid"
    variants: tuple[str, ...] = (
        "Baseline", "BN-Baseline", "BN-x5", "BN-x30", "BN-x5-Sigmoid", "Baseline-Sigmoid",
        "Baseline-x5", "Baseline-x30",
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
    # §4.2.1's two data changes for the accelerated rows. "blocks": fixed minibatches whose order
    # is reshuffled each pass (the examples "always appearing in a mini-batch together" that the
    # paper's within-shard shuffling ended); the accelerated rows reshuffle every example ("full").
    shuffle: Literal["blocks", "full"] = "blocks"
    # photometric distortion strength of the non-accelerated rows (random brightness ±0.25·s and
    # contrast ×[1 − 0.3·s, 1 + 0.3·s] per image per step, in standardised units; 0 = none); the
    # accelerated rows train at ``distortion * distortion_reduction``. Magnitudes are ours: the
    # paper says only "reduce".
    distortion: float = 1.0
    distortion_reduction: float = 0.5

    def __post_init__(self):
        unknown = set(self.variants) - set(VARIANTS)
        check(not unknown, f"variants.variants: unknown {sorted(unknown)}; valid: {list(VARIANTS)}")
        check("Baseline" in self.variants, "variants.variants must include Baseline (the target)")
        check(self.steps >= 1 and self.eval_every >= 1, "variants.steps/eval_every >= 1")
        check(self.lr > 0 and 0 <= self.dropout < 1, "variants.lr > 0, variants.dropout in [0, 1)")
        check(
            8 <= self.image_px <= 32, f"variants.image_px must be in [8, 32], got {self.image_px}"
        )
        check(self.shuffle in ("blocks", "full"),
              f"variants.shuffle must be 'blocks' or 'full', got {self.shuffle!r}")  # fmt: skip
        check(self.distortion >= 0 and 0 <= self.distortion_reduction <= 1,
              "variants.distortion >= 0 and variants.distortion_reduction in [0, 1]")  # fmt: skip


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
        "data.toy_fallback": True,
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
        "data.toy_fallback": True,
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
    # §4.1 at the paper's schedule (50,000 steps of 60, 3×100 sigmoid, BN vs none) on real
    # Fashion-MNIST (`make data`), 3 seeds: ≈ 15 min through an embedded Ray on 2 cores
    "real": {
        "data.root": FASHION_MNIST_ROOT,
        "mnist.seeds": (0, 1, 2),
        "mnist.eval_every": 250,
        "variants.enabled": False,
        "batch_size.enabled": False,
        "multi_worker.enabled": False,
    },
}
