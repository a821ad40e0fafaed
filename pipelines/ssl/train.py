"""The SSL training steps: a method's runs under Ray Train, and the scalar-λ Tune sweep."""

from __future__ import annotations

import functools
import json

import numpy as np

from cluster.space import Grid
from pipelines.engine import StepContext


def _run_mb(ctx: StepContext, settings: dict, world: int = 1) -> int:
    """One SSL run's memory request (a Train worker's, or a λ trial's): the set as stored and
    as float32 (5 copies of its uint8 bytes), and the model training on a worker's share of the
    labelled batch and both views of the unlabeled one (weights, gradients, momentum, the EMA
    copy)."""
    from pipelines.memory import input_bytes, trainer_mb
    from stages.training.memory import meta_model

    raw = ctx.inputs["dataset"].read_bytes("metrics.json")
    meta = json.loads(raw) if raw is not None else {}
    if "image_shape" not in meta:  # a set made before the shape was recorded: the step's own
        return 0
    shape = tuple(meta["image_shape"])
    net = meta_model(settings.get("model", "wrn_28_2"), num_classes=10, in_channels=shape[0],
                     **dict(settings.get("model_kwargs", ())))  # fmt: skip
    batch = settings.get("batch_size", 64)
    per_worker = max(1, batch * (1 + 2 * settings.get("mu", 7)) // world)
    return trainer_mb([(net, (per_worker, *shape))], data_bytes=input_bytes(ctx, "dataset"),
                      data_copies=5, optimizer_states=2)  # fmt: skip


def train_method(
    ctx: StepContext,
    *,
    settings: dict,
    runs: list,
    val_per_class: int,
    num_workers: int,
    checkpoint_every: int = 0,
    max_failures: int = 0,
    parallel_runs: int = 0,
) -> None:
    """Every (labelled size, seed) run of one method under Ray Train; rows → ``runs.pt``, in
    ``runs`` order. The runs are independent (each seeds itself), so they are split into as many
    contiguous groups as Train runs fit on the cluster at once (the executor's `train_capacity`,
    1 in-process; ``parallel_runs`` > 0 caps it), each group one Train job started side by side;
    with one group it is one job, as before. Each job checkpoints every ``checkpoint_every``
    steps and survives ``max_failures`` worker-group losses, each resuming from its last
    checkpoint (``stages.ssl.train.ssl_train_fn``). How the runs are grouped changes no result."""
    import torch

    from stages.ssl.train import ssl_train_fn

    base = {
        "settings": settings,
        "val_per_class": val_per_class,
        "checkpoint_every": checkpoint_every,
        "data_path": ctx.input_file("dataset", "data.npz"),  # each worker resolves it
    }
    mb = _run_mb(ctx, settings, num_workers)
    k = ctx.train_capacity(num_workers, mb)  # 1 in-process: threads would share torch's RNG
    if parallel_runs:
        k = min(k, parallel_runs)
    groups = [g.tolist() for g in np.array_split(np.arange(len(runs)), max(1, min(k, len(runs))))]

    def train(group: list[int]) -> list:
        part = "" if len(groups) == 1 else f"runs{group[0]}-{group[-1]}"
        result = ctx.train(ssl_train_fn, {**base, "runs": [runs[i] for i in group]},
                           num_workers=num_workers, max_failures=max_failures, part=part,
                           memory_mb=mb)  # fmt: skip
        return result.checkpoint["results"]

    if len(groups) == 1:
        rows = train(groups[0])
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(groups), thread_name_prefix=ctx.step) as pool:
            rows = [row for part in pool.map(train, groups) for row in part]
    torch.save(rows, ctx.out_dir / "runs.pt")


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
        data_path=ctx.input_file("dataset", "data.npz"),
        settings=settings,
        val_per_class=val_per_class,
    )
    space = {
        "labels_per_class": Grid(tuple(labels_per_class)),
        "seed": Grid(tuple(seeds)),
        "scalar_weight": Grid(tuple(grid)),
    }
    trials = ctx.sweep(trainable, space, metric="val_accuracy", mode="max",
                       memory_mb=_run_mb(ctx, settings))  # fmt: skip
    failed = [t for t in trials if t["error"]]
    if failed:
        raise RuntimeError(f"{len(failed)} scalar-λ trials failed; first: {failed[0]['error']}")
    rows = [{**t["metrics"], **{k: t["config"][k] for k in space}} for t in trials]
    (ctx.out_dir / "trials.json").write_text(json.dumps(rows, indent=1, default=float))
