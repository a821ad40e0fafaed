"""Ray executor: tasks, Ray Data batch inference, Ray Train and Ray Tune behind one interface.

Same methods and semantics as ``cluster.local.LocalExecutor``. Every unit of work pins its torch and
OpenCV thread pools to its CPU request (Ray reuses workers; DESIGN "Facts about Ray").
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
from tqdm.auto import tqdm

from cluster.executor import Executor, TrainResult
from cluster.resources import Resources, limit_threads
from cluster.space import Choice, Grid, Uniform

_LIBRARY_IMPORT = threading.Lock()
_TUNE_RUN = threading.Lock()


def _import_train_and_tune() -> None:
    """Import Ray Train and Tune completely, once, under a lock. Independent steps run in threads
    of one driver; two of them entering Train/Tune's lazy imports at the same moment race on a
    circular import ("cannot import name '_CheckpointManager' from partially initialized module")."""
    with _LIBRARY_IMPORT:
        import ray.train  # noqa: F401
        import ray.train.torch  # noqa: F401
        import ray.tune  # noqa: F401
        import ray.tune.schedulers  # noqa: F401


def _schedulable_cpus() -> float:
    """The most CPUs one new training worker can be given: over the live nodes, the most a node
    has left once its placement groups' bundles are counted (Tune trials' drivers in `paperline
    sweep`, other training runs). At least 1; 0 when no node has CPUs (nothing to cap against)."""
    held: dict[str, float] = {}
    for pg in ray.util.placement_group_table().values():
        if pg["state"] == "CREATED":
            for index, bundle in pg["bundles"].items():
                node = pg["bundles_to_node_id"].get(index)
                held[node] = held.get(node, 0.0) + bundle.get("CPU", 0.0)
    free = [
        n["Resources"].get("CPU", 0.0) - held.get(n["NodeID"], 0.0)
        for n in ray.nodes()
        if n["Alive"] and n["Resources"].get("CPU", 0.0) > 0
    ]
    return max(1.0, float(int(max(free)))) if free else 0.0


def _call(fn: Callable, threads: int, *args, **kwargs):
    limit_threads(threads)
    return fn(*args, **kwargs)


@ray.remote
def _remote_call(fn: Callable, threads: int, args: tuple, kwargs: dict):
    return _call(fn, threads, *args, **kwargs)


class _PredictorActor:
    """Ray Data actor: builds the model once in ``__init__`` and applies it to each batch."""

    def __init__(self, factory: type, kwargs: dict, threads: int):
        limit_threads(threads)
        self.model = factory(**kwargs)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.model(batch)


class RayTrainContext:
    """``stages.training.context.TrainContext`` on Ray Train (V2 API)."""

    def __init__(self):
        import ray.train.torch as rt

        ctx = ray.train.get_context()
        self.world_size = ctx.get_world_size()
        self.rank = ctx.get_world_rank()
        self.device = rt.get_device()
        self._rt = rt

    def prepare_model(self, model):
        return self._rt.prepare_model(model)

    def prepare_data_loader(self, loader):
        return self._rt.prepare_data_loader(loader)

    def report(self, metrics: dict, checkpoint: dict | None = None) -> None:
        from stages.training.context import save_checkpoint

        with tempfile.TemporaryDirectory() as d:
            if checkpoint is not None and self.rank == 0:
                save_checkpoint(checkpoint, d)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            else:
                ray.train.report(metrics)

    def load_checkpoint(self) -> dict | None:
        from stages.training.context import load_checkpoint_file

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return load_checkpoint_file(Path(d) / "checkpoint.pt")


def _train_loop(train_fn: Callable, threads: int, config: dict) -> None:
    limit_threads(threads)
    train_fn(RayTrainContext(), config)


def _named_trial(trainable: Callable, threads: int, name: str) -> Callable[[dict], None]:
    """The function Tune runs, registered under a name unique to this experiment: Tune's registry
    is keyed by the function's name, so two experiments of one job (a sweep step inside a
    `paperline sweep` trial, or two sweep steps) must not share one, or one runs the other's
    trials."""

    def trial(config: dict) -> None:
        _tune_trial(trainable, threads, config)

    trial.__name__ = trial.__qualname__ = f"trial_{name}"
    return trial


def _tune_trial(trainable: Callable, threads: int, config: dict) -> None:
    from ray import tune

    limit_threads(threads)
    trainable(config, tune.report)


def _tune_space(space: dict) -> dict:
    from ray import tune

    out = {}
    for key, value in space.items():
        if isinstance(value, Grid):
            out[key] = tune.grid_search(list(value.values))
        elif isinstance(value, Uniform):
            out[key] = (tune.loguniform if value.log else tune.uniform)(value.low, value.high)
        elif isinstance(value, Choice):
            out[key] = tune.choice(list(value.values))
        else:
            out[key] = value
    return out


class RayExecutor(Executor):
    name = "ray"

    def __init__(self, progress: bool = True, max_parallel_steps: int = 4):
        self.progress = progress
        self.max_parallel_steps = max_parallel_steps

    def cluster_gpus(self) -> float:
        return float(ray.cluster_resources().get("GPU", 0.0))

    def _options(self, resources: Resources) -> dict:
        opts: dict[str, Any] = {
            "num_cpus": resources.cpus,
            "num_gpus": resources.resolve_gpus(self.cluster_gpus()),
            # never inherit a caller's placement group: a pipeline run inside a Tune trial
            # (`paperline sweep`) schedules its steps on the cluster, not in the trial's bundle
            "scheduling_strategy": "DEFAULT",
        }
        if resources.memory_mb:
            opts["memory"] = resources.memory_mb * (1 << 20)
        return opts

    def run_task(self, fn: Callable, *args, resources: Resources = Resources(), **kwargs) -> Any:
        ref = _remote_call.options(**self._options(resources)).remote(
            fn, resources.threads(), args, kwargs
        )
        return ray.get(ref)

    def map(
        self,
        fn: Callable,
        items: Sequence,
        *,
        resources: Resources = Resources(),
        desc: str = "map",
    ) -> list:
        """One Ray task per item (retried by Ray if its worker or node dies); results in order."""
        remote = _remote_call.options(**self._options(resources), max_retries=3)
        refs = [remote.remote(fn, resources.threads(), (item,), {}) for item in items]
        bar = tqdm(total=len(refs), desc=desc, unit="item", disable=not self.progress)
        pending = list(refs)
        while pending:  # no ray.get in a loop: wait for whichever finishes next
            done, pending = ray.wait(pending, num_returns=1)
            bar.update(len(done))
        bar.close()
        return ray.get(refs)

    def infer(
        self,
        source: pa.Table | Sequence[str],
        predictor: type,
        predictor_kwargs: dict,
        output_dir: str | Path,
        *,
        batch_size: int,
        resources: Resources = Resources(),
        num_actors: int = 1,
        desc: str = "infer",
    ) -> None:
        """Ray Data ``map_batches`` with an actor pool; each actor holds one model (GPU if asked)."""
        if isinstance(source, pa.Table):
            # one block per batch, so every actor of the pool gets work (a single block would
            # feed a single actor)
            blocks = [source.slice(i, batch_size) for i in range(0, source.num_rows, batch_size)]
            ds = ray.data.from_arrow(blocks or [source])
        else:
            ds = ray.data.read_parquet(list(source))
        opts = self._options(resources)
        ds = ds.map_batches(
            _PredictorActor,
            fn_constructor_kwargs={
                "factory": predictor,
                "kwargs": predictor_kwargs,
                "threads": resources.threads(),
            },
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_cpus=opts["num_cpus"],
            num_gpus=opts["num_gpus"],
        )
        ds.write_parquet(str(output_dir))

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
        """Ray Train ``TorchTrainer``. Resume = the same (name, storage_path): a rerun after a crash
        starts from the last reported checkpoint (Train V2 has no ``Trainer.restore``)."""
        _import_train_and_tune()
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        cap = _schedulable_cpus()
        if 0 < cap < resources_per_worker.cpus:  # a request above it would wait for ever
            resources_per_worker = dataclasses.replace(resources_per_worker, cpus=cap)
        gpus = resources_per_worker.resolve_gpus(self.cluster_gpus())
        trainer = TorchTrainer(
            functools.partial(_train_loop, train_fn, resources_per_worker.threads()),
            train_loop_config=config,
            scaling_config=ScalingConfig(
                num_workers=num_workers,
                use_gpu=gpus > 0,
                resources_per_worker={
                    "CPU": resources_per_worker.cpus,
                    **({"GPU": gpus} if gpus else {}),
                },
            ),
            run_config=RunConfig(
                name=name,
                storage_path=storage_path,
                failure_config=FailureConfig(max_failures=max_failures),
            ),
        )
        result = trainer.fit()
        checkpoint = None
        if result.checkpoint is not None:
            from stages.training.context import load_checkpoint_file

            with result.checkpoint.as_directory() as d:
                checkpoint = load_checkpoint_file(Path(d) / "checkpoint.pt")
        history = [
            dict(m)
            for m in (
                result.metrics_dataframe.to_dict("records")
                if result.metrics_dataframe is not None
                else []
            )
        ]
        return TrainResult(
            metrics=dict(result.metrics or {}), checkpoint=checkpoint, history=history
        )

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
        """Ray Tune ``Tuner``; ``resume`` restores an interrupted experiment and runs only the
        unfinished trials. Leave CPUs free when trials use Ray Data inside (else it hangs).

        One Tune run at a time per driver: two ``Tuner.fit`` calls in threads of one process
        crash in Tune's process-global registry ("dictionary changed size during iteration"), so
        concurrent sweep steps queue here; each still runs its own trials in parallel."""
        with _TUNE_RUN:
            return self._sweep(
                trainable,
                space,
                metric=metric,
                mode=mode,
                num_samples=num_samples,
                max_concurrent=max_concurrent,
                resources_per_trial=resources_per_trial,
                storage_path=storage_path,
                name=name,
                resume=resume,
                scheduler=scheduler,
                seed=seed,
            )

    def _sweep(
        self,
        trainable: Callable,
        space: dict,
        *,
        metric: str,
        mode: str,
        num_samples: int,
        max_concurrent: int | None,
        resources_per_trial: Resources,
        storage_path: str,
        name: str,
        resume: bool,
        scheduler: str | None,
        seed: int,
    ) -> list[dict]:
        import os

        _import_train_and_tune()
        from ray import tune

        # Save the experiment state at least every second (Tune's automatic period is >= 10 s):
        # trials here are whole pipeline runs, few and long, and a sweep killed just after a trial
        # finished must not run that trial again on --resume.
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
        gpus = resources_per_trial.resolve_gpus(self.cluster_gpus())
        fn = tune.with_resources(
            _named_trial(trainable, resources_per_trial.threads(), name),
            {"cpu": resources_per_trial.cpus, "gpu": gpus},
        )
        path = f"{storage_path.rstrip('/')}/{name}"
        if resume and tune.Tuner.can_restore(path):
            tuner = tune.Tuner.restore(
                path, trainable=fn, resume_unfinished=True, resume_errored=True
            )
        else:
            sched = None
            if scheduler == "asha":
                sched = tune.schedulers.ASHAScheduler()
            elif scheduler:
                raise ValueError(f"unknown scheduler {scheduler!r}; valid: asha")
            tuner = tune.Tuner(
                fn,
                param_space=_tune_space(space),
                tune_config=tune.TuneConfig(
                    metric=metric,
                    mode=mode,
                    num_samples=num_samples,
                    max_concurrent_trials=max_concurrent,
                    scheduler=sched,
                    # A new trial actor is a new Python process importing Tune, the pipeline and
                    # usually torch (≈ 3-5 s between trials on 2 cores, measured): reuse finished
                    # trials' actors. Every trial of one sweep asks for the same resources, and
                    # each trial seeds itself and pins its threads, so nothing it depends on
                    # carries over from the last trial that actor ran.
                    reuse_actors=True,
                ),
                run_config=tune.RunConfig(name=name, storage_path=storage_path, verbose=0),
            )
        grid = tuner.fit()
        results = []
        for r in grid:
            history = (
                r.metrics_dataframe.to_dict("records") if r.metrics_dataframe is not None else []
            )
            results.append(
                {
                    "config": r.config,
                    "metrics": dict(r.metrics or {}),
                    "history": history,
                    "error": str(r.error) if r.error else None,
                }
            )
        return results
