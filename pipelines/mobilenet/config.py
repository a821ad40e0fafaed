"""MobileNetV2: the frozen config dataclasses, whose defaults are the paper's setting, and
the named presets (small deltas of them). Imports nothing of the steps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from data.fashion_mnist import DEFAULT_ROOT as FASHION_MNIST_ROOT
from pipelines.config import ConfigError, check, data_paths_are_local

MIN_TRAIN = 5  # a generated set spreads its training images over data_batch_1..5.bin


# ----------------------------------------------------------------------------------------------
# Config: defaults are the paper's setting; presets are small deltas.
@dataclass(frozen=True)
class DataConfig:
    # "cifar10": CIFAR-10 binary (32 px RGB); "mnist": MNIST-format IDX files (Fashion-MNIST with
    # --preset real: 28 px grey, one input channel, the stem conv takes in_channels=1)
    source: Literal["cifar10", "mnist"] = "cifar10"
    root: str = ""  # CIFAR-10 binary directory; "" = generate a CIFAR-10-format set (small presets)
    num_train: int = 0  # generated set size, or the first N of the real set (0 = all)
    num_test: int = 0
    seed: int = 0  # generated set only

    def __post_init__(self):
        check(self.num_train >= 0 and self.num_test >= 0, "data.num_train/num_test must be >= 0")
        check(
            self.num_train == 0 or self.num_train >= MIN_TRAIN,
            f"data.num_train must be 0 (all of data.root) or >= {MIN_TRAIN}, got {self.num_train}",
        )
        # 0/0 without a root is the paper preset before `--set data.root=...` is applied (presets
        # and overrides are applied one after the other), so that case is refused in steps(cfg)
        check(
            bool(self.root) or (self.num_train == 0) == (self.num_test == 0),
            "data.root is not set: a generated set needs data.num_train >= "
            f"{MIN_TRAIN} and data.num_test >= 1, got {self.num_train} / {self.num_test}",
        )


def require_data(d: DataConfig) -> None:
    """The run-time half of DataConfig's check: no root and no generated set size; IDX files
    (data.source=mnist) must be at data.root (`make data` installs Fashion-MNIST)."""
    from data.fashion_mnist import INSTALL_HINT, problem

    if d.source == "mnist":
        if not d.root:
            raise ConfigError(
                f"data.root is not set: data.source=mnist reads IDX files; {INSTALL_HINT}"
            )
        if data_paths_are_local() and (why := problem(d.root)):
            raise ConfigError(f"data.root: {why}; {INSTALL_HINT}")
        return
    if not d.root and d.num_train == 0:
        raise ConfigError(
            "data.root is not set and data.num_train/num_test are 0: set data.root to a CIFAR-10 "
            "binary directory (the paper preset trains on the real set), or data.num_train >= "
            f"{MIN_TRAIN} and data.num_test >= 1 for a generated set"
        )


@dataclass(frozen=True)
class ModelConfig:
    stem_stride: int = 2  # Table 2: conv2d 3×3 stride 2; 1 = CIFAR-style stem (not the paper)
    dropout: float = 0.2  # before the classifier (torchvision; TF-slim keep_prob 0.8)

    def __post_init__(self):
        check(
            self.stem_stride in (1, 2), f"model.stem_stride must be 1 or 2, got {self.stem_stride}"
        )
        check(0 <= self.dropout < 1, f"model.dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "rmsprop"  # §6.1: RMSPropOptimizer, decay 0.9, momentum 0.9
    lr: float = 0.045  # §6.1
    momentum: float = 0.9  # §6.1
    rmsprop_eps: float = 1.0  # TF-slim train_image_classifier's opt_epsilon (not in the paper)
    weight_decay: float = 4e-5  # §6.1
    schedule: str = "exponential"  # §6.1: lr × 0.98 every epoch
    lr_decay: float = 0.98  # §6.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    epochs: int = 100  # not stated in the paper; TF-slim's schedule decays over ~hundreds
    batch_size: int = 96  # §6.1: batch size 96 (per worker; 16 GPU workers, asynchronous)
    augment: bool = True  # random translation + flip (CIFAR); ImageNet crops are not reproduced

    def __post_init__(self):
        check(self.optimizer in ("rmsprop", "sgd", "adamw"), "optim.optimizer: rmsprop|sgd|adamw")
        check(self.schedule in ("exponential", "cosine"), "optim.schedule: exponential|cosine")
        check(self.lr > 0 and self.epochs >= 1 and self.batch_size >= 1, "optim: lr>0, epochs>=1")


@dataclass(frozen=True)
class ComplexityConfig:
    widths: tuple[float, ...] = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)  # Table 4 / Fig. 5 multipliers
    resolutions: tuple[int, ...] = (96, 128, 160, 192, 224)  # Fig. 5 resolution multipliers
    num_classes: int = 1000  # ImageNet (the TF-slim checkpoints have 1001: +1281 params at α=1)
    # latency (batch 1, CPU) only for these widths / resolutions (empty = all of the grid)
    latency_widths: tuple[float, ...] = ()
    latency_resolutions: tuple[int, ...] = ()
    latency_warmup: int = 5
    latency_repeats: int = 20
    latency_threads: int = 1  # the paper times one large phone core (Table 4)

    def __post_init__(self):
        check(all(w > 0 for w in self.widths), "complexity.widths must be > 0")
        check(all(r >= 32 for r in self.resolutions), "complexity.resolutions must be >= 32")
        check(self.latency_repeats >= 1 and self.latency_warmup >= 0, "complexity.latency_*")


@dataclass(frozen=True)
class TrainConfig:
    width: float = 1.0  # the reference model (Table 4: MobileNetV2 1.0 at 224)
    resolution: int = 224
    num_workers: int = 1  # Ray Train DDP workers
    checkpoint: bool = True  # report a checkpoint every epoch: a rerun resumes


@dataclass(frozen=True)
class SweepConfig:
    widths: tuple[float, ...] = (0.35, 0.5, 0.75, 1.0)  # Fig. 5
    resolutions: tuple[int, ...] = (96, 128, 160, 192, 224)  # Fig. 5
    extra_points: tuple[str, ...] = ("1.4@224",)  # width@resolution (Fig. 5: 1.4 only at 224)
    v1_widths: tuple[float, ...] = (1.0,)  # MobileNetV1 comparison points (Fig. 5), at max res
    seeds: tuple[int, ...] = (0,)
    # "asha": stop poor trials early on the test accuracy they report every epoch (there is no
    # validation split); the report's aggregates keep only trials that ran every epoch
    scheduler: str = "none"
    epochs: int = 0  # 0 = optim.epochs

    def __post_init__(self):
        check(self.scheduler in ("none", "asha"), "sweep.scheduler must be none|asha")
        check(len(self.seeds) >= 1 and self.epochs >= 0, "sweep.seeds non-empty, epochs >= 0")
        for p in self.extra_points:
            check(p.count("@") == 1, f"sweep.extra_points: expected width@resolution, got {p!r}")


# Fig. 6: (a) bottleneck activation, (b) shortcut placement; "mobilenetv2" is the paper's block
ABLATION_VARIANTS = {
    "mobilenetv2": {},  # linear bottleneck, shortcut between bottlenecks
    "relu6_bottleneck": {"bottleneck_act": "relu6"},
    "shortcut_expansion": {"shortcut": "expansion"},
    "no_shortcut": {"shortcut": "none"},
}


@dataclass(frozen=True)
class AblationConfig:
    width: float = 1.0  # §6.4 ablates the full network
    resolution: int = 224
    variants: tuple[str, ...] = tuple(ABLATION_VARIANTS)
    seeds: tuple[int, ...] = (0,)
    epochs: int = 0  # 0 = optim.epochs

    def __post_init__(self):
        bad = [v for v in self.variants if v not in ABLATION_VARIANTS]
        check(not bad, f"ablations.variants: unknown {bad}; valid: {list(ABLATION_VARIANTS)}")
        check(len(self.seeds) >= 1 and self.epochs >= 0, "ablations.seeds non-empty, epochs >= 0")


@dataclass(frozen=True)
class MobileNetConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    complexity: ComplexityConfig = field(default_factory=ComplexityConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    ablations: AblationConfig = field(default_factory=AblationConfig)
    trial_cpus: float = 1.0  # per Tune trial / Train worker (2 trials at once on 2 cores)


_SMALL_CPU = {  # 32-px images, CIFAR-style stem, a CPU-friendly optimiser (see the docstring)
    "model.stem_stride": 1,
    "optim.optimizer": "sgd",
    "optim.lr": 0.05,
    "optim.weight_decay": 5e-4,
    "optim.schedule": "cosine",
    "optim.batch_size": 64,
    "train.resolution": 32,
    "sweep.resolutions": (16, 32),
    "sweep.extra_points": (),
    "ablations.resolution": 32,
    "complexity.latency_repeats": 3,
    "complexity.latency_warmup": 1,
}
PRESETS = {
    # generated 10-class set; minutes on 2 cores
    "tiny": {
        **_SMALL_CPU,
        "data.num_train": 1500,
        "data.num_test": 500,
        "optim.epochs": 5,
        "sweep.widths": (0.35, 0.5, 1.0),
        "sweep.v1_widths": (0.5,),
        "sweep.seeds": (0, 1),
        "ablations.width": 0.35,
        "ablations.seeds": (0, 1),
        "complexity.latency_resolutions": (224,),
    },
    # what the test suite runs through Ray: every step, a sliver of each
    "ci": {
        **_SMALL_CPU,
        "data.num_train": 256,
        "data.num_test": 100,
        "optim.epochs": 1,
        "optim.batch_size": 32,
        "train.width": 0.35,
        "train.resolution": 16,
        "train.checkpoint": False,
        "sweep.widths": (0.35, 1.0),
        "sweep.resolutions": (16,),
        "sweep.v1_widths": (),
        "ablations.width": 0.35,
        "ablations.resolution": 16,
        "complexity.widths": (0.35, 1.0, 1.4),
        "complexity.resolutions": (96, 224),
        "complexity.latency_widths": (1.0,),
        "complexity.latency_resolutions": (224,),
    },
    # §6.1 settings on CIFAR-10 upsized to 96…224 px (set data.root), GPU workers
    "paper": {},
    # real Fashion-MNIST (`make data`): grey 28 px in through a 1-channel stem (stride 1, as the
    # small presets), the first 5,000 training and 5,000 test images, 3 epochs; width × resolution
    # (14 / 28 px) with MobileNetV1 beside it and the Fig. 6 ablations, 3 seeds each
    "real": {
        **_SMALL_CPU,
        "data.source": "mnist",
        "data.root": FASHION_MNIST_ROOT,
        "data.num_train": 5000,
        "data.num_test": 5000,
        "optim.epochs": 3,
        "train.width": 0.35,
        "train.resolution": 28,
        "sweep.widths": (0.35, 1.0),
        "sweep.resolutions": (14, 28),
        "sweep.v1_widths": (0.5,),
        "sweep.seeds": (0, 1, 2),
        "ablations.width": 0.35,
        "ablations.resolution": 28,
        "ablations.seeds": (0, 1, 2),
        "complexity.widths": (0.35, 1.0, 1.4),
        "complexity.resolutions": (224,),
        "complexity.latency_widths": (1.0,),
        "complexity.latency_resolutions": (224,),
    },
}


def width_points(s: SweepConfig) -> tuple[str, ...]:
    points = [f"mobilenetv2:{w}@{r}" for w in s.widths for r in s.resolutions]
    points += [f"mobilenetv2:{p}" for p in s.extra_points]
    points += [f"mobilenetv1:{w}@{max(s.resolutions)}" for w in s.v1_widths]
    return tuple(dict.fromkeys(points))
