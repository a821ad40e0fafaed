"""Run a named pipeline end to end: config → run directory → executor → steps → summary."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from data.store import ArtifactStore
from pipelines import registry
from pipelines.config import config_hash, to_dict
from pipelines.engine import RunResult, pending_steps, print_line, run_steps, select_steps


def run_dir_for(runs_root: str | Path, pipeline: str, preset: str, cfg) -> Path:
    return Path(runs_root) / pipeline / f"{preset}-{config_hash(cfg)}"


def make_executor(
    kind: str,
    address: str | None = None,
    progress: bool = True,
    ray_init: Mapping[str, Any] | None = None,
):
    if kind == "local":
        from cluster.local import LocalExecutor

        return LocalExecutor(progress=progress), {"address": "in-process"}
    if kind == "ray":
        from cluster import runtime
        from cluster.ray_executor import RayExecutor

        info = runtime.connect(address, **(ray_init or {}))
        return RayExecutor(progress=progress), info
    raise ValueError(f"unknown executor {kind!r}; valid: ray, local")


def run(
    pipeline: str,
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    store: str = "store",
    runs: str | Path = "runs",
    executor: str = "ray",
    address: str | None = None,
    force: str | None = None,
    until: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print_line,
    ray_init: Mapping[str, Any] | None = None,
) -> RunResult:
    spec = registry.get(pipeline)
    pipeline = spec.name  # "module:ATTR" names resolve to the spec's own name
    preset = preset or spec.default_preset
    cfg = spec.build_config(preset, overrides)  # bad keys/values fail here, before Ray starts
    steps = select_steps(spec.steps(cfg), until=until, force=force)
    artifact_store = ArtifactStore(store)
    artifact_store.check_writable()
    run_dir = run_dir_for(runs, pipeline, preset, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(
        json.dumps(
            {
                "pipeline": pipeline,
                "preset": preset,
                "overrides": dict(overrides or {}),
                "store": artifact_store.uri,
                "config": to_dict(cfg),
            },
            indent=1,
            default=str,
        )
    )
    pending = pending_steps(pipeline, steps, store=artifact_store, force=force)
    if executor == "ray" and not pending:
        # every step is cached: reading the manifest needs no cluster, and starting an embedded
        # Ray costs ~10 s (benchmarks/bench_engine.py)
        ex, info = make_executor("local", progress=progress)
        info = {"address": "not started, every step is cached"}
    else:
        ex, info = make_executor(executor, address, progress, ray_init)
    log(f"[{pipeline}] preset={preset} executor={executor} cluster={info} run_dir={run_dir}")
    t0 = time.time()
    result = run_steps(
        pipeline, steps, store=artifact_store, executor=ex, force=force, run_dir=run_dir, log=log
    )
    log(summary_table(result.manifest, time.time() - t0))
    for key, value in result.metrics.items():
        if isinstance(value, int | float):
            log(f"{key}: {value:.4g}")
    if (run_dir / "report.md").exists():
        log(f"report: {run_dir / 'report.md'}")
    return result


def summary_table(manifest: list[dict], total_s: float | None = None) -> str:
    """One row per step; a cached step also says what computing it took, and when (from its
    artifact's marker), so a cached rerun's report keeps the computing run's timings."""
    lines = [f"{'step':<20} {'kind':<6} {'status':<9} {'wall_s':>8}  key"]
    for m in manifest:
        row = f"{m['step']:<20} {m['kind']:<6} {m['status']:<9} {m['wall_s']:>8.1f}  {m['key']}"
        if m["status"] == "cached" and m.get("computed_s") is not None:
            when = m.get("computed_unix_s")
            stamp = time.strftime(", %Y-%m-%d %H:%M", time.localtime(when)) if when else ""
            row += f"  (computed in {m['computed_s']:.1f} s{stamp})"
        elif m["status"] == "failed" and m.get("error"):
            row += f"  {m['error'].splitlines()[0][:100]}"
        lines.append(row)
    if total_s is not None:
        lines.append(f"total {total_s:.1f} s")
    return "\n".join(lines)
