"""Steps, content-addressed keys, and the scheduler that runs a pipeline's steps on an executor.

A **step** names a stage adaptor ``fn(ctx, **params)``, the artifacts it reads (names of earlier
steps), the config values it uses (``params``) and its kind:

- ``task``: the whole step runs as one unit of work (a Ray task on the Ray executor, where it may land
  on a GPU node); it writes into ``ctx.out_dir``.
- ``map`` / ``infer`` / ``train`` / ``sweep``: the step's glue runs on the driver and fans its heavy
  work out through ``ctx.map`` / ``ctx.infer`` / ``ctx.train`` / ``ctx.sweep``.

Its output artifact's key is ``hash(step name, version, params, input keys)``: a completed key is
never recomputed, and changing one config value recomputes exactly the steps whose params (or
inputs, transitively) change. Independent steps run concurrently when the executor allows it.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import hashlib
import json
import shutil
import socket
import time
import traceback
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.progress import DISPLAY, progress_bar
from cluster.resources import Resources
from data.store import Artifact, ArtifactStore, OutputRef, join_uri
from pipelines.config import ConfigError
from pipelines.fingerprint import code_fingerprint

KINDS = ("task", "map", "infer", "train", "sweep")


def print_line(line: str) -> None:
    """``print`` for the step lines of concurrent steps: through the one progress display
    (``cluster.progress``), text and newline in one write, never inside a bar's line."""
    DISPLAY.print_line(line)


@dataclass(frozen=True)
class Step:
    name: str
    fn: Callable[..., Any]  # fn(ctx: StepContext, **params)
    kind: str = "task"
    # artifacts read: "step" or "alias=step" (the adaptor sees it as ctx.inputs[alias])
    inputs: tuple[str, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    version: str = "1"  # bump when the stage's output changes for the same params
    resources: Resources = Resources()
    publish: tuple[str, ...] = ()  # files of the artifact copied into the run directory
    description: str = ""
    # what is computed, for keys and store paths (default: the name). Variants of one stage in a
    # study ("svm-fc6-ft") share artifacts with the plain run when their params and inputs match.
    stage: str = ""
    # trials a sweep step runs (for `paperline plan`; not in the key: the params decide them)
    trials: int | None = None

    @property
    def identity(self) -> str:
        return self.stage or self.name

    @property
    def sources(self) -> tuple[str, ...]:
        """Names of the steps this one reads."""
        return tuple(i.partition("=")[2] or i for i in self.inputs)

    def input_pairs(self) -> list[tuple[str, str]]:
        """(alias, source step) for each input."""
        return [(i.partition("=")[0], i.partition("=")[2] or i) for i in self.inputs]

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"step {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")


