"""MobileNetV2's experiment steps: the complexity table (params / MAdds / latency), the reference
model under Ray Train and the Tune sweeps (width × resolution, Fig. 6's ablations, whose variants
table is in ``config.py``). Every function here takes explicit arguments."""

from __future__ import annotations

import statistics

import pyarrow as pa
import pyarrow.parquet as pq

from cluster.resources import limit_threads
from cluster.space import Grid
from pipelines.engine import StepContext
from pipelines.mobilenet.config import ABLATION_VARIANTS
from pipelines.mobilenet.data import dataset_info

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
def train_config(
    root: str,
    optim: dict,
    model: dict,
    epochs: int = 0,
    max_train: int = 0,
    max_test: int = 0,
    fmt: str = "cifar10",
) -> dict:
    """The classify-loop config shared by every training step (without model/resolution/seed);
    ``max_train`` / ``max_test``: the first N images of each split (0 = all)."""
    o = dict(optim)
    return {
        "dataset_root": root,
        "dataset_format": fmt,
        "max_train": max_train,
        "max_test": max_test,
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
        # grey IDX images go in as one channel: only the stem conv's kernels change (3×3×1)
        "model_kwargs": {**model, **({"in_channels": 1} if fmt == "mnist" else {})},
    }


def _classifier_mb(cfg: dict, data: dict, models: list[tuple[str, dict, int]], batch: int) -> int:
    """A training unit's memory request: the set at ``min(resolution, 32)`` px as float32 (the
    loop downsizes once at load and upsizes per batch; three copies at the load's peak), and the
    largest of ``models`` (``(name, kwargs, resolution)``) training a batch of ``batch``."""
    from pipelines.memory import trainer_mb
    from stages.training.memory import meta_model

    channels = cfg["model_kwargs"].get("in_channels", 3)
    n = (cfg["max_train"] or data["num_train"]) + (cfg["max_test"] or data["num_test"])
    px = min(32, max(r for _, _, r in models))
    nets = [
        (meta_model(name, num_classes=cfg["num_classes"], **kw), (batch, channels, r, r))
        for name, kw, r in models
    ]
    states = 2 if cfg["optimizer"] == "adamw" else 1  # rmsprop: its square average; sgd: momentum
    return trainer_mb(nets, data_bytes=n * channels * px * px * 4, data_copies=3,
                      optimizer_states=states)  # fmt: skip


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

    data = dataset_info(ctx)
    cfg = train_config(
        data["root"],
        optim,
        model,
        0,
        data["num_train"],
        data["num_test"],
        data.get("format", "cifar10"),
    )
    cfg.update(model="mobilenetv2", resolution=resolution, checkpoint=checkpoint)
    cfg["model_kwargs"]["width_mult"] = width
    before = torch.get_num_threads()
    limit_threads(ctx.resources.threads())  # as Ray does per worker; matters in-process
    try:
        per_worker = max(1, cfg["batch_size"] // num_workers)
        mb = _classifier_mb(
            cfg, data, [(cfg["model"], cfg["model_kwargs"], resolution)], per_worker
        )
        result = ctx.train(train_classifier, cfg, num_workers=num_workers, memory_mb=mb)
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
        grey = {"in_channels": model["in_channels"]} if "in_channels" in model else {}
        return "mobilenetv1", {"width_mult": width, "stem_stride": model["stem_stride"], **grey}
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

    data = dataset_info(ctx)
    fmt = data.get("format", "cifar10")
    base = train_config(
        data["root"], optim, model, epochs, data["num_train"], data["num_test"], fmt
    )
    model = base["model_kwargs"]  # with in_channels=1 for grey IDX images
    trainable = functools.partial(
        sweep_trial, base=base, model=model, threads=ctx.resources.threads()
    )
    space = {"point": Grid(tuple(points)), "seed": Grid(tuple(seeds))}
    # the two sweep steps take turns: the Ray executor runs one Tune experiment per driver at once
    models = []
    for point in points:
        variant, width, res = parse_point(point)
        models.append((*model_for(variant, width, model), res))
    results = ctx.sweep(
        trainable,
        space,
        metric="accuracy",
        mode="max",
        scheduler=None if scheduler == "none" else scheduler,
        memory_mb=_classifier_mb(base, data, models, base["batch_size"]),
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
                "madds": count_madds(
                    net, res, kwargs.get("in_channels", 3)
                ),  # as trained: 10 classes
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
    # a trial an ASHA scheduler stopped after 1 or 4 epochs is no sample of the full-length result
    accs = [r["accuracy"] for r in rows if full_length(r, base["epochs"])]
    ctx.write_json(
        "metrics.json",
        {
            f"{ctx.step}_mean_accuracy": statistics.fmean(accs) if accs else None,
            f"{ctx.step}_trials_full_length": len(accs),
            f"{ctx.step}_trials": len(rows),
        },
    )


def full_length(row: dict, epochs: int) -> bool:
    """Whether a trial row ran all ``epochs`` without error (not stopped early by the scheduler)."""
    return row["error"] is None and row["accuracy"] is not None and row["epochs"] == epochs
