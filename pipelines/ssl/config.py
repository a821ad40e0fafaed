"""Learning to weight unlabeled data: the frozen config dataclasses, whose defaults are the paper's
setting, and the named presets (small deltas of them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data.fashion_mnist import DEFAULT_ROOT as FASHION_MNIST_ROOT
from pipelines.config import ConfigError, check, data_paths_are_local


@dataclass(frozen=True)
class DataConfig:
    # §5: CIFAR-10 (the paper also runs SVHN, which has no reader here); "mnist" = MNIST-format
    # IDX files (Fashion-MNIST: --preset real)
    source: Literal["cifar10", "synthetic", "digits", "mnist"] = "cifar10"
    root: str = ""  # CIFAR-10 binary batches (cifar10) or IDX files (mnist); never downloaded
    digits_size_px: int = 16  # source=digits: 8x8 originals resized
    digits_test: int = 497  # source=digits: images held out as the test split
    num_train: int = 5000  # source=synthetic: generated set; source=mnist: the first N
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


def require_data(d: DataConfig) -> None:
    """A real source needs its files before any step runs: the paper preset never falls back to
    generated data (issue 20); `paperline run` exits 2 naming data.root."""
    from data.fashion_mnist import INSTALL_HINT, problem

    if d.source not in ("cifar10", "mnist"):
        return
    if not d.root:
        what = "CIFAR-10 binary batches" if d.source == "cifar10" else "MNIST-format IDX files"
        raise ConfigError(
            f"data.root is not set: data.source={d.source} reads {what} — set data.root=/path"
            + (f" ({INSTALL_HINT})" if d.source == "mnist" else "")
            + ", or run the small presets (tiny, ci) on scikit-learn's digits"
        )
    if not data_paths_are_local():
        return
    if d.source == "mnist" and (why := problem(d.root)):
        raise ConfigError(f"data.root: {why}; {INSTALL_HINT}")
    if d.source == "cifar10" and not Path(d.root).expanduser().is_dir():
        raise ConfigError(f"data.root: {d.root} is not a directory of CIFAR-10 binary batches")


@dataclass(frozen=True)
class ExperimentConfig:
    labels_per_class: tuple[int, ...] = (25, 100, 400)  # CIFAR-10 with 250 / 1000 / 4000 labels
    val_per_class: int = 100  # 1000 training images held out as labelled validation (code)
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = ("supervised", "uniform", "scalar", "mcdropout", "learned")
    num_workers: int = 1  # Ray Train workers per training step (DDP; λ updates all-reduced)
    cpus_per_worker: int = 4  # augmentation runs on the CPU beside each GPU worker
    # a run's state (θ, EMA, optimizer, λ and its Adam state, RNG, step) is checkpointed every
    # this many steps (0: only after each run); a resumed run ends bit for bit as an
    # uninterrupted one, so neither knob enters the step keys. Ray Train keeps every checkpoint
    # (≈20 MB each for WRN-28-2) until `paperline gc`: 2^15 steps = 32 per run.
    checkpoint_every: int = 2**15
    max_failures: int = 3  # worker-group restarts of a training step, each from its checkpoint
    # at most this many Train jobs a method's runs (labels × seeds) are split into, started side
    # by side; 0: as many as the cluster's CPUs/GPUs hold at once (always 1 in-process). Changes
    # no result (not in the key)
    parallel_runs: int = 0

    def __post_init__(self):
        from stages.ssl.train import METHODS

        check(all(n >= 1 for n in self.labels_per_class), "experiment.labels_per_class >= 1")
        check(self.val_per_class >= 1, "experiment.val_per_class must be >= 1")
        check(len(self.seeds) >= 1, "experiment.seeds must name at least one seed")
        bad = [m for m in self.methods if m not in METHODS]
        check(not bad and self.methods, f"experiment.methods must be among {METHODS}, got {bad}")
        check(self.num_workers >= 1 and self.cpus_per_worker >= 1, "experiment.num_workers >= 1")
        check(
            self.checkpoint_every >= 0 and self.max_failures >= 0 and self.parallel_runs >= 0,
            "experiment.checkpoint_every, experiment.max_failures and experiment.parallel_runs "
            "must be >= 0",
        )


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
    "experiment.checkpoint_every": 100,
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
        "experiment.checkpoint_every": 25,  # two mid-run checkpoints per run
        "fixmatch.eval_every": 10,
        "fixmatch.last_k": 2,
        "fixmatch.ema_decay": 0.9,
        "baselines.scalar_grid": (0.5,),
    },
    # CIFAR-10 binary at --set data.root=..., WRN-28-2, GPU workers: the paper's setting
    "paper": {"data.source": "cifar10"},
    # real Fashion-MNIST (`make data`) at the paper's label counts 40 / 250 / 4000, 3 seeds, the
    # small conv net and short schedule of the CPU presets, on the first 10,000 training images
    # (the unlabeled pool) and 2,000 test images; see the README's "Real data" for its time
    "real": {
        **_SMALL_CPU,
        "data.source": "mnist",
        "data.root": FASHION_MNIST_ROOT,
        "data.num_train": 10000,
        "data.num_test": 2000,
        "experiment.labels_per_class": (4, 25, 400),
        "experiment.seeds": (0, 1, 2),
        "fixmatch.steps": 200,
        "fixmatch.eval_every": 20,
        "fixmatch.flip": True,  # clothes, unlike digits, stay what they are when mirrored
    },
}
