"""MobileNetV2 — Sandler, Howard, Zhu, Zhmoginov, Chen, "MobileNetV2: Inverted Residuals and Linear
Bottlenecks", CVPR 2018 (arXiv 1801.04381); REFERENCE §3.

Steps: ``dataset`` (CIFAR-10 binary at ``data.root``, or a generated CIFAR-10-format set) →
``complexity`` (params / MAdds / CPU latency over the α × resolution grid at 1000 classes: the
paper's Table 4 numbers and Figure 5's x axis) → ``train`` (the reference α under Ray Train) →
``width_sweep`` (Ray Tune: accuracy over α × resolution × seeds, plus MobileNetV1 points: Figure 5)
→ ``ablations`` (Ray Tune: linear vs ReLU6 bottleneck, shortcut between bottlenecks / expansions /
none: Figure 6) → ``report`` (sweep.parquet, figures, tables beside the paper's numbers).

Small presets differ from the paper, on purpose and visibly: 32-px images (resolution multiplier
over 16…32 px instead of 96…224); the stem conv at stride 1 instead of 2 (``model.stem_stride``).
With the paper's total stride 32, a 32-px image is 2×2 after the fourth row and 1×1 after the
sixth, so the depthwise convs see almost no spatial context (α 0.5, 6 epochs: 41% vs 78% with stride
16). Stride 16 keeps a 2×2 map at the end, at 4× the MAdds. The usual CIFAR adaptation (stride 8)
also changes row 2's stride; we keep that one to stay affordable on 2 CPU cores. Also SGD with
Nesterov momentum and a cosine schedule for a few epochs instead of §6.1's RMSProp (which needs far
more steps than a CPU budget affords), and 10 classes. The ``complexity`` step always uses the
paper's architecture (stem stride 2, 1000 classes).

Commands::

    paperline run mobilenet                      # preset tiny: generated set, ~10 min on 2 idle cores
    paperline run mobilenet --preset ci          # what the test suite runs through Ray
    paperline run mobilenet --preset paper --set data.root=/data/cifar-10-batches-bin --address auto
    paperline run mobilenet --set sweep.scheduler=asha --set sweep.seeds=0,1,2
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cluster.resources import Resources, limit_threads
from cluster.space import Grid
from pipelines.config import check
from pipelines.engine import Step, StepContext
from pipelines.mobilenet_report import write_report
from pipelines.registry import PipelineSpec


# ----------------------------------------------------------------------------------------------
# Config: defaults are the paper's setting; presets are small deltas.
@dataclass(frozen=True)
class DataConfig:
    root: str = ""  # CIFAR-10 binary directory; "" = generate a CIFAR-10-format set (small presets)
    num_train: int = 0  # generated set size, or the first N of the real set (0 = all)
    num_test: int = 0
    seed: int = 0  # generated set only

    def __post_init__(self):
        check(self.num_train >= 0 and self.num_test >= 0, "data.num_train/num_test must be >= 0")


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
    scheduler: str = "none"  # "asha": stop poor trials early (reports every epoch)
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
}


# ----------------------------------------------------------------------------------------------
# dataset
def make_dataset(ctx: StepContext, *, root: str, num_train: int, num_test: int, seed: int) -> None:
    """Generate the set (no root) or check the real one; ``dataset.json`` says where it is."""
    from data.cifar import read_cifar10
    from data.synthetic_cifar import generate_cifar10

    if root:
        source = str(Path(root).expanduser().resolve())
        n = {s: len(read_cifar10(source, s)[1]) for s in ("train", "test")}  # fails early, by name
    else:
        source = str(generate_cifar10(ctx.out_dir / "cifar", num_train, num_test, seed))
        n = {"train": num_train, "test": num_test}
    info = {"root": source, "generated": not root, "num_train": n["train"], "num_test": n["test"]}
    ctx.write_json("dataset.json", info)


def dataset_root(ctx: StepContext) -> str:
    info = json.loads((ctx.input_dir("dataset") / "dataset.json").read_text())
    return info["root"] if not info["generated"] else str(ctx.input_dir("dataset") / "cifar")


# ----------------------------------------------------------------------------------------------
# complexity: params / MAdds / latency over the paper's grid (always the paper's architecture)
COMPLEXITY_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("width", pa.float64()),
        ("resolution", pa.int32()),
        ("num_classes", pa.int32()),
        ("params", pa.int64()),  # with BN γ/β (torchvision convention)
        ("params_no_bn", pa.int64()),  # without (the paper's TF-slim convention)
        ("madds", pa.int64()),  # FLOPs / 2 from torch.utils.flop_counter
        ("latency_ms", pa.float64()),  # batch 1, median; null where not measured
    ]
)


def measure_complexity(
    ctx: StepContext,
    *,
    widths: tuple[float, ...],
    resolutions: tuple[int, ...],
    num_classes: int,
    latency_widths: tuple[float, ...],
    latency_resolutions: tuple[int, ...],
    latency_warmup: int,
    latency_repeats: int,
    latency_threads: int,
) -> None:
    import torch

    from stages.models.complexity import count_madds, count_params, measure_latency_ms
    from stages.models.mobilenetv1 import MobileNetV1
    from stages.models.mobilenetv2 import MobileNetV2

    threads = torch.get_num_threads()
    torch.set_num_threads(latency_threads)
    rows = []
    try:
        # MobileNetV1 1.0 at 224: the Table 4 baseline, measured the same way
        models = [("mobilenetv2", w, MobileNetV2(num_classes, w)) for w in widths]
        models.append(("mobilenetv1", 1.0, MobileNetV1(num_classes, 1.0)))
        for name, w, model in models:
            res = resolutions if name == "mobilenetv2" else (224,)
            for r in res:
                timed = (not latency_widths or w in latency_widths) and (
                    not latency_resolutions or r in latency_resolutions
                )
                latency = (
                    measure_latency_ms(model, r, warmup=latency_warmup, repeats=latency_repeats)
                    if timed
                    else None
                )
                rows.append(
                    {
                        "model": name,
                        "width": float(w),
                        "resolution": r,
                        "num_classes": num_classes,
                        "params": count_params(model),
                        "params_no_bn": count_params(model, include_bn=False),
                        "madds": count_madds(model, r),
                        "latency_ms": latency,
                    }
                )
    finally:
        torch.set_num_threads(threads)
    pq.write_table(
        pa.Table.from_pylist(rows, schema=COMPLEXITY_SCHEMA), ctx.out_dir / "complexity.parquet"
    )
    ctx.write_json("latency_info.json", {"threads": latency_threads, "repeats": latency_repeats})


# ----------------------------------------------------------------------------------------------
# train (Ray Train) and the two sweeps (Ray Tune): one loop, stages/training/classify.py
def train_config(root: str, optim: dict, model: dict, epochs: int = 0) -> dict:
    """The classify-loop config shared by every training step (without model/resolution/seed)."""
    o = dict(optim)
    return {
        "dataset_root": root,
        "optimizer": o["optimizer"],
        "lr": o["lr"],
        "momentum": o["momentum"],
        "rmsprop_eps": o["rmsprop_eps"],
        "weight_decay": o["weight_decay"],
        "schedule": o["schedule"],
        "lr_decay": o["lr_decay"],
        "warmup_epochs": o["warmup_epochs"],
        "label_smoothing": o["label_smoothing"],
        "epochs": epochs or o["epochs"],
        "batch_size": o["batch_size"],
        "augment": o["augment"],
        "num_classes": 10,
        "model_kwargs": dict(model),
    }


def train_reference(
    ctx: StepContext,
    *,
    optim: dict,
    model: dict,
    width: float,
    resolution: int,
    num_workers: int,
    checkpoint: bool,
) -> None:
    import torch

    from stages.training.classify import train_classifier

    cfg = train_config(dataset_root(ctx), optim, model)
    cfg.update(model="mobilenetv2", resolution=resolution, checkpoint=checkpoint)
    cfg["model_kwargs"]["width_mult"] = width
    before = torch.get_num_threads()
    limit_threads(ctx.resources.threads())  # as Ray does per worker; matters in-process
    try:
        result = ctx.train(train_classifier, cfg, num_workers=num_workers)
    finally:
        limit_threads(before)
    if result.checkpoint is not None:
        torch.save(result.checkpoint["model"], ctx.out_dir / "model.pt")
    ctx.write_json("history.json", result.history)
    ctx.write_json(
        "metrics.json",
        {
            "reference_accuracy": result.metrics.get("accuracy"),
            "reference_model": f"mobilenetv2 α={width} at {resolution} px",
        },
    )


def parse_point(point: str) -> tuple[str, float, int]:
    """``"variant:width@resolution"`` → ``(variant, width, resolution)``."""
    variant, _, rest = point.partition(":")
    width, _, res = rest.partition("@")
    return variant, float(width), int(res)


def model_for(variant: str, width: float, model: dict) -> tuple[str, dict]:
    """Registry name and kwargs of a sweep variant (MobileNetV1 or a MobileNetV2 ablation)."""
    if variant == "mobilenetv1":
        return "mobilenetv1", {"width_mult": width, "stem_stride": model["stem_stride"]}
    return "mobilenetv2", {**model, **ABLATION_VARIANTS[variant], "width_mult": width}


def sweep_trial(config: dict, report, *, base: dict, model: dict, threads: int) -> None:
    """Tune trainable: ``config`` = {"point": "variant:width@res", "seed": int}."""
    import torch

    from stages.training.classify import tune_trainable

    variant, width, res = parse_point(config["point"])
    name, kwargs = model_for(variant, width, model)
    cfg = {**base, "model": name, "model_kwargs": kwargs, "resolution": res, "seed": config["seed"]}
    before = torch.get_num_threads()
    limit_threads(threads)  # in-process too: 2 threads on a busy 2-core box run ~10x slower
    try:
        tune_trainable(cfg, report)
    finally:
        limit_threads(before)


def run_sweep(
    ctx: StepContext,
    *,
    points: tuple[str, ...],
    seeds: tuple[int, ...],
    optim: dict,
    model: dict,
    epochs: int,
    scheduler: str,
) -> None:
    """Train every (point, seed) under Tune; one row per trial with its accuracy and cost."""
    import functools

    from stages.models.complexity import count_madds, count_params
    from stages.models.registry import create

    base = train_config(dataset_root(ctx), optim, model, epochs)
    trainable = functools.partial(
        sweep_trial, base=base, model=model, threads=ctx.resources.threads()
    )
    space = {"point": Grid(tuple(points)), "seed": Grid(tuple(seeds))}
    # the two sweep steps take turns: the Ray executor runs one Tune experiment per driver at once
    results = ctx.sweep(
        trainable,
        space,
        metric="accuracy",
        mode="max",
        scheduler=None if scheduler == "none" else scheduler,
    )
    rows = []
    for r in results:
        variant, width, res = parse_point(r["config"]["point"])
        name, kwargs = model_for(variant, width, model)
        net = create(name, num_classes=10, **kwargs)
        m = r["metrics"] or {}
        rows.append(
            {
                "variant": variant,
                "width": width,
                "resolution": res,
                "seed": int(r["config"]["seed"]),
                "accuracy": m.get("accuracy"),
                "epochs": m.get("epoch"),
                "madds": count_madds(net, res),  # the trained model: 10 classes, small-input stem
                "params": count_params(net),
                "error": r["error"],
                "history": [h.get("accuracy") for h in r["history"] if "accuracy" in h],
            }
        )
    rows.sort(key=lambda row: (row["variant"], row["width"], row["resolution"], row["seed"]))
    ctx.write_json("trials.json", rows)
    errors = [r for r in rows if r["error"]]
    if errors and len(errors) == len(rows):
        raise RuntimeError(f"{ctx.step}: every trial failed; first error: {errors[0]['error']}")
    accs = [r["accuracy"] for r in rows if r["accuracy"] is not None]
    ctx.write_json(
        "metrics.json", {f"{ctx.step}_mean_accuracy": statistics.fmean(accs) if accs else None}
    )


def width_points(s: SweepConfig) -> tuple[str, ...]:
    points = [f"mobilenetv2:{w}@{r}" for w in s.widths for r in s.resolutions]
    points += [f"mobilenetv2:{p}" for p in s.extra_points]
    points += [f"mobilenetv1:{w}@{max(s.resolutions)}" for w in s.v1_widths]
    return tuple(dict.fromkeys(points))


# ----------------------------------------------------------------------------------------------
def steps(cfg: MobileNetConfig) -> list[Step]:
    d, c, t, s, a = cfg.data, cfg.complexity, cfg.train, cfg.sweep, cfg.ablations
    optim, model = asdict(cfg.optim), asdict(cfg.model)  # every value enters the step keys
    trial = Resources(cpus=cfg.trial_cpus, gpus="auto")
    return [
        Step(
            "dataset",
            make_dataset,
            params=dict(root=d.root, num_train=d.num_train, num_test=d.num_test, seed=d.seed),
            description="generate the CIFAR-10-format set, or check the one at data.root",
        ),
        Step(
            "complexity",
            measure_complexity,
            params=asdict(c),
            resources=Resources(cpus=c.latency_threads),
            publish=("complexity.parquet",),
            description="params, MAdds (flop_counter / 2), batch-1 CPU latency; 1000 classes",
        ),
        Step(
            "train",
            train_reference,
            kind="train",
            inputs=("dataset",),
            params=dict(optim=optim, model=model, **asdict(t)),
            resources=trial,
            description="the reference MobileNetV2 under Ray Train",
        ),
        Step(
            "width_sweep",
            run_sweep,
            kind="sweep",
            inputs=("dataset",),
            params=dict(
                points=width_points(s),
                seeds=s.seeds,
                optim=optim,
                model=model,
                epochs=s.epochs,
                scheduler=s.scheduler,
            ),
            resources=trial,
            description="accuracy over width × resolution × seed, plus MobileNetV1 (Fig. 5)",
        ),
        Step(
            "ablations",
            run_sweep,
            kind="sweep",
            inputs=("dataset",),
            params=dict(
                points=tuple(f"{v}:{a.width}@{a.resolution}" for v in a.variants),
                seeds=a.seeds,
                optim=optim,
                model=model,
                epochs=a.epochs,
                scheduler="none",
            ),
            resources=trial,
            description="linear vs ReLU6 bottleneck; shortcut placement (Fig. 6)",
        ),
        Step(
            "report",
            write_report,
            inputs=("dataset", "complexity", "train", "width_sweep", "ablations"),
            params=dict(stem_stride=cfg.model.stem_stride, optimizer=cfg.optim.optimizer),
            publish=(
                "report.md",
                "sweep.parquet",
                "figure5_accuracy_vs_madds.png",
                "figure6_ablations.png",
            ),
            description="sweep.parquet, Figure 5 / 6 shapes, tables beside the paper's numbers",
        ),
    ]


PIPELINE = PipelineSpec(
    name="mobilenet",
    summary="MobileNetV2 (Sandler et al. 2018): MAdds/params table, accuracy vs MAdds, ablations",
    config=MobileNetConfig,
    presets=PRESETS,
    default_preset="tiny",
    steps=steps,
    metric="reference_accuracy",
    mode="max",
)
