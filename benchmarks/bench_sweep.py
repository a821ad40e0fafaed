"""`paperline sweep` against running each trial's pipeline from scratch, side by side in one run.

Arm A sweeps R-CNN's SVM negative threshold on a fresh store: proposals, training and features are
computed once and shared; only svm -> detect -> evaluate -> report run per trial. Arm B runs the
same trials as independent pipeline runs, each on its own empty store (no sharing). On Ray, arm C
then sweeps four values of `svm.C` on two copies of the now warm store (each trial computes only
svm -> detect -> evaluate -> report): once one trial at a time, whose trial times are each trial's
own work, and once with the default concurrency; it prints the concurrent sweep's wall time against
the sum of the one-at-a-time trial times divided by the CPUs (issue 9's "trials really run in
parallel", goal <= 1.25).

python benchmarks/bench_sweep.py [--preset ci] [--values 0.1,0.3,0.5] [--executor local|ray]
                                 [--warm-store STORE  (arm C alone, on copies of STORE)]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

from pipelines import runner, sweep


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="ci")
    ap.add_argument("--values", default="0.1,0.3,0.5")
    ap.add_argument("--executor", default="local", choices=["local", "ray"])
    ap.add_argument("--warm-store", help="run only arm C (on Ray) on copies of this store")
    ap.add_argument(
        "--c-values",
        default="0.0001,0.0003,0.003,0.01",
        help="arm C's svm.C grid (pick values the warm store has not computed)",
    )
    args = ap.parse_args()
    if args.warm_store:
        from cluster import runtime

        cpus = runtime.connect(include_dashboard=False, temp_dir="/tmp/pl-bench")["cpus"]
        with tempfile.TemporaryDirectory() as d:
            parallel_ratio(args.preset, args.warm_store, d, cpus, args.c_values)
        return
    values = sweep.split_values(args.values)
    cpus = 1.0
    if args.executor == "ray":  # start Ray before timing: both arms pay the same connect
        from cluster import runtime

        cpus = runtime.connect(include_dashboard=False, temp_dir="/tmp/pl-bench")["cpus"]
    quiet = dict(progress=False, log=lambda _: None)
    with tempfile.TemporaryDirectory() as d:
        plan = sweep.make_plan("rcnn", args.preset, {}, [f"svm.neg_iou={args.values}"], [])
        t0 = time.perf_counter()
        result = sweep.run_sweep(
            plan,
            store=f"{d}/sweep-store",
            runs=f"{d}/runs",
            executor=args.executor,
            log=lambda _: None,
        )
        t_sweep = time.perf_counter() - t0
        assert not result.failed, result.failed
        trial_sum = sum(r["trial_wall_s"] for r in result.rows)
        t0 = time.perf_counter()
        for k, v in enumerate(values):
            runner.run(
                "rcnn",
                args.preset,
                {"svm.neg_iou": v},
                store=f"{d}/scratch-{k}",
                runs=f"{d}/runs-scratch",
                executor=args.executor,
                **quiet,
            )
        t_scratch = time.perf_counter() - t0
        if args.executor == "ray":
            parallel_ratio(args.preset, f"{d}/sweep-store", f"{d}/runs-c", cpus, args.c_values)
    print(
        f"rcnn/{args.preset}, {len(values)} trials of svm.neg_iou on {args.executor}: sweep "
        f"{t_sweep:.1f} s vs every trial from scratch {t_scratch:.1f} s = "
        f"{t_sweep / t_scratch:.2f} of it ({t_scratch / t_sweep:.1f}x faster)"
    )
    if args.executor == "ray":
        print(
            f"(arm A's trials: wall {t_sweep:.1f} s vs sum of trial times / CPUs "
            f"{trial_sum / cpus:.1f} s; they include the waits for the shared steps)"
        )


def parallel_ratio(preset: str, store: str, runs: str, cpus: float, c_values: str) -> None:
    """Arm C on copies of ``store`` (a store that already holds every upstream step)."""
    plan = sweep.make_plan("rcnn", preset, {}, [f"svm.C={c_values}"], [])
    n = len(sweep.split_values(c_values))
    for copy in ("alone", "together"):
        shutil.copytree(store, f"{runs}/store-{copy}", ignore=shutil.ignore_patterns("_work"))
    quiet = dict(executor="ray", log=lambda _: None)
    t0 = time.perf_counter()
    alone = sweep.run_sweep(
        plan, store=f"{runs}/store-alone", runs=f"{runs}/alone", max_concurrent=1, **quiet
    )
    t_alone = time.perf_counter() - t0
    trial_sum = sum(r["trial_wall_s"] for r in alone.rows)
    t0 = time.perf_counter()
    together = sweep.run_sweep(
        plan, store=f"{runs}/store-together", runs=f"{runs}/together", **quiet
    )
    wall = time.perf_counter() - t0
    assert not alone.failed and not together.failed, (alone.failed, together.failed)
    print(
        f"rcnn/{preset}, {n} trials of svm.C on a warm store (svm -> report per trial): concurrent "
        f"sweep wall {wall:.1f} s vs sum of one-at-a-time trial times / CPUs = {trial_sum:.1f} / "
        f"{cpus:.0f} = {trial_sum / cpus:.1f} s: ratio {wall / (trial_sum / cpus):.2f} "
        f"(goal <= 1.25); one-at-a-time sweep wall {t_alone:.1f} s = {t_alone / wall:.2f}x the "
        "concurrent one (the difference is what running trials in parallel saves; the rest is "
        "Tune's fixed cost per sweep)"
    )


if __name__ == "__main__":
    main()
