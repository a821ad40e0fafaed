"""``paperline`` (also ``python -m pipelines``): list, run, sweep, submit, jobs, report.

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
from pipelines.config import ConfigError, parse_set_args, valid_keys
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
    p.add_argument("--force", metavar="STEP", help="recompute STEP and every step after it")
    p.add_argument("--until", metavar="STEP", help="run only STEP and the steps it needs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paperline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("list", help="pipelines, presets and steps")

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
    p.add_argument("--executor", choices=["ray", "local"], default="ray")

    p = sub.add_parser("submit", help="submit a pipeline run to a cluster via the Ray Jobs API")
    _add_run_args(p)
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS"),
        help="Jobs API address, e.g. http://head:8265",
    )
    p.add_argument("--wait", action="store_true", help="wait for the job and print its logs")

    p = sub.add_parser("jobs", help="status / logs / stop of a submitted job")
    p.add_argument("action", choices=["status", "logs", "stop"])
    p.add_argument("job_id")
    p.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS"))

    p = sub.add_parser("report", help="summarise a run directory")
    p.add_argument("run_dir")

    p = sub.add_parser(
        "verify", help="hash every file of a store's (or a run's) artifacts against its marker"
    )
    p.add_argument("target", help="an artifact store (path or URI) or a run directory")

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


def cmd_list() -> int:
    for name in registry.names():
        spec = registry.get(name)
        cfg = spec.build_config()
        print(f"{name}: {spec.summary}")
        for preset in spec.presets:
            mark = " (default)" if preset == spec.default_preset else ""
            print(f"  preset {preset}{mark}")
        steps = spec.steps(cfg)
        print("  steps: " + " -> ".join(f"{s.name}[{s.kind}]" for s in steps))
        print("  keys: " + ", ".join(valid_keys(cfg)))
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

    spec, _, _ = _config_from_args(args)  # validate here, not after a round trip to the cluster
    if not args.address:
        raise ConfigError("submit needs --address http://HOST:8265 (or RAY_API_SERVER_ADDRESS)")
    store = args.store if "://" in args.store else str(Path(args.store).resolve())
    out = str(Path(args.out).resolve())
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
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.exists():
        raise ConfigError(f"{manifest_path}: not a run directory (no manifest.json)")
    manifest = json.loads(manifest_path.read_text())
    print(summary_table(manifest))
    metrics_path = run_dir / "metrics.json"
    if metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        for key, value in metrics.items():
            if isinstance(value, int | float | str):
                print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    report = run_dir / "report.md"
    print(f"report: {report}" if report.exists() else "no report.md in this run")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "list":
            return cmd_list()
        if args.command == "run":
            return cmd_run(args)
        if args.command == "sweep":
            return cmd_sweep(args)
        if args.command == "submit":
            return cmd_submit(args)
        if args.command == "jobs":
            return cmd_jobs(args)
        if args.command == "verify":
            return cmd_verify(args)
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
