"""``paperline`` (also ``python -m pipelines``): list, run, sweep, submit, jobs, report, claims.

Exit status: 0 success, 1 a step failed, 2 bad usage or configuration (reported before Ray starts).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from pipelines import registry
from pipelines.config import ConfigError, parse_set_args, remote_data_paths
from pipelines.engine import select_steps

REPO_ROOT = Path(__file__).resolve().parent.parent


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", help="pipeline name (see `paperline list`)")
    p.add_argument("--preset", help="named preset (default: the pipeline's small preset)")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set proposals.mode=quality (repeatable)",
    )
    p.add_argument(
        "--store",
        default=os.environ.get("PAPERLINE_STORE", "store"),
        help="artifact store: local path or pyarrow.fs URI (default ./store)",
    )
    p.add_argument("--out", default="runs", help="root of run directories (default ./runs)")
    p.add_argument(
        "--trust-store",
        action="store_true",
        help="resume Tune experiments found on an object store (unpickles their state)",
    )
    p.add_argument("--force", metavar="STEP", help="recompute STEP and every step after it")
    p.add_argument("--until", metavar="STEP", help="run only STEP and the steps it needs")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="Ray's own output too: worker logs, Ray Data progress bars and messages",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paperline", description=__doc__.splitlines()[0].replace("``", "")
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="pipelines and presets; with PIPELINE its steps and keys")
    p.add_argument("pipeline", nargs="?", help="show this pipeline's steps and config keys")
    p.add_argument("--preset", help="with PIPELINE: the values this preset sets (default: its own)")

    p = sub.add_parser(
        "plan", help="dry estimate per step: rows, bytes, memory, tasks, CPU hours (no Ray)"
    )
    p.add_argument("pipeline", help="pipeline name (see `paperline list`)")
    p.add_argument("--preset", help="named preset (default: the pipeline's small preset)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="a JSON list, one object per step")

    p = sub.add_parser("run", help="run a pipeline (embedded Ray unless --address)")
    _add_run_args(p)
    p.add_argument("--address", help="attach to a Ray cluster (ray://host:10001, auto, host:port)")
    p.add_argument(
        "--executor",
        choices=["ray", "local"],
        default="ray",
        help="local = in-process without Ray (debugging)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser(
        "sweep",
        help="Ray Tune over a pipeline's config: one trial per combination, shared cached steps",
    )
    _add_run_args(p)
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="sweep KEY over the listed values (repeatable: the cross product)",
    )
    p.add_argument(
        "--sample",
        action="append",
        default=[],
        metavar="KEY=DIST",
        help="sample KEY from uniform(lo,hi), loguniform(lo,hi) or choice(a,b,...)",
    )
    p.add_argument("--num-samples", type=int, default=1, help="repeat the grid / draw N samples")
    p.add_argument("--metric", help="objective: a key of the run's metrics (default: headline)")
    p.add_argument("--mode", choices=["max", "min"], help="default: the pipeline's")
    p.add_argument("--scheduler", choices=["asha"], help="early stopping (Tune's ASHA)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: cluster CPUs)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampled values")
    p.add_argument("--resume", action="store_true", help="finish an interrupted sweep")
    p.add_argument("--address", help="attach to a Ray cluster (ray://host:10001, auto, host:port)")
    p.add_argument(
        "--executor",
        choices=["ray", "local"],
        default="ray",
        help="ray = Tune trials on Ray (default); local = trials in turn in-process, no Ray",
    )

    p = sub.add_parser("submit", help="submit a pipeline run to a cluster via the Ray Jobs API")
    _add_run_args(p)
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS"),
        help="Jobs API address, e.g. http://head:8265",
    )
    p.add_argument("--wait", action="store_true", help="wait for the job and print its logs")

    p = sub.add_parser(
        "head", help="start or stop one Ray head on this machine (never every Ray, as `ray stop`)"
    )
    p.add_argument("action", choices=["start", "stop"], help="start it, or stop only it")
    p.add_argument("--num-cpus", type=int, help="CPUs the head offers (default: all)")
    p.add_argument("--port", type=int, default=6379, help="GCS port (default 6379)")
    p.add_argument("--dashboard-port", type=int, default=8265, help="Jobs API port (8265)")
    p.add_argument(
        "--temp-dir",
        default=os.environ.get("PAPERLINE_HEAD_DIR", "/tmp/paperline-head"),
        help="the head's own Ray temp dir, where stop finds it (or PAPERLINE_HEAD_DIR)",
    )

    p = sub.add_parser("jobs", help="status / logs / stop of a submitted job")
    p.add_argument("action", choices=["status", "logs", "stop"], help="what to do with the job")
    p.add_argument("job_id", help="the id `paperline submit` printed (raysubmit_...)")
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS"),
        help="Jobs API address, e.g. http://head:8265 (or RAY_API_SERVER_ADDRESS)",
    )

    p = sub.add_parser("report", help="summarise a run or sweep directory, with its history")
    p.add_argument("run_dir", help="a run directory (runs/<pipeline>/<preset>-<hash>) or a sweep's")

    p = sub.add_parser(
        "verify", help="hash every file of a store's (or a run's) artifacts against its marker"
    )
    p.add_argument("target", help="an artifact store (path or URI) or a run directory")

    p = sub.add_parser(
        "gc", help="remove stale staging dirs and locks, finished checkpoints, superseded copies"
    )
    p.add_argument(
        "--store", default=os.environ.get("PAPERLINE_STORE", "store"), help="the artifact store"
    )
    p.add_argument("--out", default="runs", help="root of run directories (for --keep-runs)")
    p.add_argument("--keep-runs", type=int, metavar="N", help="keep the N newest runs per pipeline")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed")

    p = sub.add_parser(
        "claims", help="the paper claims tested by runs, with intervals and verdicts"
    )
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR",
                   help="run directories (default: every run under --out with a claims.json)")  # fmt: skip
    p.add_argument("--out", default="runs", help="root of run directories (default ./runs)")
    p.add_argument("--json", action="store_true", help="a JSON list of claim rows")
    return parser


def _config_from_args(args):
    spec = registry.get(args.pipeline)
    overrides = parse_set_args(args.sets)
    cfg = spec.build_config(args.preset, overrides)
    select_steps(spec.steps(cfg), until=args.until, force=args.force)
    return spec, overrides, cfg


def cmd_list(pipeline: str | None = None, preset: str | None = None) -> int:
    """Without a pipeline: names, summaries and presets (no config is built, so no pipeline's
    checks or imports run: well under a second). With one: its presets and what they set, its
    steps in order, and every config key with its type and value."""
    if pipeline is None:
        for name in registry.names():
            spec = registry.get(name)
            presets = ", ".join(
                f"{p} (default)" if p == spec.default_preset else p for p in spec.presets
            )
            print(f"{name}: {spec.summary}\n  presets: {presets}")
        print("\n`paperline list PIPELINE` shows its steps and every config key (type, value)")
        return 0
    from pipelines.config import describe_keys

    spec = registry.get(pipeline)
    preset = preset or spec.default_preset
    with remote_data_paths():  # listing needs no dataset on this machine
        cfg = spec.build_config(preset)
        steps = spec.steps(cfg)
    print(f"{spec.name}: {spec.summary}")
    for name, values in spec.presets.items():
        mark = " (default)" if name == spec.default_preset else ""
        sets = ", ".join(f"{k}={v}" for k, v in values.items()) or "the paper's defaults"
        print(f"  preset {name}{mark}: {sets}")
    print("  steps: " + " -> ".join(f"{s.name}[{s.kind}]" for s in steps))
    width = max(len(s.name) for s in steps)
    for s in steps:
        print(f"    {s.name:<{width}}  {s.kind:<5}  {s.description}")
    print(f"  keys (values of preset {preset}; --set KEY=VALUE):")
    rows = describe_keys(cfg)
    width = max(len(k) for k, _, _ in rows)
    for key, kind, value in rows:
        print(f"    {key:<{width}}  {kind:<24}  {value}")
    return 0


def cmd_plan(args) -> int:
    from pipelines import plan

    rows = plan.plan(args.pipeline, args.preset, parse_set_args(args.sets))
    print(json.dumps(rows, indent=1) if args.json else plan.table(rows))
    return 0


def cmd_run(args) -> int:
    from pipelines import runner

    _, overrides, _ = _config_from_args(args)
    runner.run(
        args.pipeline,
        args.preset,
        overrides,
        store=args.store,
        runs=args.out,
        executor=args.executor,
        address=args.address,
        force=args.force,
        until=args.until,
        progress=not args.quiet,
    )
    return 0


def cmd_sweep(args) -> int:
    from pipelines import sweep

    if args.force or args.until:
        raise ConfigError("sweep runs whole pipelines: --force/--until are not supported")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    plan = sweep.make_plan(
        args.pipeline,
        args.preset,
        parse_set_args(args.sets),
        args.grid,
        args.sample,
        metric=args.metric,
        mode=args.mode,
        num_samples=args.num_samples,
        scheduler=args.scheduler,
        seed=args.seed,
    )
    result = sweep.run_sweep(
        plan,
        store=args.store,
        runs=args.out,
        executor=args.executor,
        address=args.address,
        resume=args.resume,
        max_concurrent=args.max_concurrent,
    )
    for row in result.failed:
        swept = ", ".join(f"{k}={row[k]}" for k in plan.space)
        print(f"paperline: trial {swept} failed: {row['error']}", file=sys.stderr)
    return 1 if result.failed else 0


def cmd_submit(args) -> int:
    from cluster import jobs

    # validate here, not after a round trip to the cluster; its nodes, not this one, hold the data
    with remote_data_paths():
        spec, _, _ = _config_from_args(args)
    if not args.address:
        raise ConfigError("submit needs --address http://HOST:8265 (or RAY_API_SERVER_ADDRESS)")
    # --store and --out name places on the cluster, passed as given: resolving them here made
    # the job write to this client's paths (issue 18). A relative store would land in the job's
    # temporary working directory, so it is refused; a relative --out is the job's own folder.
    store, out = args.store, args.out
    if "://" not in store and not Path(store).is_absolute():
        raise ConfigError(
            f"submit: --store {store!r} is relative; give the cluster's path (an absolute path "
            "on a filesystem every node mounts) or an object-store URI such as s3://bucket/prefix"
        )
    argv = [
        "python",
        "-m",
        "pipelines",
        "run",
        args.pipeline,
        "--store",
        store,
        "--out",
        out,
        "--quiet",
    ]
    if args.preset:
        argv += ["--preset", args.preset]
    for s in args.sets:
        argv += ["--set", s]
    if args.force:
        argv += ["--force", args.force]
    if args.until:
        argv += ["--until", args.until]
    if args.verbose:
        argv += ["--verbose"]
    entrypoint = shlex.join(argv)
    try:
        job_id = jobs.submit(
            args.address,
            entrypoint,
            REPO_ROOT,
            metadata={"pipeline": spec.name, "preset": args.preset or ""},
        )
    except (RuntimeError, ConnectionError) as e:  # unreachable or refusing head
        raise ConfigError(f"submit to {args.address}: {e}") from None
    print(f"submitted {job_id}: {entrypoint}")
    if not args.wait:
        print(f"follow it with: paperline jobs logs {job_id} --address {args.address}")
        return 0
    try:
        state = jobs.wait(args.address, job_id)
    except TimeoutError as e:
        print(f"paperline: {e}; it goes on: paperline jobs status {job_id} --address "
              f"{args.address}", file=sys.stderr)  # fmt: skip
        return 1
    print(jobs.logs(args.address, job_id))
    print(f"job {job_id}: {state}")
    return 0 if state == "SUCCEEDED" else 1


def cmd_head(args) -> int:
    from cluster import head

    try:
        if args.action == "stop":
            print(
                "stopped" if head.stop(args.temp_dir) else f"no head started from {args.temp_dir}"
            )
            return 0
        info = head.start(
            num_cpus=args.num_cpus,
            port=args.port,
            dashboard_port=args.dashboard_port,
            temp_dir=args.temp_dir,
        )
    except head.HeadError as e:
        raise ConfigError(str(e)) from None
    print(f"Ray head up: submit to --address {info['address']}; attach with --address "
          f"{info['gcs']}; stop it with: paperline head stop")  # fmt: skip
    return 0


def cmd_jobs(args) -> int:
    from cluster import jobs

    if not args.address:
        raise ConfigError("jobs needs --address http://HOST:8265 (or RAY_API_SERVER_ADDRESS)")
    try:
        if args.action == "status":
            print(jobs.status(args.address, args.job_id))
        elif args.action == "logs":
            print(jobs.logs(args.address, args.job_id))
        else:
            print("stopped" if jobs.stop(args.address, args.job_id) else "not running")
    except (RuntimeError, ConnectionError) as e:  # unknown job id, unreachable or refusing head
        raise ConfigError(f"jobs {args.action} {args.job_id} at {args.address}: {e}") from None
    return 0


def cmd_report(args) -> int:
    from pipelines.runner import summary_table

    run_dir = Path(args.run_dir)
    if (run_dir / "sweep.json").is_file():
        return _report_sweep(run_dir)
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.exists():
        raise ConfigError(
            f"{run_dir}: not a run directory (no manifest.json) nor a sweep directory (no "
            "sweep.json); run directories are runs/<pipeline>/<preset>-<hash>/"
        )
    manifest = json.loads(manifest_path.read_text())
    print(summary_table(manifest))
    _print_history(run_dir)
    metrics_path = run_dir / "metrics.json"
    if metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        for key, value in metrics.items():
            if isinstance(value, int | float | str):
                print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    report = run_dir / "report.md"
    print(f"report: {report}" if report.exists() else "no report.md in this run")
    return 0


def _print_history(run_dir: Path, last: int = 5) -> None:
    """The invocations of this run directory (``history.jsonl``), newest last."""
    import time

    from pipelines.engine import read_history

    history = read_history(run_dir)
    if not history:
        return
    print(
        f"history: {len(history)} invocation(s)"
        + (f", the last {last}:" if len(history) > last else ":")
    )
    for h in history[-last:]:
        computed = [s["step"] for s in h["steps"] if s["status"] == "computed"]
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["started_unix_s"]))
        print(
            f"  {when}  {h['executor']:<5} {h['status']:<6} {h['wall_s']:>7.1f} s  computed "
            f"{len(computed)}/{len(h['steps'])}: {', '.join(computed) or '-'}"
        )


def _report_sweep(directory: Path) -> int:
    import pyarrow.parquet as pq

    sweep = json.loads((directory / "sweep.json").read_text())
    trials = directory / "trials.parquet"
    if not trials.exists():
        raise ConfigError(f"{directory}: a sweep that has not finished (no trials.parquet)")
    rows = pq.read_table(trials).to_pylist()
    keys = [k for k in rows[0] if k not in _SWEEP_COLUMNS] if rows else []
    metric = sweep.get("metric", "metric")
    print(f"sweep of {sweep['pipeline']} (preset {sweep['preset']}): {len(rows)} trials, "
          f"objective {metric} ({sweep.get('mode', 'max')})")  # fmt: skip
    print("  ".join(f"{k:>12}" for k in [*keys, metric, "wall_s"]) + "  computed steps / error")
    for r in rows:
        cells = [str(r[k]) for k in keys]
        cells.append("-" if r["metric"] is None else f"{r['metric']:.4g}")
        cells.append("-" if r["trial_wall_s"] is None else f"{r['trial_wall_s']:.1f}")
        tail = r["error"].splitlines()[0][:100] if r["error"] else ", ".join(r["computed_steps"])
        print("  ".join(f"{c:>12}" for c in cells) + f"  {tail or '(all cached)'}")
    best = directory / "best.json"
    if best.exists() and (b := json.loads(best.read_text()).get("best")):
        print(f"best {metric} = {b['value']:.4g} at {b['config']}")
    report = directory / "report.md"
    print(f"report: {report}" if report.exists() else "no report.md in this sweep")
    return 0


_SWEEP_COLUMNS = {
    "metric", "trial_wall_s", "computed_steps", "cached_steps", "run_dir", "error", "metrics"
}  # fmt: skip


def cmd_gc(args) -> int:
    import shutil

    from data.store import ArtifactStore

    removed = ArtifactStore(args.store).gc(dry_run=args.dry_run)
    if args.keep_runs is not None:
        if args.keep_runs < 0:
            raise ConfigError(f"--keep-runs must be >= 0, got {args.keep_runs}")
        removed["runs"] = []
        for pipeline_dir in sorted(p for p in Path(args.out).glob("*") if p.is_dir()):
            runs = sorted(
                (d for d in pipeline_dir.iterdir() if (d / "manifest.json").is_file()),
                key=lambda d: (d / "manifest.json").stat().st_mtime,
                reverse=True,
            )
            for d in runs[args.keep_runs :]:
                removed["runs"].append(str(d))
                if not args.dry_run:
                    shutil.rmtree(d, ignore_errors=True)
    verb = "would remove" if args.dry_run else "removed"
    for kind, items in removed.items():
        for item in items:
            print(f"{verb} {kind}: {item}")
    print(f"gc {args.store}: {verb} {sum(map(len, removed.values()))} entries")
    return 0


def cmd_verify(args) -> int:
    """Full SHA-256 check on demand (runs themselves check sizes and mtimes only)."""
    from data.store import Artifact, ArtifactStore

    target = Path(args.target)
    if (target / "manifest.json").is_file() and (target / "config.json").is_file():
        config = json.loads((target / "config.json").read_text())
        store = ArtifactStore(config["store"])
        arts = [
            Artifact(store.uri, m.get("artifact") or f"{config['pipeline']}/{m['step']}/{m['key']}")
            for m in json.loads((target / "manifest.json").read_text())
            if m.get("status") != "failed"
        ]
        arts = list(dict.fromkeys(arts))
    else:
        store = ArtifactStore(args.target)
        arts = store.artifacts()
        if not arts:
            raise ConfigError(f"{args.target}: no run directory and no artifacts in it as a store")
    problems = [p for a in arts for p in store.verify(a)]
    for p in problems:
        print(f"BAD {p}")
    print(
        f"verified {len(arts)} artifacts in {store.uri}: "
        + (f"{len(problems)} problems" if problems else "every file matches its marker")
    )
    return 1 if problems else 0


def cmd_claims(args) -> int:
    from pipelines import claims

    dirs = [Path(d) for d in args.run_dirs] or sorted(
        p.parent for p in Path(args.out).glob("*/*/claims.json")
    )
    if not dirs:
        raise ConfigError(f"no run directory with a claims.json under {args.out}/")
    rows = []
    for d in dirs:
        try:
            rows += claims.load_run(d)
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
    if args.json:
        print(json.dumps(rows, indent=1, ensure_ascii=False))
    else:
        print(claims.table(rows, with_run=True, with_pipeline=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "trust_store", False):  # read where sweeps resume (cluster.ray_executor)
        os.environ["PAPERLINE_TRUST_STORE"] = "1"
    if getattr(args, "verbose", False):  # read where Ray starts (cluster.runtime.connect)
        os.environ["PAPERLINE_VERBOSE"] = "1"
    elif argv is None and args.command in ("run", "sweep"):
        # the command line's own process (not main() called in-process, as tests do): drop
        # Ray's known-harmless lines from its stdout/stderr (issue 22)
        from cluster import runtime

        runtime.FILTER_RAY_NOISE = True
    try:
        if args.command == "list":
            return cmd_list(args.pipeline, args.preset)
        if args.command == "plan":
            return cmd_plan(args)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "sweep":
            return cmd_sweep(args)
        if args.command == "submit":
            return cmd_submit(args)
        if args.command == "jobs":
            return cmd_jobs(args)
        if args.command == "head":
            return cmd_head(args)
        if args.command == "claims":
            return cmd_claims(args)
        if args.command == "verify":
            return cmd_verify(args)
        if args.command == "gc":
            return cmd_gc(args)
        return cmd_report(args)
    except ConfigError as e:
        print(f"paperline: error: {e}", file=sys.stderr)
        return 2
    except PermissionError as e:
        print(f"paperline: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from data.errors import DatasetError
        from data.store import StoreError
        from pipelines.engine import StepFailed

        if isinstance(e, StoreError):  # a bad --store: exit 2 like any bad argument
            print(f"paperline: error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, StepFailed | DatasetError):
            print(f"paperline: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
