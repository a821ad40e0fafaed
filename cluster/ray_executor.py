"""Ray executor: tasks, Ray Data batch inference, Ray Train and Ray Tune behind one interface.

Same methods and semantics as ``cluster.local.LocalExecutor``. Every unit of work pins its torch and
OpenCV thread pools to its CPU request (Ray reuses workers; DESIGN "Facts about Ray").
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray

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
from cluster.resources import Resources, limit_threads
from cluster.space import Choice, Grid, Uniform, expand
from data.store import join_uri

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


def _driver_node_resource() -> dict[str, float]:
    """A sliver of this driver's node's own ``node:<ip>`` resource, which only that node has:
    asked for by a unit that must run here. Empty when the driver is not a node of the cluster
    (a Ray Client), where nothing can be pinned to it."""
    key = f"node:{ray.util.get_node_ip_address()}"
    return {key: 0.001} if ray.cluster_resources().get(key) else {}


def _worker_resources(resources: Resources, gpus: float) -> dict:
    """A Train worker's resource request: its CPUs, GPUs and memory (the step's estimate)."""
    out: dict[str, float] = {"CPU": resources.cpus}
    if gpus:
        out["GPU"] = gpus
    if resources.memory_mb:
        out["memory"] = _capped_memory(resources.memory_mb * (1 << 20))
    return out


def _trial_resources(resources: Resources, gpus: float) -> dict:
    """A Tune trial's request (``tune.with_resources``' dict): its CPUs, GPUs, memory (the step's
    estimate, capped as tasks' are) and the driver's node where the step must run there."""
    request = {"cpu": resources.cpus, "gpu": gpus}
    if resources.memory_mb:
        request["memory"] = _capped_memory(resources.memory_mb * (1 << 20))
    if resources.driver_node:
        request.update(_driver_node_resource())
    return request


def _capped_memory(request: int) -> int:
    """A unit's memory request (bytes, from its step's own estimate), at most the largest live
    node's ``memory`` resource: a request no node can grant would wait for ever (a whole node it
    is, then). Not capped where an autoscaler may start other node types."""
    from ray._private.state import state

    try:
        if state.get_cluster_config() is not None:
            return request
    except Exception:  # noqa: BLE001 - private Ray API: treat as no autoscaler
        pass
    nodes = [n["Resources"].get("memory", 0.0) for n in ray.nodes() if n["Alive"]]
    largest = int(max(nodes, default=0.0))
    return min(request, largest) if largest > 0 else request


def original_error(error: BaseException) -> BaseException:
    """The exception user code raised, out of Ray's wrappings: a task's ``RayTaskError`` (whose
    message repeats the remote traceback), Ray Data's ``UserCodeException``, Ray Train's
    ``WorkerGroupError``/``ControllerError``. Users see ``DatasetError: <path>: <problem>`` in one
    line, as in-process (issue 22); the remote traceback stays on ``remote_traceback``."""
    from ray.exceptions import RayTaskError, UserCodeException

    seen = 0
    remote = ""
    while seen < 10:  # wrappings nest (a Train worker's task error inside a worker-group error)
        seen += 1
        if isinstance(error, RayTaskError) and error.cause is not None:
            remote = remote or str(error)
            error = error.cause
        elif isinstance(error, UserCodeException) and error.__cause__ is not None:
            error = error.__cause__
        elif getattr(error, "worker_failures", None):  # ray.train WorkerGroupError
            remote = remote or str(error)
            error = next(iter(error.worker_failures.values()))
        elif getattr(error, "controller_failure", None) is not None:  # ray.train ControllerError
            error = error.controller_failure
        else:
            break
    if remote and not getattr(error, "remote_traceback", ""):
        try:
            error.remote_traceback = remote  # type: ignore[attr-defined]
        except AttributeError:  # pragma: no cover - exceptions with __slots__
            pass
    return error


def _get(refs):
    """``ray.get`` raising the remote code's own exception (``original_error``)."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        raise original_error(e) from None


