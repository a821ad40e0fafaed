"""``paperline sweep``: Ray Tune over any pipeline's config, sharing cached upstream steps.

Every grid combination (or sample) is one Tune trial that runs the whole pipeline with those values
as ``--set`` overrides, against the same content-addressed store. Steps whose params and inputs are
equal across trials have equal keys, so they are computed once: the first trial that needs one
takes the artifact's lock (``ArtifactStore.lock``) and computes it, the others wait and reuse it.
Sweeping R-CNN's SVM threshold therefore recomputes only ``svm``, ``detect`` and what follows.

The sweep directory ``runs/<pipeline>/sweep-<preset>-<hash>/`` (the hash covers the space, the
fixed overrides and the objective, so ``--resume`` finds it again) holds ``trials.parquet`` (one row
per trial: swept values, scalar metrics, wall time, computed and cached steps, error),
``best.json``, ``report.md`` with a table and one plot per swept key, the Tune experiment
(``tune/``) and each trial's run directory (``trials/``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cluster.resources import Resources
from cluster.space import Choice, Grid, Uniform, expand
from pipelines import registry
from pipelines.config import ConfigError
from pipelines.engine import print_line

_SAMPLE = re.compile(r"^\s*(uniform|loguniform|choice)\((.*)\)\s*$")


def split_values(text: str) -> list[str]:
    """``"0,0.1,(16,32)"`` -> ``["0", "0.1", "(16,32)"]``: commas inside brackets stay."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    if any(v == "" for v in out):
        raise ConfigError(f"empty value in {text!r}")
    return out


def _typed(spec: registry.PipelineSpec, preset: str, base: Mapping[str, Any], key: str, value):
    """``value`` parsed and range-checked exactly as ``--set key=value`` would be."""
    cfg = spec.build_config(preset, {**base, key: value})
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def parse_space(
    spec: registry.PipelineSpec,
    preset: str,
    base: Mapping[str, Any],
    grids: list[str],
    samples: list[str],
) -> dict[str, Grid | Uniform | Choice]:
    """``--grid k=v1,v2`` / ``--sample k=uniform(lo,hi)|loguniform(lo,hi)|choice(a,b)`` -> a space
    of typed values. Every value is type- and range-checked before anything runs."""
    space: dict[str, Grid | Uniform | Choice] = {}
    for arg, is_grid in [(g, True) for g in grids] + [(s, False) for s in samples]:
        flag = "--grid" if is_grid else "--sample"
        key, sep, text = arg.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{flag} expects KEY=VALUES, got {arg!r}")
        if key in space:
            raise ConfigError(f"{flag}: {key!r} is swept twice")
        if key in base:
            raise ConfigError(f"{key!r} is both swept and fixed with --set")
        if is_grid:
            values = [_typed(spec, preset, base, key, v) for v in split_values(text)]
            if len(set(map(repr, values))) != len(values):
                raise ConfigError(f"--grid {key}: repeated values {values}")
            space[key] = Grid(tuple(values))
            continue
        m = _SAMPLE.match(text)
        if not m:
            raise ConfigError(
                f"--sample {key}: expected uniform(lo,hi), loguniform(lo,hi) or choice(a,b,...), "
                f"got {text!r}"
            )
        kind, args = m.group(1), split_values(m.group(2))
        values = [_typed(spec, preset, base, key, v) for v in args]
        if kind == "choice":
            space[key] = Choice(tuple(values))
            continue
        if len(values) != 2 or not all(isinstance(v, float) for v in values):
            raise ConfigError(
                f"--sample {key}: {kind} needs two bounds of a float field, got {args} "
                f"({', '.join(type(v).__name__ for v in values)}); use choice() or --grid for "
                "other types"
            )
        lo, hi = values
        if not lo < hi or (kind == "loguniform" and lo <= 0):
            raise ConfigError(f"--sample {key}: need 0 < lo < hi for loguniform, lo < hi else")
        space[key] = Uniform(lo, hi, log=kind == "loguniform")
    if not space:
        raise ConfigError("nothing to sweep: give at least one --grid or --sample")
    return space