def step_key(step: Step, input_keys: Mapping[str, str]) -> str:
    """hash(what is computed, the code that computes it, the config values it uses, its inputs'
    keys, its torch threads): the same key means the same bytes on a CPU (README "How it works").

    Threads are in the key because float reductions split across threads round differently (R-CNN
    pretraining on 1 vs 2 threads: accuracy 0.726 vs 0.830, issue 22); every executor pins each
    unit of work to ``resources.threads()``, whatever CPUs it was granted. The CPU request itself,
    the executor and the placement are scheduling and stay out."""
    blob = json.dumps(
        {
            "step": step.identity,
            "version": step.version,
            "code": code_fingerprint(step.fn),
            "params": dict(step.params),
            "inputs": dict(input_keys),
            "threads": step.resources.threads(),
        },
        sort_keys=True,
        default=repr,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class StepContext:
    """What a step adaptor sees: its inputs, a private output directory, and the executor."""

    pipeline: str
    step: str
    key: str
    inputs: dict[str, Artifact]
    out_dir: Path
    resources: Resources
    work_uri: str  # scratch space on the store for Train/Tune storage (resume after a crash)
    executor: Any = None  # None inside a `task` step (it already runs as one unit of work)
    out_ref: OutputRef | None = None  # set with out_dir: where remote work writes its files
    remote_files: dict = field(default_factory=dict)  # what it wrote: name -> marker entry

    def output(self, name: str) -> OutputRef:
        """A reference remote work writes ``name`` of this step's artifact through, from its own
        node (`OutputRef.write`); hand what it returns to `add_files`."""
        return self.out_ref / name

    def add_files(self, files: Mapping[str, dict]) -> None:
        """Record files remote work wrote through `output` (name -> the entry its `write`
        returned): they join the artifact's marker without being read again."""
        self.remote_files.update(files)

    def input_dir(self, name: str) -> Path:
        """A local path of input ``name``: for the step's own process. Remote work gets
        ``input_file`` references instead (a driver path does not exist on another node)."""
        return self.inputs[name].local_dir()

    def input_file(self, name: str, file: str = ""):
        """A reference to one file of input ``name`` that remote work resolves on its own node
        (``os.fspath`` / ``str`` / ``Path`` of it): ``data.store.ArtifactFile``."""
        return self.inputs[name].file(file)

    def write_json(self, name: str, obj: Any) -> Path:
        path = self.out_dir / name
        path.write_text(json.dumps(obj, indent=1, sort_keys=True, default=_json_default))
        return path

    def resources_with(self, memory_mb: int) -> Resources:
        """The step's resources with the memory request raised to ``memory_mb`` (a unit's own
        estimate), never lowered: scheduling only, not in the key."""
        if memory_mb > self.resources.memory_mb:
            return dataclasses.replace(self.resources, memory_mb=int(memory_mb))
        return self.resources

    def map(self, fn: Callable, items: Sequence, desc: str | None = None) -> list:
        return self.executor.map(fn, items, resources=self.resources, desc=desc or self.step)

    def infer(
        self,
        source,
        predictor: type,
        predictor_kwargs: dict,
        *,
        batch_size: int,
        num_actors: int = 1,
        memory_mb: int = 0,
    ):
        """The predictor's output rows (``pa.Table``): see ``cluster.executor.Executor.infer``.
        ``memory_mb``: each actor's memory request, from the step's own estimate."""
        resources = self.resources_with(memory_mb)
        return self.executor.infer(
            source,
            predictor,
            predictor_kwargs,
            batch_size=batch_size,
            resources=resources,
            num_actors=num_actors,
            desc=self.step,
        )

    def actors(self, factory: type, kwargs: Sequence[dict], *, memory_mb: int = 0):
        """Long-lived units with state, one ``factory(**kw)`` per entry of ``kwargs``
        (``cluster.executor.Executor.actors``), used as a context manager; ``memory_mb``: each
        one's memory request, from the step's own estimate."""
        return self.executor.actors(factory, kwargs, resources=self.resources_with(memory_mb))

    def train(
        self,
        train_fn: Callable,
        config: dict,
        *,
        num_workers: int = 1,
        max_failures: int = 0,
        part: str = "",
        memory_mb: int = 0,
    ):
        """One Train run of this step, named after its key (and ``part``, for a step that runs
        several: each resumes from its own checkpoints). ``memory_mb``: each worker's memory
        request, from the step's own estimate (the step's resources ask at least that)."""
        resources = self.resources_with(memory_mb)
        return self.executor.train(
            train_fn,
            config,
            num_workers=num_workers,
            resources_per_worker=resources,
            storage_path=self.work_uri,
            name=f"{self.step}-{self.key}" + (f"-{part}" if part else ""),
            max_failures=max_failures,
        )

    def train_capacity(self, num_workers: int = 1, memory_mb: int = 0) -> int:
        """Train runs of ``num_workers`` workers with this step's resources (and each worker's
        ``memory_mb`` request, as `train` takes it) that fit at once."""
        resources = self.resources_with(memory_mb)
        return self.executor.train_capacity(num_workers, resources)

    def sweep(
        self,
        trainable: Callable,
        space: dict,
        *,
        metric: str,
        mode: str,
        memory_mb: int = 0,
        **kwargs,
    ):
        """A Tune experiment under ``_work/`` named after the step's key: a step rerun after a
        crash restores it and runs only the trials that had not finished (or had failed);
        ``--force`` deletes it first (``run_steps``). ``memory_mb``: each trial's memory
        request, from the step's own estimate (the step's resources ask at least that)."""
        kwargs.setdefault("resume", True)
        resources = self.resources_with(memory_mb)
        return self.executor.sweep(
            trainable,
            space,
            metric=metric,
            mode=mode,
            resources_per_trial=resources,
            storage_path=self.work_uri,
            name=f"{self.step}-{self.key}",
            **kwargs,
        )


def _copy(src, dst) -> None:
    """``shutil.copy2`` unless ``dst`` already is that copy (same size and mtime: copy2 keeps the
    mtime), so a cached rerun does not read the published files again."""
    try:
        a, b = Path(src).stat(), Path(dst).stat()
        if (a.st_size, a.st_mtime_ns) == (b.st_size, b.st_mtime_ns):
            return
    except FileNotFoundError:
        pass
    shutil.copy2(src, dst)


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def _execute_in_writer(
    store_uri: str,
    artifact: Artifact,
    ctx: StepContext,
    fn: Callable,
    params: Mapping[str, Any],
    info: dict,
) -> dict:
    """Run one step into a staging directory and publish it; runs wherever the step runs."""
    store = ArtifactStore(store_uri)
    started = time.time()
    with store.writer(artifact, info, remote=ctx.remote_files) as out_dir:
        ctx.out_dir, ctx.out_ref = out_dir, store.output_ref(artifact, out_dir)
        fn(ctx, **params)
        # in the completion marker: a later run that finds the artifact cached reports how long
        # it took to compute and where (`paperline report`, issue 22)
        info.update(compute_s=time.time() - started, node=socket.gethostname())
    return {"node": socket.gethostname(), "start_unix_s": started, "end_unix_s": time.time()}


class StepFailed(RuntimeError):
    def __init__(self, step: str, error: BaseException):
        self.step = step
        self.error = error
        super().__init__(f"step {step!r} failed: {type(error).__name__}: {error}")

    def __reduce__(self):  # picklable and copyable (Ray and Tune copy exceptions across processes)
        return (StepFailed, (self.step, self.error))


def _computed_by(marker: dict | None) -> dict:
    """What a cached step's manifest entry says about the run that computed it (its marker)."""
    if not marker:
        return {}
    out = {"computed_unix_s": marker.get("created_unix_s")}
    if marker.get("compute_s") is not None:
        out["computed_s"] = marker["compute_s"]
    if marker.get("run_dir"):
        out["computed_by"] = marker["run_dir"]
    return out


HISTORY = "history.jsonl"


def append_history(run_dir: Path, entries: list[dict], started: float, *, executor: str) -> None:
    """One line per invocation in ``<run_dir>/history.jsonl`` (issue 22: a cached rerun used to
    leave only its own "cached 0.0" rows). Appended with ``O_APPEND``: concurrent invocations
    of one config (sweep trials, two shells) each add a whole line."""
    line = json.dumps(
        {
            "started_unix_s": started,
            "wall_s": time.time() - started,
            "host": socket.gethostname(),
            "executor": executor,
            "status": "failed" if any(e["status"] == "failed" for e in entries) else "ok",
            "steps": [
                {k: e[k] for k in ("step", "status", "wall_s", "key") if k in e}
                | ({"error": e["error"]} if e.get("error") else {})
                for e in entries
            ],
        }
    )
    with open(run_dir / HISTORY, "a") as f:
        f.write(line + "\n")


def read_history(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / HISTORY
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut by a crash
            out.append(json.loads(line))
    return out


def topo_sort(steps: Sequence[Step]) -> list[Step]:
    by_name = {s.name: s for s in steps}
    if len(by_name) != len(steps):
        raise ValueError("duplicate step names")
    for s in steps:
        for i in s.sources:
            if i not in by_name:
                raise ValueError(f"step {s.name!r} reads {i!r}, which no step produces")
    order: list[Step] = []
    seen: set[str] = set()

    def visit(s: Step, stack: tuple[str, ...]):
        if s.name in stack:
            raise ValueError(f"cycle through {' -> '.join(stack + (s.name,))}")
        if s.name in seen:
            return
        for i in s.sources:
            visit(by_name[i], stack + (s.name,))
        seen.add(s.name)
        order.append(s)

    for s in steps:
        visit(s, ())
    return order


def ancestors(steps: Sequence[Step], target: str) -> set[str]:
    """``target`` and every step it (transitively) reads."""
    by_name = {s.name: s for s in steps}
    out, todo = set(), [target]
    while todo:
        name = todo.pop()
        if name not in out:
            out.add(name)
            todo += list(by_name[name].sources)
    return out


def select_steps(
    steps: Sequence[Step], *, until: str | None = None, force: str | None = None
) -> list[Step]:
    """The steps needed to produce ``until`` (all steps when None), in their original order.

    The one check of ``--until`` and ``--force`` (the CLI, ``runner.run`` and ``run_steps`` all come
    here): an unknown name is a ``ConfigError`` listing the steps in pipeline order; ``force`` must
    be among the selected steps."""
    names = [s.name for s in steps]
    if until is not None and until not in names:
        raise ConfigError(f"--until: unknown step {until!r}; steps: {', '.join(names)}")
    if until is not None:
        keep = ancestors(steps, until)
        steps = [s for s in steps if s.name in keep]
        names = [s.name for s in steps]
    if force is not None and force not in names:
        raise ConfigError(f"--force: unknown step {force!r}; steps: {', '.join(names)}")
    return list(steps)


def descendants(steps: Sequence[Step], root: str) -> set[str]:
    out = {root}
    changed = True
    while changed:
        changed = False
        for s in steps:
            if s.name not in out and any(i in out for i in s.sources):
                out.add(s.name)
                changed = True
    return out


@dataclass
class RunResult:
    pipeline: str
    run_dir: Path | None
    manifest: list[dict]
    metrics: dict
    artifacts: dict[str, Artifact]

    def computed(self) -> list[str]:
        return [m["step"] for m in self.manifest if m["status"] == "computed"]

    def cached(self) -> list[str]:
        return [m["step"] for m in self.manifest if m["status"] == "cached"]


def _keys_and_artifacts(
    pipeline: str, order: Sequence[Step], store: ArtifactStore
) -> tuple[dict[str, str], dict[str, Artifact]]:
    keys: dict[str, str] = {}
    artifacts: dict[str, Artifact] = {}
    for s in order:  # topological: every input's key is known before its consumer's
        keys[s.name] = step_key(s, {a: keys[i] for a, i in s.input_pairs()})
        artifacts[s.name] = store.artifact(pipeline, s.identity, keys[s.name])
    return keys, artifacts


def pending_steps(
    pipeline: str, steps: Sequence[Step], *, store: ArtifactStore, force: str | None = None
) -> list[str]:
    """The steps ``run_steps`` would compute now (forced or not complete in ``store``), in order."""
    order = topo_sort(steps)
    forced = descendants(order, force) if force else set()
    _, artifacts = _keys_and_artifacts(pipeline, order, store)
    return [s.name for s in order if s.name in forced or not store.is_complete(artifacts[s.name])]


def run_steps(
    pipeline: str,
    steps: Sequence[Step],
    *,
    store: ArtifactStore,
    executor,
    force: str | None = None,
    run_dir: Path | None = None,
    log: Callable[[str], None] = print_line,
) -> RunResult:
    """Run ``steps`` (skipping completed keys) and return their manifest and merged metrics."""
    select_steps(steps, force=force)
    order = topo_sort(steps)
    forced = descendants(order, force) if force else set()
    keys, artifacts = _keys_and_artifacts(pipeline, order, store)
    # once, here, as the keys were: the manifest records the code the keys hash even if a file
    # changes mid-run, and no step thread parses source (a step failed with CPython 3.11.7's
    # "SystemError: AST constructor recursion depth mismatch" when files edited mid-run were
    # parsed again in step threads while others ran)
    codes = {s.name: code_fingerprint(s.fn) for s in order}

    manifest: dict[str, dict] = {}
    run_started = time.time()
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)

    def record(entry: dict) -> None:
        manifest[entry["step"]] = entry
        if run_dir is not None:
            rows = [manifest[s.name] for s in order if s.name in manifest]
            # one temporary name per writer: sweep trials with equal configs share a run directory
            tmp = run_dir / f"manifest.json.{uuid.uuid4().hex[:8]}.tmp"
            tmp.write_text(json.dumps(rows, indent=1))
            tmp.replace(run_dir / "manifest.json")

    def execute(s: Step) -> dict:
        log(f"[{pipeline}] {s.name}: running ({s.kind})")  # when it starts, not when queued
        ctx = StepContext(
            pipeline=pipeline,
            step=s.name,
            key=keys[s.name],
            inputs={a: artifacts[i] for a, i in s.input_pairs()},
            out_dir=Path(),
            resources=s.resources,
            work_uri=join_uri(store.uri, "_work", pipeline),
            executor=None if s.kind == "task" else executor,
        )
        info = {
            "step": s.name,
            "kind": s.kind,
            "key": keys[s.name],
            "version": s.version,
            "code": codes[s.name],
            "params": dict(s.params),
            "inputs": {a: keys[i] for a, i in s.input_pairs()},
            "run_dir": str(run_dir) if run_dir is not None else "",
        }
        # Concurrent runs sharing the store (sweep trials) compute an artifact once: the first
        # takes its lock, the others wait for it and then find it complete.
        with store.lock(artifacts[s.name]) as waited_s:
            if s.name not in forced and store.is_complete(artifacts[s.name]):
                log(f"[{pipeline}] {s.name}: computed by another run ({waited_s:.1f} s wait)")
                return {
                    "status": "cached",
                    "waited_s": waited_s,
                    **_computed_by(store.marker(artifacts[s.name])),
                }
            if s.name in forced:  # --force means from scratch: a finished Train run or Tune
                # experiment under the same key would otherwise be resumed, i.e. not rerun
                store.clear_work(pipeline, f"{s.name}-{keys[s.name]}")
            if s.kind == "task":
                # a single call has no count to show: its bar says it is running, and for how
                # long (the step line says when it ends)
                with progress_bar(
                    None, s.name, "", enabled=getattr(executor, "progress", True), final=False
                ):
                    out = executor.run_task(
                        _execute_in_writer,
                        store.uri,
                        artifacts[s.name],
                        ctx,
                        s.fn,
                        dict(s.params),
                        info,
                        resources=s.resources,
                    )
            else:
                out = _execute_in_writer(
                    store.uri, artifacts[s.name], ctx, s.fn, dict(s.params), info
                )
        return {**out, "status": "computed", "waited_s": waited_s}

    done: set[str] = set()

    def mark_cached(s: Step, marker: dict | None = None) -> None:
        done.add(s.name)
        record(
            {
                "step": s.name,
                "kind": s.kind,
                "key": keys[s.name],
                "artifact": artifacts[s.name].relpath,
                "code": codes[s.name],
                "status": "cached",
                "wall_s": 0.0,
                "resources": s.resources.to_dict(),
                **_computed_by(marker),
            }
        )
        log(f"[{pipeline}] {s.name}: cached ({keys[s.name]})")

    markers = {s.name: None if s.name in forced else store.marker(artifacts[s.name]) for s in order}
    for s in order:
        if markers[s.name] is not None:
            mark_cached(s, markers[s.name])

    failure: StepFailed | None = None
    running: dict[cf.Future, Step] = {}
    with cf.ThreadPoolExecutor(max_workers=max(1, executor.max_parallel_steps)) as pool:
        while True:
            if failure is None:
                for s in order:
                    started = {r.name for r in running.values()}
                    if s.name in done or s.name in started or not all(i in done for i in s.sources):
                        continue
                    same = {o for o in done | started if artifacts[o] == artifacts[s.name]}
                    if same & started:
                        continue  # the same artifact is being computed under another name
                    if same:  # computed under another name in this run
                        mark_cached(s, store.marker(artifacts[s.name]))
                        continue
                    fut = pool.submit(execute, s)
                    fut.t0 = time.time()  # type: ignore[attr-defined]
                    running[fut] = s
            if not running:
                break
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                s = running.pop(fut)
                wall = time.time() - fut.t0  # type: ignore[attr-defined]
                entry = {
                    "step": s.name,
                    "kind": s.kind,
                    "key": keys[s.name],
                    "artifact": artifacts[s.name].relpath,
                    "code": codes[s.name],
                    "wall_s": wall,
                    "resources": s.resources.to_dict(),
                }
                try:
                    entry.update(fut.result())
                    done.add(s.name)
                    if entry["status"] == "computed":
                        log(f"[{pipeline}] {s.name}: computed in {wall:.1f} s")
                except BaseException as e:  # noqa: BLE001 - reported, then re-raised below
                    entry.update(
                        status="failed",
                        error=f"{type(e).__name__}: {e}",
                        # a remote error's own traceback (cluster.ray_executor.original_error)
                        traceback=getattr(e, "remote_traceback", "") or traceback.format_exc(),
                    )
                    if failure is None:
                        failure = StepFailed(s.name, e)
                record(entry)
    if run_dir is not None:
        append_history(run_dir, [manifest[s.name] for s in order if s.name in manifest],
                       run_started, executor=getattr(executor, "name", "?"))  # fmt: skip
    if failure is not None:
        raise failure

    # only metrics.json and the published files are read: on a remote store, a cached rerun
    # must not download whole artifacts (feature caches) to the driver
    metrics: dict = {}
    for s in order:
        art = artifacts[s.name]
        text = art.read_bytes("metrics.json")
        if text is not None:
            metrics.update(json.loads(text))
        if run_dir is not None:
            for name in s.publish:
                if store.is_local:
                    src = art.local_dir() / name
                    if src.is_dir():
                        shutil.copytree(
                            src, run_dir / name, dirs_exist_ok=True, copy_function=_copy
                        )
                    elif src.exists():
                        _copy(src, run_dir / name)
                else:
                    art.copy_out(name, run_dir / name)
    if run_dir is not None:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    return RunResult(pipeline, run_dir, [manifest[s.name] for s in order], metrics, artifacts)