def _owned(obj):
    """``obj`` with every numpy array copied out of the object store. ``ray.get`` maps arrays
    zero-copy onto the store's shared memory, which pins the object for as long as the array lives:
    a map that kept its results that way would hold every task's result in the store until the
    step ends (issue 19: the store's peak grew with the number of tasks). Containers (dict, list,
    tuple) are walked; other objects are returned as they are."""
    if isinstance(obj, np.ndarray):
        return obj if obj.flags.owndata and obj.flags.writeable else obj.copy()
    if isinstance(obj, dict):
        return {k: _owned(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_owned(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_owned(v) for v in obj)
    return obj


def _owned_table(table: pa.Table) -> pa.Table:
    """``table`` copied out of the object store (the Arrow counterpart of ``_owned``): a block
    ``iter_batches`` hands over is a view of the store's shared memory, and a step keeping the
    blocks would keep every one of them in the store until it ends."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return pa.ipc.open_stream(sink.getvalue()).read_all()


def _call(fn: Callable, threads: int, *args, **kwargs):
    limit_threads(threads)
    return fn(*args, **kwargs)


def autoscaler_gpus() -> float:
    """The most GPUs the cluster's autoscaler may start: its node types (``ray up``'s
    ``available_node_types``, KubeRay's worker groups) times their ``max_workers``, as the
    autoscaler publishes them in the GCS (what Ray Data reads for the same purpose). 0 without an
    autoscaler (an embedded Ray, a fixed ``ray start`` cluster) or where Ray's private accessor is
    unavailable; unbounded groups count as ``sys.maxsize``."""
    try:
        from ray._private.state import state

        limits = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # noqa: BLE001 - private Ray API: absent or changed means "no autoscaler"
        return 0.0
    return float(limits.get("GPU", 0) or 0)


@ray.remote
def _remote_call(fn: Callable, threads: int, args: tuple, kwargs: dict):
    return _call(fn, threads, *args, **kwargs)


@ray.remote(num_cpus=0, max_restarts=0)
class _ActorHost:
    """One actor of `RayActors`: the object ``factory(**kwargs)`` and its state. Not restarted
    when its process dies (its state would be gone): the call fails, and with it the step."""

    def __init__(self, factory: type, kwargs: dict, threads: int):
        self._threads = threads
        limit_threads(threads)
        self._object = factory(**kwargs)

    def call(self, method: str, args: tuple):
        limit_threads(self._threads)
        return getattr(self._object, method)(*args)


class RayActors(ActorGroup):
    """`Executor.actors` on Ray: one `_ActorHost` per ``kwargs`` entry, spread over the nodes
    (their memory with them), each asking for ``resources``' memory and GPUs and no CPU (see
    `Executor.actors`)."""

    def __init__(self, factory: type, kwargs: Sequence[dict], *, options: dict, threads: int):
        opts = {**options, "num_cpus": 0, "scheduling_strategy": "SPREAD"}
        self._actors = [_ActorHost.options(**opts).remote(factory, kw, threads) for kw in kwargs]

    def call(self, method: str, args: Sequence[tuple]) -> list:
        if len(args) != len(self._actors):
            raise ValueError(f"{len(args)} argument tuples for {len(self._actors)} actors")
        refs = [a.call.remote(method, tuple(x)) for a, x in zip(self._actors, args, strict=True)]
        try:
            return [_owned(r) for r in _get(refs)]
        finally:
            del refs  # results leave the object store as they are returned

    def close(self) -> None:
        for a in self._actors:
            ray.kill(a, no_restart=True)
        self._actors = []

    def __enter__(self) -> RayActors:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@ray.remote(num_cpus=0)
class _Progress:
    """Where remote work counts what it has done, for the driver's progress bar (``_RemoteBar``):
    Ray Data's and Train's own displays are off (``runtime.quiet_data``, ``log_to_driver``)."""

    def __init__(self):
        self.done, self.total = 0, None

    def add(self, n: float) -> None:
        self.done += n

    def set(self, done: float, total: float | None) -> None:
        self.done, self.total = done, total if total is not None else self.total

    def get(self) -> tuple[float, float | None]:
        return self.done, self.total


class _RemoteBar:
    """A driver-side bar fed by a ``_Progress`` actor, polled every second while the work runs."""

    def __init__(self, total: float | None, desc: str, unit: str, enabled: bool):
        self.enabled = enabled
        self.actor = _Progress.remote() if enabled else None
        self._bar_args = (total, desc, unit)
        self.bar = None  # drawn from `with` on: its clock starts with the work
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(1.0):
            self._update()

    def _update(self) -> None:
        try:
            done, total = ray.get(self.actor.get.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - a display, never a reason to fail the step
            return
        if total is not None and self.bar.total != total:
            self.bar.total = total
        self.bar.update(done - self.bar.n)

    def __enter__(self) -> _RemoteBar:
        self.bar = progress_bar(*self._bar_args, enabled=self.enabled)
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._stop.set()
            self._thread.join()
            self._update()
            ray.kill(self.actor)
        self.bar.close()


class _PredictorActor:
    """Ray Data actor: builds the model once in ``__init__`` and applies it to each batch. With
    ``rows`` (a reference to a Parquet file) its input blocks hold batch numbers: it reads the
    file once, on its own node, and applies the model to rows ``[i * batch_size, (i + 1) *
    batch_size)`` for each number ``i`` of the block."""

    def __init__(
        self,
        factory: type,
        kwargs: dict,
        threads: int,
        progress=None,
        rows: os.PathLike | None = None,
        batch_size: int = 0,
    ):
        limit_threads(threads)
        self.model = factory(**kwargs)
        self.progress = progress
        self.rows, self.batch_size, self._table = rows, batch_size, None

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.rows is None:
            return self._apply(batch)
        if self._table is None:  # an index: small next to what the model makes of its rows
            import pyarrow.parquet as pq

            self._table = pq.read_table(os.fspath(self.rows))
        return pa.concat_tables(
            [
                self._apply(self._table.slice(i * self.batch_size, self.batch_size))
                for i in batch.column("batch").to_pylist()
            ]
        ).combine_chunks()  # one chunk, not one per batch: an Arrow chunk costs ~100 B stored

    def _apply(self, batch: pa.Table) -> pa.Table:
        out = self.model(batch)
        if self.progress is not None:
            self.progress.add.remote(batch.num_rows)
        return out


# Blocks of batch numbers per actor when ``infer`` reads a Parquet file: a fixed number, so the
# object store holds as many small blocks whatever the rows. An actor takes its next block when
# it has finished one (one task in flight: its input is a few numbers, nothing to prefetch), so
# the actors stay balanced to within one block, a quarter of a share.
BLOCKS_PER_ACTOR = 4


# Checkpoints a Train run keeps in its storage: the newest to resume from, and the one before in
# case the newest was cut short. Ray Train V2's CheckpointConfig(num_to_keep=...) would do it but
# also drops the deleted checkpoints' reports from the run's metrics history, which steps use.
KEEP_CHECKPOINTS = 2


PRUNED = "PRUNED.txt"


def _prune_checkpoints(keep: int) -> None:
    """Empty all but the ``keep`` newest ``checkpoint_<time>`` folders of this Train run (rank 0,
    after its report has persisted the newest), on whatever filesystem the run stores them. The
    folders stay, holding only a note: a resumed run's controller checks that every checkpoint
    its snapshot lists still exists, and resumes from the newest."""
    import pyarrow.fs as pafs

    storage = ray.train.get_context().get_storage()
    fs, run_dir = storage.storage_filesystem, storage.experiment_fs_path
    infos = fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    folders = sorted(  # Ray names them checkpoint_%Y-%m-%d_%H-%M-%S.%f: sorted = in time order
        i.path
        for i in infos
        if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")
    )
    for old in folders[:-keep] if keep > 0 else []:
        if fs.get_file_info(f"{old}/{PRUNED}").type == pafs.FileType.File:
            continue
        fs.delete_dir_contents(old)
        with fs.open_output_stream(f"{old}/{PRUNED}") as f:
            f.write(
                f"emptied by paperline: a Train run keeps its {keep} newest checkpoints\n".encode()
            )


class RayTrainContext:
    """``stages.training.context.TrainContext`` on Ray Train (V2 API)."""

    def __init__(self, progress=None, config: dict | None = None):
        import ray.train.torch as rt

        self._progress, self._config = progress, config or {}

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
                _prune_checkpoints(KEEP_CHECKPOINTS)
            else:
                ray.train.report(metrics)
        position = train_position(metrics, self._config)
        if self._progress is not None and self.rank == 0 and position is not None:
            self._progress.set.remote(*position)

    def load_checkpoint(self) -> dict | None:
        from stages.training.context import load_checkpoint_file

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return load_checkpoint_file(Path(d) / "checkpoint.pt")


def _train_loop(train_fn: Callable, threads: int, progress, config: dict) -> None:
    limit_threads(threads)
    train_fn(RayTrainContext(progress, config), config)


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

    def report(metrics: dict) -> None:  # the exact report rides along, for `_reported`
        tune.report({**metrics, _REPORT: json.dumps(plain_report(metrics))})

    trainable(config.get(_TRIAL, config), report)


_REPORT = "__paperline_report__"


def _reported(result: dict) -> dict:
    """What the trial reported (``plain_report``), out of a Tune result or history row."""
    return json.loads(result[_REPORT]) if isinstance(result.get(_REPORT), str) else {}


_TRIAL = "__paperline_trial__"  # one grid value per pre-drawn trial config (see _tune_space)


def _tune_space(space: dict, num_samples: int, seed: int) -> tuple[dict, int]:
    """Tune's param space and num_samples for ``space``. A space with sampled dimensions is drawn
    here, with ``cluster.space.expand`` and the sweep's seed, exactly as the in-process executor
    draws it, and given to Tune as a grid of whole configs: Tune's own sampling ignored the seed,
    so the same sweep drew other trials on Ray (issue 18)."""
    from ray import tune

    if any(isinstance(v, Uniform | Choice) for v in space.values()):
        return {_TRIAL: tune.grid_search(expand(space, num_samples, seed))}, 1
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
    return out, num_samples


def _trial_bar(total: int, desc: str, enabled: bool):
    """A Tune callback (it runs on the driver) counting finished trials on one bar, from the
    experiment's start (``setup``) to its end; ``close()`` ends it if Tune stopped early."""
    from ray import tune

    class TrialBar(tune.Callback):
        def __init__(self):
            self.bar = None  # made when the experiment starts (a restored one starts again)

        def _bar(self):
            if self.bar is None:
                self.bar = progress_bar(total, desc, "trial", enabled=enabled)
            return self.bar

        def __getstate__(self):
            # Tune pickles its run config (callbacks included) with the experiment state; a bar
            # holds the display's lock and is the driver's own
            return {**self.__dict__, "bar": None}

        def setup(self, **info):
            self._bar()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._bar().update(1)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._bar().update(1)

        def on_experiment_end(self, trials, **info):
            self.close()

        def close(self):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return TrialBar()


def trust_store() -> bool:
    """Whether Tune state may be unpickled from an object-store path (``--trust-store``)."""
    return os.environ.get("PAPERLINE_TRUST_STORE", "") not in ("", "0", "false")


def _one_line(error: BaseException) -> str:
    """``Type: message`` as the in-process executor reports a failed trial."""
    return f"{type(error).__name__}: {error}"


INLINE_FN_BYTES = 64 * 1024


def _shipped(fn: Callable):
    """What a map sends its tasks as ``fn``: the function itself when it pickles to under
    ``INLINE_FN_BYTES`` (Ray inlines arguments under 100 KiB in each task's message, so the
    object store never holds it), else one ``ray.put`` for the whole map. Freed objects leave
    the store asynchronously (in batches, about once a second), so a put per call of maps that
    follow one another quickly — svm's mining rounds — piled up their functions in the store,
    one per round, as if per task."""
    from ray import cloudpickle

    try:
        small = len(cloudpickle.dumps(fn)) < INLINE_FN_BYTES
    except Exception:  # noqa: BLE001 - Ray's own serializer may still take it: put it
        small = False
    return fn if small else ray.put(fn)


class RayExecutor(Executor):
    name = "ray"

    def __init__(self, progress: bool = True, max_parallel_steps: int = 4):
        self.progress = progress
        self.max_parallel_steps = max_parallel_steps

    def cluster_gpus(self) -> float:
        """GPUs the cluster has now or, with an autoscaler, can start (`autoscaler_gpus`): with
        GPU workers at ``min_workers: 0`` a cluster has none until something asks for one, so
        ``gpus="auto"`` counting only the present ones would never start a GPU node (issue 18)."""
        return float(ray.cluster_resources().get("GPU", 0.0)) or autoscaler_gpus()

    def _options(self, resources: Resources) -> dict:
        opts: dict[str, Any] = {
            "num_cpus": resources.cpus,
            "num_gpus": resources.resolve_gpus(self.cluster_gpus()),
            # never inherit a caller's placement group: a pipeline run inside a Tune trial
            # (`paperline sweep`) schedules its steps on the cluster, not in the trial's bundle
            "scheduling_strategy": "DEFAULT",
        }
        if resources.memory_mb:
            opts["memory"] = _capped_memory(resources.memory_mb * (1 << 20))
        return opts

    def run_task(self, fn: Callable, *args, resources: Resources = Resources(), **kwargs) -> Any:
        ref = _remote_call.options(**self._options(resources)).remote(
            fn, resources.threads(), args, kwargs
        )
        return _get(ref)

    def map(
        self,
        fn: Callable,
        items: Sequence,
        *,
        resources: Resources = Resources(),
        desc: str = "map",
    ) -> list:
        """One Ray task per item (retried by Ray if its worker or node dies); results in order.

        ``fn`` (often a partial holding a model's weights) goes to the object store once per call
        and reaches each node once, not pickled into every task (issue 19); a small one travels
        in each task's own message instead (`_shipped`)."""
        remote = _remote_call.options(**self._options(resources), max_retries=3)
        fn_ref = _shipped(fn) if items else None
        pending = [remote.remote(fn_ref, resources.threads(), (item,), {}) for item in items]
        position = {ref: i for i, ref in enumerate(pending)}
        results: list = [None] * len(pending)
        bar = progress_bar(len(pending), desc, "item", enabled=self.progress)
        try:
            while pending:  # whichever finishes next, fetched and released at once
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    results[position.pop(ref)] = _owned(_get(ref))
                del done, ref  # the last references: the result leaves the object store now
                bar.update(1)
        except BaseException:
            for ref in pending:  # a failed item fails the map: stop the rest
                ray.cancel(ref)
            raise
        finally:
            bar.close()
        return results

    def actors(
        self, factory: type, kwargs: Sequence[dict], *, resources: Resources = Resources()
    ) -> ActorGroup:
        return RayActors(factory, kwargs, options=self._options(resources),
                         threads=resources.threads())  # fmt: skip

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
        """Ray Data ``map_batches`` with an actor pool; each actor holds one model (GPU if asked).

        A table source goes into the object store whole, one block per batch so that every actor
        of the pool gets work (a single block would feed a single actor). A Parquet file
        reference does not: the blocks hold batch numbers, ``BLOCKS_PER_ACTOR`` blocks per actor
        whatever the number of rows, and each actor reads the file on its own node and runs a
        block's batches one after the other in one call. The (small) output blocks are taken as
        they are made, not gathered in the store first; nothing is written to a path, which on
        a cluster would be the disk of whichever node ran the write."""
        in_flight = None  # Ray Data's default
        constructor = {
            "factory": predictor,
            "kwargs": predictor_kwargs,
            "threads": resources.threads(),
        }
        if isinstance(source, pa.Table):
            rows = source.num_rows
            blocks = [source.slice(i, batch_size) for i in range(0, source.num_rows, batch_size)]
            ds = ray.data.from_arrow(blocks or [source])
        else:
            import pyarrow.parquet as pq

            rows = pq.ParquetFile(os.fspath(source)).metadata.num_rows  # the footer only
            batches = -(-rows // batch_size)
            if not batches:
                return pa.table({})
            ds = ray.data.from_items(
                [{"batch": i} for i in range(batches)],
                override_num_blocks=min(batches, BLOCKS_PER_ACTOR * max(1, num_actors)),
            )
            constructor.update(rows=source, batch_size=batch_size)
            batch_size, in_flight = None, 1  # a block of batch numbers per call
        opts = self._options(resources)
        remote_bar = _RemoteBar(rows, desc, "row", self.progress)
        ds = ds.map_batches(
            _PredictorActor,
            fn_constructor_kwargs={**constructor, "progress": remote_bar.actor},
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(
                size=num_actors, max_tasks_in_flight_per_actor=in_flight
            ),
            num_cpus=opts["num_cpus"],
            num_gpus=opts["num_gpus"],
            **({"memory": opts["memory"]} if "memory" in opts else {}),
        )
        out = []
        try:
            with remote_bar:
                for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    if block.num_rows:
                        out.append(_owned_table(block))
        except Exception as e:  # noqa: BLE001 - re-raised as the predictor's own error
            raise original_error(e) from None
        finally:
            # the finished execution holds its blocks' references in reference cycles: they
            # stayed in the object store through the steps that followed until a collection
            del ds
            gc.collect()
        return pa.concat_tables(out) if out else pa.table({})

    def train_capacity(
        self, num_workers: int = 1, resources_per_worker: Resources = Resources()
    ) -> int:
        """Runs of ``num_workers`` workers that fit in the cluster's CPUs (and GPUs, when a worker
        asks for some, and memory when it asks for that) at once, counting what the nodes have,
        not what is free now: runs beyond what is free wait for it (never beyond a node's size,
        `_schedulable_cpus`)."""
        total = ray.cluster_resources()
        cpus = float(total.get("CPU", 0.0))
        per_run = num_workers * max(resources_per_worker.cpus, 1e-3)
        n = int(cpus // per_run)
        if resources_per_worker.memory_mb:
            request = _capped_memory(resources_per_worker.memory_mb * (1 << 20))
            n = min(n, int(float(total.get("memory", 0.0)) // (num_workers * request)))
        gpus = resources_per_worker.resolve_gpus(self.cluster_gpus())
        if gpus:
            n = min(n, int(self.cluster_gpus() // (num_workers * gpus)))
        return max(1, n)

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
            # fewer CPUs, the same threads: the thread count is part of the step's key (a sweep's
            # trial once fine-tuned on 1 thread and a plain run on 2, 5 mAP points apart)
            resources_per_worker = dataclasses.replace(
                resources_per_worker, cpus=cap, torch_threads=resources_per_worker.threads()
            )
        gpus = resources_per_worker.resolve_gpus(self.cluster_gpus())
        unit, total = train_total(config)
        remote_bar = _RemoteBar(total, bar_desc(name), unit, self.progress)
        trainer = TorchTrainer(
            functools.partial(
                _train_loop, train_fn, resources_per_worker.threads(), remote_bar.actor
            ),
            train_loop_config=config,
            scaling_config=ScalingConfig(
                num_workers=num_workers,
                use_gpu=gpus > 0,
                resources_per_worker=_worker_resources(resources_per_worker, gpus),
            ),
            run_config=RunConfig(
                name=name,
                storage_path=storage_path,
                failure_config=FailureConfig(max_failures=max_failures),
                # every checkpoint is kept: Train V2 builds `metrics_dataframe` (the step's
                # history) from the kept checkpoints' reports, so num_to_keep=2 cut the history
                # to its last 2 entries. Finished steps' checkpoints go with `paperline gc`.
            ),
        )
        try:
            with remote_bar:
                result = trainer.fit()
        except Exception as e:  # noqa: BLE001 - re-raised as the training function's own error
            raise original_error(e) from None
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
        _import_train_and_tune()
        from ray import tune

        # Save the experiment state at least every second (Tune's automatic period is >= 10 s):
        # trials here are whole pipeline runs, few and long, and a sweep killed just after a trial
        # finished must not run that trial again on --resume.
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
        gpus = resources_per_trial.resolve_gpus(self.cluster_gpus())
        request = _trial_resources(resources_per_trial, gpus)
        fn = tune.with_resources(
            _named_trial(trainable, resources_per_trial.threads(), name), request
        )
        path = join_uri(storage_path, name)
        trial_bar = _trial_bar(len(expand(space, num_samples, seed)), bar_desc(name), self.progress)
        if resume and tune.Tuner.can_restore(path):
            if "://" in path and not path.startswith("file://") and not trust_store():
                # Tuner.restore unpickles the experiment state: from an object store anyone
                # with write access to the bucket could run code on this driver (issue 18)
                raise PermissionError(
                    f"{path}: an interrupted Tune experiment is on an object store; resuming it "
                    "unpickles its state. Pass --trust-store (or PAPERLINE_TRUST_STORE=1) if you "
                    "trust everyone who can write there, or --force STEP to start it afresh"
                )
            tuner = tune.Tuner.restore(
                path, trainable=fn, resume_unfinished=True, resume_errored=True
            )
        else:
            sched = None
            if scheduler == "asha":
                sched = tune.schedulers.ASHAScheduler()
            elif scheduler:
                raise ValueError(f"unknown scheduler {scheduler!r}; valid: asha")
            param_space, samples = _tune_space(space, num_samples, seed)
            tuner = tune.Tuner(
                fn,
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    metric=metric,
                    mode=mode,
                    num_samples=samples,
                    max_concurrent_trials=max_concurrent,
                    scheduler=sched,
                    # A new trial actor is a new Python process importing Tune, the pipeline and
                    # usually torch (≈ 3-5 s between trials on 2 cores, measured): reuse finished
                    # trials' actors. Every trial of one sweep asks for the same resources, and
                    # each trial seeds itself and pins its threads, so nothing it depends on
                    # carries over from the last trial that actor ran.
                    reuse_actors=True,
                ),
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=storage_path,
                    verbose=0,
                    callbacks=[trial_bar],
                ),
            )
        try:
            grid = tuner.fit()
        finally:
            trial_bar.close()
        results = []
        for r in grid:
            rows = r.metrics_dataframe.to_dict("records") if r.metrics_dataframe is not None else []
            history = [_reported(row) for row in rows]
            results.append(
                {
                    "config": r.config.get(_TRIAL, r.config),
                    "metrics": _reported(r.metrics or {}),
                    "history": history,
                    "error": _one_line(original_error(r.error)) if r.error else None,
                }
            )
        return results
