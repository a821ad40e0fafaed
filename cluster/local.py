"""In-process executor: the ``Executor`` contract (``cluster.executor``) with no Ray at all.

Used by unit tests and for debugging a step with a plain Python debugger. Work runs sequentially in
the calling process; resource requests are recorded but not enforced, except threads: every unit
of work runs with ``resources.threads()`` torch/OpenCV threads, as on Ray, so that an artifact's
bytes do not depend on the executor (issue 22).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cluster.executor import (
    ActorGroup,
    Executor,
    TrainResult,
    bar_desc,
    plain_report,
    progress_bar,
    train_position,
    train_total,
)
from cluster.resources import Resources, pinned_threads
from cluster.space import expand


def iter_batches(source: pa.Table | os.PathLike, batch_size: int) -> Iterable[pa.Table]:
    """Batches of ``batch_size`` rows from a table or a Parquet file, in order."""
    tables = [source] if isinstance(source, pa.Table) else [pq.read_table(os.fspath(source))]
    buffer: list[pa.Table] = []
    buffered = 0
    for table in tables:
        for batch in table.to_batches(max_chunksize=batch_size):
            buffer.append(pa.Table.from_batches([batch]))
            buffered += batch.num_rows
            while buffered >= batch_size:
                merged = pa.concat_tables(buffer).combine_chunks()
                yield merged.slice(0, batch_size)
                rest = merged.slice(batch_size)
                buffer, buffered = ([rest] if rest.num_rows else []), rest.num_rows
    if buffered:
        yield pa.concat_tables(buffer).combine_chunks()


class LocalExecutor(Executor):
    name = "local"
    max_parallel_steps = 1

    def __init__(self, progress: bool = True):
        self.progress = progress

    def run_task(self, fn: Callable, *args, resources: Resources = Resources(), **kwargs) -> Any:
        with pinned_threads(resources.threads()):
            return fn(*args, **kwargs)

    def map(
        self,
        fn: Callable,
        items: Sequence,
        *,
        resources: Resources = Resources(),
        desc: str = "map",
    ) -> list:
        out = []
        with (
            pinned_threads(resources.threads()),
            progress_bar(len(items), desc, "item", enabled=self.progress) as bar,
        ):
            for item in items:
                out.append(fn(item))
                bar.update(1)
        return out

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
        """Run ``predictor(**kwargs)(batch: pa.Table) -> pa.Table`` over ``source``; the
        returned tables, concatenated."""
        with pinned_threads(resources.threads()):
            return self._infer(source, predictor, predictor_kwargs, batch_size, desc)

    def _infer(self, source, predictor, predictor_kwargs, batch_size, desc) -> pa.Table:
        model = predictor(**predictor_kwargs)
        rows = (
            source.num_rows
            if isinstance(source, pa.Table)
            else pq.ParquetFile(os.fspath(source)).metadata.num_rows
        )
        out = []
        with progress_bar(rows, desc, "row", enabled=self.progress) as bar:
            for batch in iter_batches(source, batch_size):
                out.append(model(batch))
                bar.update(batch.num_rows)
        return pa.concat_tables(out) if out else pa.table({})

    def actors(
        self, factory: type, kwargs: Sequence[dict], *, resources: Resources = Resources()
    ) -> ActorGroup:
        return InProcessActors(factory, kwargs, threads=resources.threads())

    def train_capacity(
        self, num_workers: int = 1, resources_per_worker: Resources = Resources()
    ) -> int:
        """1: in one process, concurrent runs would share torch's global RNG and thread pool."""
        return 1

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
        from stages.training.context import LocalTrainContext

        ctx = LocalTrainContext(checkpoint_dir=Path(storage_path) / name / "local")
        unit, total = train_total(config)
        bar = progress_bar(total, bar_desc(name), unit, enabled=self.progress)
        report = ctx.report

        def report_and_show(metrics: dict, checkpoint: dict | None = None) -> None:
            report(metrics, checkpoint)
            position = train_position(metrics, config)
            if position is not None:
                bar.total = position[1] if position[1] is not None else bar.total
                bar.update(position[0] - bar.n)

        ctx.report = report_and_show  # type: ignore[method-assign]
        try:
            with pinned_threads(resources_per_worker.threads()):
                train_fn(ctx, config)
        finally:
            bar.close()
        metrics = ctx.history[-1] if ctx.history else {}
        checkpoint = ctx.last_checkpoint or ctx.load_checkpoint()
        return TrainResult(metrics=metrics, checkpoint=checkpoint, history=ctx.history)

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
        """Run every trial config in turn; ``trainable(config, report)`` calls ``report(metrics)``.

        Each finished trial is appended to ``<storage_path>/<name>/trials.jsonl``; with ``resume``
        the trials found there are kept and only the others run (like ``Tuner.restore``)."""
        journal = Path(storage_path) / name / "trials.jsonl"
        journal.parent.mkdir(parents=True, exist_ok=True)
        finished: dict[str, dict] = {}
        if resume and journal.exists():
            for line in journal.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    if r["error"] is None:  # errored trials run again, as resume_errored
                        finished[_trial_id(r["config"])] = r
        journal.write_text("".join(json.dumps(r, default=str) + "\n" for r in finished.values()))
        results = []
        configs = expand(space, num_samples, seed)
        with progress_bar(len(configs), bar_desc(name), "trial", enabled=self.progress) as bar:
            for config in configs:
                bar.update(len(results) - bar.n)
                if _trial_id(config) in finished:
                    results.append(finished[_trial_id(config)])
                    continue
                history: list[dict] = []
                error = None
                try:
                    with pinned_threads(resources_per_trial.threads()):
                        trainable(config, lambda m, h=history: h.append(plain_report(m)))
                except Exception as e:  # a failed trial is a result, as under Tune
                    error = f"{type(e).__name__}: {e}"
                result = {
                    "config": config,
                    "metrics": history[-1] if history else {},
                    "history": history,
                    "error": error,
                }
                results.append(result)
                with open(journal, "a") as f:
                    f.write(json.dumps(result, default=str) + "\n")
            bar.update(len(results) - bar.n)
        return results


class InProcessActors(ActorGroup):
    """`Executor.actors` in this process: one object per ``kwargs`` entry, built and called in
    turn with ``threads`` torch/OpenCV threads (results as on Ray: the same calls in the same
    order on each object)."""

    def __init__(self, factory: type, kwargs: Sequence[dict], *, threads: int = 1):
        self._threads = threads
        with pinned_threads(threads):
            self._objects = [factory(**kw) for kw in kwargs]

    def call(self, method: str, args: Sequence[tuple]) -> list:
        if len(args) != len(self._objects):
            raise ValueError(f"{len(args)} argument tuples for {len(self._objects)} actors")
        with pinned_threads(self._threads):
            return [getattr(o, method)(*a) for o, a in zip(self._objects, args, strict=True)]

    def close(self) -> None:
        self._objects = []

    def __enter__(self) -> InProcessActors:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _trial_id(config: dict) -> str:
    return json.dumps(config, sort_keys=True, default=str)
