"""The executor contract: what the engine in ``pipelines/`` may ask of an executor.

``LocalExecutor`` (``cluster.local``, in-process, no Ray) and ``RayExecutor``
(``cluster.ray_executor``) both declare ``Executor`` as their base and keep its signatures exactly
(``tests/cluster/test_executors.py`` compares them). A new executor (say, one that submits to a
batch scheduler) subclasses it and fills in its methods.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import pyarrow as pa

from cluster.progress import bar_desc, progress_bar  # noqa: F401 - the executors' bars
from cluster.resources import Resources


def plain_report(metrics: dict) -> dict:
    """A trial's report as both executors return it: exactly the keys the trial reported, values
    made JSON-plain (numpy scalars and arrays to Python numbers and lists). Tune adds its own
    bookkeeping to every result (date, hostname, pid, trial_id, config/...) and its history table
    fills keys a report lacks with NaN; an artifact built from trial reports must not depend on
    the executor (same key, same bytes)."""
    return json.loads(json.dumps(metrics, default=_json_plain))


def _json_plain(value):
    return value.tolist() if hasattr(value, "tolist") else str(value)


def train_position(metrics: dict, config: dict) -> tuple[float, float | None] | None:
    """How far a training run is, from one of its reports: ``(done, total)`` for the first of
    iteration/epoch/step that the report counts (total from the config's plural key, e.g.
    ``iterations``), None when the report counts none of them. A job of several runs (a config
    ``runs`` list, reports counting ``runs_done`` and, mid-run, ``run_step`` of the settings'
    ``steps``) counts runs, fractions included."""
    runs = config.get("runs")
    if isinstance(runs, list) and isinstance(metrics.get("runs_done"), int | float):
        done = float(metrics["runs_done"])
        steps = (config.get("settings") or {}).get("steps")
        if isinstance(metrics.get("run_step"), int | float) and isinstance(steps, int | float):
            done += min(1.0, metrics["run_step"] / steps) if steps else 0.0
        return round(done, 2), len(runs)  # the bar prints it: "2.67/6", not 2.6666666666666665
    for unit in TRAIN_UNITS:
        if isinstance(metrics.get(unit), int | float):
            total = config.get(f"{unit}s")
            return int(metrics[unit]), int(total) if isinstance(total, int | float) else None
    return None


TRAIN_UNITS = ("iteration", "epoch", "step")


def train_total(config: dict) -> tuple[str, int | None]:
    """The bar's unit and total before the first report: the first of ``iterations``/``epochs``/
    ``steps`` the training config sets (the unit its reports count, ``train_position``); runs
    for a job of several."""
    if isinstance(config.get("runs"), list):
        return "run", len(config["runs"])
    for unit in TRAIN_UNITS:
        if isinstance(config.get(f"{unit}s"), int | float):
            return unit, int(config[f"{unit}s"])
    return "report", None


@dataclass
class TrainResult:
    metrics: dict  # the last report
    checkpoint: dict | None  # the last checkpoint's contents, loaded
    history: list[dict]  # every report, in order


class ActorGroup(Protocol):
    """Long-lived units of work with state (`Executor.actors`), used as a context manager: the
    actors go when the block ends, whether it ends in an error or not."""

    def call(self, method: str, args: Sequence[tuple]) -> list:
        """``actor_i.method(*args[i])`` on every actor at once (one ``args`` entry per actor, in
        the order of their ``kwargs``); the results in that order. The first error raised by a
        call is raised here, as the remote code's own exception."""
        ...

    def close(self) -> None:
        """Free the actors (and their memory); idempotent."""
        ...

    def __enter__(self) -> ActorGroup: ...

    def __exit__(self, *exc) -> None: ...


@runtime_checkable
class Executor(Protocol):
    name: str  # "local", "ray"
    max_parallel_steps: int  # independent steps the engine may run at once
    progress: bool  # progress bars on

    def run_task(self, fn: Callable, *args, resources: Resources = Resources(), **kwargs) -> Any:
        """``fn(*args, **kwargs)`` as one unit of work with ``resources``; its return value."""
        ...

    def map(
        self,
        fn: Callable,
        items: Sequence,
        *,
        resources: Resources = Resources(),
        desc: str = "map",
    ) -> list:
        """``[fn(item) for item in items]``, each item its own unit of work; results in order."""
        ...

    def infer(
        self,
        source: pa.Table | os.PathLike,
        predictor: type,
        predictor_kwargs: dict,
        *,
        batch_size: int,
        resources: Resources = Resources(),
        num_actors: int = 1,
        desc: str = "infer",
    ) -> pa.Table:
        """``predictor(**predictor_kwargs)`` (built once per actor) over batches of ``source``: a
        table, or a reference to one Parquet file (an ``ArtifactFile``: any path-like that
        resolves on the node that reads it), which the actors read on their own nodes instead of
        it travelling through the object store; the tables it returns, concatenated, come back
        to the caller.
        They are meant to be small (a row per batch or per input row): a predictor with bulky
        output writes it to the store from its own node (``StepContext.output``) and returns
        what it wrote."""
        ...

    def actors(
        self, factory: type, kwargs: Sequence[dict], *, resources: Resources = Resources()
    ) -> ActorGroup:
        """One ``factory(**kw)`` per entry of ``kwargs``, each kept alive with its state between
        calls (Ray: an actor anywhere in the cluster; in-process: an object), behind an
        `ActorGroup`. An actor holds its memory (and GPU) request for its whole life but asks for
        no CPU: it computes only inside `ActorGroup.call`, while the step that owns it waits, and
        a CPU held between calls would starve the step's own tasks (an actor per CPU of a 2-CPU
        node would leave the map that feeds them none). Calls run with ``resources.threads()``."""
        ...

    def train(
        self,
        train_fn: Callable,
        config: dict,
        *,
        num_workers: int = 1,
        resources_per_worker: Resources = Resources(),
        storage_path: str,
        name: str,
        max_failures: int = 0,
    ) -> TrainResult:
        """``train_fn(ctx, config)`` on ``num_workers`` data-parallel workers; a rerun with the
        same ``(storage_path, name)`` resumes from the last checkpoint."""
        ...

    def train_capacity(
        self, num_workers: int = 1, resources_per_worker: Resources = Resources()
    ) -> int:
        """How many `train` runs of ``num_workers`` × ``resources_per_worker`` can run side by
        side now (at least 1): a step with independent runs starts that many at once."""
        ...

    def sweep(
        self,
        trainable: Callable,
        space: dict,
        *,
        metric: str,
        mode: str,
        num_samples: int = 1,
        max_concurrent: int | None = None,
        resources_per_trial: Resources = Resources(),
        storage_path: str,
        name: str,
        resume: bool = False,
        scheduler: str | None = None,
        seed: int = 0,
    ) -> list[dict]:
        """``trainable(config, report)`` for every config of ``space``; one dict per trial with
        ``config``, ``metrics`` (last report), ``history`` and ``error`` (None or a message)."""
        ...