@dataclass(frozen=True)
class SweepPlan:
    pipeline: str  # what registry.get takes (a name or "module:ATTR")
    preset: str
    space: dict[str, Grid | Uniform | Choice]
    overrides: dict[str, Any] = field(default_factory=dict)  # fixed --set values
    metric: str = ""
    mode: str = "max"
    num_samples: int = 1
    scheduler: str | None = None
    seed: int = 0

    def digest(self) -> str:
        blob = json.dumps(
            {
                "pipeline": self.pipeline,
                "preset": self.preset,
                "space": {k: repr(v) for k, v in self.space.items()},
                "overrides": {k: str(v) for k, v in self.overrides.items()},
                "objective": [self.metric, self.mode, self.num_samples, self.scheduler, self.seed],
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    def directory(self, runs_root: str | Path, pipeline_name: str) -> Path:
        return Path(runs_root).resolve() / pipeline_name / f"sweep-{self.preset}-{self.digest()}"


def make_plan(
    pipeline: str,
    preset: str | None,
    overrides: Mapping[str, Any],
    grids: list[str],
    samples: list[str],
    *,
    metric: str | None = None,
    mode: str | None = None,
    num_samples: int = 1,
    scheduler: str | None = None,
    seed: int = 0,
) -> SweepPlan:
    spec = registry.get(pipeline)
    preset = preset or spec.default_preset
    spec.build_config(preset, overrides)  # the fixed overrides alone must be valid
    space = parse_space(spec, preset, overrides, grids, samples)
    for trial in expand(space, 1, seed):  # and every combination (cross-field checks)
        spec.build_config(preset, {**overrides, **trial})
    metric = metric or spec.metric
    if not metric:
        raise ConfigError(f"{spec.name} names no headline metric: pass --metric")
    mode = mode or spec.mode
    if mode not in ("max", "min"):
        raise ConfigError(f"--mode must be max or min, got {mode!r}")
    if num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {num_samples}")
    if scheduler not in (None, "asha"):
        raise ConfigError(f"--scheduler: unknown {scheduler!r}; valid: asha")
    return SweepPlan(
        pipeline, preset, space, dict(overrides), metric, mode, num_samples, scheduler, seed
    )


def run_trial(
    config: dict,
    report: Callable[[dict], None],
    *,
    pipeline: str,
    preset: str,
    overrides: dict,
    store: str,
    trials_dir: str,
    executor: str,
    metric: str,
) -> None:
    """One trial: the whole pipeline with the trial's values, reporting its scalar metrics."""
    from pipelines import runner

    lines: list[str] = []
    t0 = time.time()
    try:
        result = runner.run(
            pipeline,
            preset,
            {**overrides, **config},
            store=store,
            runs=trials_dir,
            executor=executor,
            progress=False,
            log=lines.append,
        )
    finally:
        log_dir = Path(trials_dir) / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(repr(sorted(config.items())).encode()).hexdigest()[:10]
        with open(log_dir / f"{name}.log", "a") as f:  # one section per attempt of the trial
            f.write(f"== trial start {time.ctime(t0)} {config}\n" + "\n".join(lines) + "\n")
    metrics = {
        k: float(v)
        for k, v in result.metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    if metric not in metrics:
        raise ValueError(
            f"the run reported no scalar metric {metric!r}; metrics: {', '.join(sorted(metrics))}"
        )
    report(
        {
            **metrics,
            "trial_wall_s": time.time() - t0,
            "computed_steps": ",".join(result.computed()),
            "cached_steps": ",".join(result.cached()),
            "run_dir": str(result.run_dir),
        }
    )


@dataclass
class SweepResult:
    directory: Path
    rows: list[dict]
    best: dict | None
    wall_s: float

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["error"]]


def run_sweep(
    plan: SweepPlan,
    *,
    store: str = "store",
    runs: str | Path = "runs",
    executor: str = "ray",
    address: str | None = None,
    resume: bool = False,
    max_concurrent: int | None = None,
    trial_resources: Resources | None = None,
    log: Callable[[str], None] = print_line,
    ray_init: Mapping[str, Any] | None = None,
) -> SweepResult:
    """Run every trial of ``plan`` as a Tune trial (``executor="ray"``) or in turn in-process."""
    from data.store import ArtifactStore
    from pipelines import runner

    spec = registry.get(plan.pipeline)
    artifact_store = ArtifactStore(store)  # absolute: Tune trials may run in another directory
    artifact_store.check_writable()
    directory = plan.directory(runs, spec.name)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sweep.json").write_text(
        json.dumps(
            {
                "pipeline": spec.name,
                "preset": plan.preset,
                "space": {k: repr(v) for k, v in plan.space.items()},
                "overrides": plan.overrides,
                "metric": plan.metric,
                "mode": plan.mode,
                "num_samples": plan.num_samples,
                "store": artifact_store.uri,
            },
            indent=1,
            default=str,
        )
    )
    # progress on: one bar of finished trials (each trial's own run draws none, `run_trial`)
    ex, info = runner.make_executor(executor, address, progress=True, ray_init=ray_init)
    if trial_resources is None:
        # On Ray a trial is a small driver: its steps are Ray tasks with their own CPU requests,
        # so the trial itself holds almost nothing (a trial holding a whole CPU would starve its
        # own steps on a small machine; DESIGN "Tune trials that take every CPU").
        # It runs on the driver's node: its run directory goes under this sweep's --out, which
        # on a cluster without a shared filesystem is a folder of this machine only (issue 18).
        trial_resources = Resources(cpus=0.05, gpus=0, driver_node=True)
    if max_concurrent is None and executor == "ray":
        max_concurrent = max(1, int(info.get("cpus", 1)))  # else Tune starts every trial at once
    n_trials = len(expand(plan.space, plan.num_samples, plan.seed))
    log(
        f"[sweep {spec.name}] {n_trials} trials over {', '.join(plan.space)}; "
        f"metric={plan.metric} ({plan.mode}); dir={directory}"
    )
    t0 = time.time()
    results = ex.sweep(
        functools.partial(
            run_trial,
            pipeline=plan.pipeline,
            preset=plan.preset,
            overrides=plan.overrides,
            store=artifact_store.uri,
            trials_dir=str(directory / "trials"),
            executor=executor,
            metric=plan.metric,
        ),
        dict(plan.space),
        metric=plan.metric,
        mode=plan.mode,
        num_samples=plan.num_samples,
        max_concurrent=max_concurrent,
        resources_per_trial=trial_resources,
        storage_path=str(directory),
        name="tune",
        resume=resume,
        scheduler=plan.scheduler,
        seed=plan.seed,
    )
    wall = time.time() - t0
    rows = _rows(plan, results)
    best = _best(plan, rows)
    _write_outputs(plan, directory, rows, best, wall, spec.name)
    log(
        f"[sweep {spec.name}] {len(rows)} trials in {wall:.1f} s; report: {directory / 'report.md'}"
    )
    if best is not None:
        log(f"best {plan.metric}={best['value']:.4g} at {best['config']}")
    return SweepResult(directory, rows, best, wall)


def _rows(plan: SweepPlan, results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        m = dict(r.get("metrics") or {})
        row = {k: r["config"].get(k) for k in plan.space}
        row.update(
            {
                "metric": _float(m.get(plan.metric)),
                "trial_wall_s": _float(m.get("trial_wall_s")),
                "computed_steps": _split(m.get("computed_steps")),
                "cached_steps": _split(m.get("cached_steps")),
                "run_dir": m.get("run_dir") or "",
                "error": r.get("error") or "",
                "metrics": json.dumps(
                    {k: v for k, v in m.items() if isinstance(v, int | float)}, sort_keys=True
                ),
            }
        )
        rows.append(row)
    return sorted(rows, key=lambda row: [repr(row[k]) for k in plan.space])


def _float(v) -> float | None:
    return float(v) if isinstance(v, int | float) and v == v else None


def _split(v) -> list[str]:
    return [s for s in str(v).split(",") if s] if isinstance(v, str) else []


def _best(plan: SweepPlan, rows: list[dict]) -> dict | None:
    ok = [r for r in rows if r["metric"] is not None and not r["error"]]
    if not ok:
        return None
    pick = max if plan.mode == "max" else min
    b = pick(ok, key=lambda r: r["metric"])
    return {
        "metric": plan.metric,
        "mode": plan.mode,
        "value": b["metric"],
        "config": {k: b[k] for k in plan.space},
        "run_dir": b["run_dir"],
    }


def _write_outputs(plan, directory: Path, rows, best, wall_s: float, name: str) -> None:
    table = pa.Table.from_pylist(
        [
            {
                **{
                    k: (json.dumps(r[k]) if isinstance(r[k], tuple | list) else r[k])
                    for k in plan.space
                },
                **{k: r[k] for k in r if k not in plan.space},
            }
            for r in rows
        ]
    )
    pq.write_table(table, directory / "trials.parquet")
    summary = {
        "best": best,
        "trials": len(rows),
        "failed": sum(1 for r in rows if r["error"]),
        "wall_s": wall_s,
        "trial_wall_s_sum": sum(r["trial_wall_s"] or 0.0 for r in rows),
    }
    (directory / "best.json").write_text(json.dumps(summary, indent=1, default=str))
    from pipelines.sweep_report import write_report

    write_report(directory, name, plan, rows, summary)
