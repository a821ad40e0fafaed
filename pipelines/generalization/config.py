"""Rethinking generalization: the frozen config dataclasses, whose defaults are the paper's setting, and
the named presets (small deltas of them). Imports nothing of the steps."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data.fashion_mnist import DEFAULT_ROOT as FASHION_MNIST_ROOT
from pipelines.config import ConfigError, check, data_paths_are_local
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
    # not in the paper: scikit-learn's SVC (RBF, C = svc_C, gamma "scale") on the same clean
    # training subset, the published Fashion-MNIST baseline to set the interpolant beside; 0 = off
    svc_C: float = 0.0

    def __post_init__(self):
        check(self.num_train >= 10 and self.num_test >= 1, "min_norm.num_train/num_test too small")
        check(self.svc_C >= 0, f"min_norm.svc_C must be >= 0 (0 = off), got {self.svc_C}")
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
        # MODELS, not the model registry: importing it loads torch and torchvision, ≈ 6 s of
        # `paperline list` on a busy 2-core box (issue 22); test_pipeline checks they are registered
        for section in ("train", "randomization", "corruption", "regularizers"):
            unknown = set(getattr(self, section).models) - set(MODELS)
            check(not unknown, f"{section}.models: unknown {sorted(unknown)}; known: {MODELS}")


def require_data(cfg: GeneralizationConfig) -> None:
    """Real sources need their directories before any step runs (`paperline run` exits 2 naming
    the key; the paper preset never falls back to generated data, issue 20)."""
    from data.fashion_mnist import INSTALL_HINT, problem

    nets = {"randomization", "corruption", "regularizers"} & set(cfg.experiments)
    needs = []
    if nets and cfg.data.source != "synthetic":
        needs.append(("data.root", cfg.data.root, cfg.data.source))
    if "min_norm" in cfg.experiments and cfg.min_norm.source == "mnist":
        needs.append(("min_norm.root", cfg.min_norm.root, "mnist"))
    for key, root, source in needs:
        what = "CIFAR-10 binary batches" if source == "cifar10" else "MNIST-format IDX files"
        if not root:
            raise ConfigError(
                f"{key} is not set: the {source} source reads {what} from a directory — set "
                f"{key}=/path"
                + (f" ({INSTALL_HINT})" if source == "mnist" else "")
                + ", or run the small presets (tiny, ci) on generated data and digits"
            )
        if not data_paths_are_local():
            continue
        if source == "mnist" and (why := problem(root)):
            raise ConfigError(f"{key}: {why}; {INSTALL_HINT}")
        if source == "cifar10" and not Path(root).expanduser().is_dir():
            raise ConfigError(f"{key}: {root} is not a directory of CIFAR-10 binary batches")


_SMALL_DATA = {"data.source": "synthetic", "data.seed": 0, "train.gpu": False}
PRESETS = {
    # minutes on 2 cores: MLPs on a generated 10-class CIFAR-format set, digits for §4/§5
    "tiny": {
        **_SMALL_DATA,
        "data.num_train": 1000,
        "data.num_test": 500,
        "train.models": ("mlp_1x512", "mlp_3x512"),
        # two seeds: the steps-to-fit ratio and the Gaussian-inputs claims are bootstrapped over
        # seeds, and with one they had no interval (issue 21)
        "train.seeds": (0, 1),
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
    # real Fashion-MNIST where n ≫ d (d = 784; `make data`): both MLPs under every §2 condition
    # and the corruption sweep on a seeded 5,000-image training subset (n = 6.4 d) and the full
    # 10,000-image test set, 3 seeds; §5 on 20,000 training images, Gaussian kernel, beside
    # scikit-learn's SVC RBF. Sized for ≤ 30 min through an embedded Ray on 2 cores.
    "real": {
        "experiments": ("randomization", "corruption", "min_norm"),
        "data.source": "mnist",
        "data.root": FASHION_MNIST_ROOT,
        "data.num_train": 5000,
        "data.num_test": 10000,
        "train.models": ("mlp_1x512", "mlp_3x512"),
        "train.seeds": (0, 1, 2),
        "train.max_steps": 8000,
        "train.log_every": 50,
        "train.eval_every_epochs": 2,
        # an epoch is 40 steps here, not CIFAR's 390: 0.95 per epoch would freeze the rate
        "train.lr_decay": 0.995,
        "train.gpu": False,
        "corruption.models": ("mlp_1x512",),
        "min_norm.root": FASHION_MNIST_ROOT,
        "min_norm.num_train": 20000,
        "min_norm.num_test": 10000,
        "min_norm.kernels": ("gaussian",),
        "min_norm.svc_C": 10.0,
    },
}
