"""`paperline sweep` against running each trial's pipeline from scratch, side by side in one run.

Arm A sweeps R-CNN's SVM negative threshold on a fresh store: proposals, training and features are
computed once and shared; only svm -> detect -> evaluate -> report run per trial. Arm B runs the
same trials as independent pipeline runs, each on its own empty store (no sharing). On Ray, arm C
then sweeps four values of `svm.C` on copies of the now warm store (each trial computes only
svm -> detect -> evaluate -> report): once untimed to warm Ray's task workers, once one trial at a
time, whose trial times are each trial's own work, and once with the default concurrency; it prints
the concurrent sweep's wall time against the sum of the one-at-a-time trial times divided by the
CPUs (issue 9's "trials really run in parallel", goal <= 1.25).

Arm D (`--tune-steps N`) is Tune as the pipelines' own sweep steps use it: one-CPU trials that each
train a small net (the BN pipeline's MNIST trainable), one at a time vs concurrently.

python benchmarks/bench_sweep.py [--preset ci] [--values 0.1,0.3,0.5] [--executor local|ray]
                                 [--warm-store STORE  (arm C alone, on copies of STORE)]
                                 [--tune-steps N  (arm D alone)]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

from pipelines import runner, sweep


def _connect() -> float:
    """Start Ray before timing (every arm pays the same connect); the CPUs it has."""
    from cluster import runtime

    return runtime.connect(include_dashboard=False, temp_dir="/tmp/pl-bench")["cpus"]


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
    ap.add_argument(
        "--tune-steps",
        type=int,
        default=0,
        help="run only arm D: a Tune sweep of 1-CPU trials (the BN MNIST trainable, this many SGD "
        "steps each), one at a time vs concurrently",
    )
    args = ap.parse_args()
    if args.tune_steps:
        cpus = _connect()
        with tempfile.TemporaryDirectory() as d:
            one_cpu_trials(args.tune_steps, d, cpus)
        return
    if args.warm_store:
        cpus = _connect()
        with tempfile.TemporaryDirectory() as d:
            parallel_ratio(args.preset, args.warm_store, d, cpus, args.c_values)
        return
    values = sweep.split_values(args.values)
    cpus = 1.0
    if args.executor == "ray":
        cpus = _connect()
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
    """Arm C on copies of ``store`` (a store that already holds every upstream step).

    An untimed warm-up sweep of the same trials on a third copy runs first: the trials' steps are
    Ray tasks, and the first task in a new worker process imports torch and the pipeline (≈ 6 s on
    2 cores, measured). Without it the one-at-a-time arm's first trial paid that and inflated the
    trial times the concurrent sweep is compared with, flattering the ratio (earlier readings of
    1.23-1.49; 0.84-0.97 once trial actors stopped importing torch)."""
    plan = sweep.make_plan("rcnn", preset, {}, [f"svm.C={c_values}"], [])
    n = len(sweep.split_values(c_values))
    for copy in ("warmup", "alone", "together"):
        shutil.copytree(store, f"{runs}/store-{copy}", ignore=shutil.ignore_patterns("_work"))
    quiet = dict(executor="ray", log=lambda _: None)
    sweep.run_sweep(plan, store=f"{runs}/store-warmup", runs=f"{runs}/warmup", **quiet)
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
    conc_sum = sum(r["trial_wall_s"] for r in together.rows)
    print(
        f"rcnn/{preset}, {n} trials of svm.C on a warm store (svm -> report per trial, "
        f"{trial_sum / n:.1f} s each one at a time): concurrent sweep wall {wall:.1f} s vs sum of "
        f"one-at-a-time trial times / CPUs = {trial_sum:.1f} / {cpus:.0f} = {trial_sum / cpus:.1f} s: "
        f"ratio {wall / (trial_sum / cpus):.2f} (goal <= 1.25); the difference, "
        f"{wall - trial_sum / cpus:.1f} s, is the sweep's fixed cost (Tune's start, one trial actor "
        f"per CPU) plus any imbalance; side by side the trials took {conc_sum:.1f} s in all "
        f"({conc_sum / trial_sum:.2f}x); one-at-a-time sweep wall {t_alone:.1f} s = "
        f"{t_alone / wall:.2f}x the concurrent one"
    )


def _timed_mnist_trial(config: dict, report) -> None:
    """The BN pipeline's MNIST trainable, reporting only its last record and its own wall time."""
    from stages.training.bn_experiments import mnist_trial

    t0 = time.time()
    last: dict = {}
    mnist_trial(config, last.update)
    report({"test_acc": float(last["test_acc"]), "trial_wall_s": time.time() - t0})


def one_cpu_trials(steps: int, d: str, cpus: float) -> None:
    """Arm D: Tune as the pipelines' sweep steps use it (BN, MobileNetV2, generalization): each
    trial trains one small net on one CPU and one thread. Two trials per CPU, after an untimed
    warm-up sweep; one at a time vs the default concurrency (one trial per CPU)."""
    import numpy as np

    from cluster.ray_executor import RayExecutor
    from cluster.resources import Resources
    from cluster.space import Grid
    from data.digits import load_digits
    from pipelines import registry

    x, y = load_digits(28)
    perm = np.random.default_rng(0).permutation(len(y))
    te, tr = perm[:500], perm[500:]
    data = f"{d}/mnist.npz"
    np.savez(data, x_train=x[tr], y_train=y[tr], x_test=x[te], y_test=y[te])
    n = 2 * int(cpus)
    # the trial config the BN pipeline's `mnist` sweep step passes (ci preset), with N steps
    spec = registry.get("batchnorm")
    step = next(s for s in spec.steps(spec.build_config("ci")) if s.name == "mnist")
    space = {**step.params, "steps": steps, "eval_every": steps, "data_path": data, "bn": True}
    del space["seeds"]
    space["seed"] = Grid(tuple(range(n)))
    ex = RayExecutor(progress=False)

    def run(name: str, max_concurrent: int | None) -> tuple[float, list[dict]]:
        t0 = time.perf_counter()
        out = ex.sweep(
            _timed_mnist_trial,
            space,
            metric="test_acc",
            mode="max",
            max_concurrent=max_concurrent,
            resources_per_trial=Resources(cpus=1),
            storage_path=d,
            name=name,
        )
        assert not any(t["error"] for t in out), [t["error"] for t in out]
        return time.perf_counter() - t0, out

    run("warmup", None)
    t_alone, alone = run("alone", 1)
    wall, together = run("together", None)
    trial_sum = sum(t["metrics"]["trial_wall_s"] for t in alone)
    conc_sum = sum(t["metrics"]["trial_wall_s"] for t in together)
    print(
        f"Tune, {n} one-CPU trials (BN MNIST MLP, {steps} SGD steps, {trial_sum / n:.1f} s each one "
        f"at a time): concurrent sweep wall {wall:.1f} s vs sum of one-at-a-time trial times / "
        f"CPUs = {trial_sum:.1f} / {cpus:.0f} = {trial_sum / cpus:.1f} s: ratio "
        f"{wall / (trial_sum / cpus):.2f} (goal <= 1.25); trials ran {conc_sum / trial_sum:.2f}x "
        f"as long side by side, so the sweep's fixed cost (Tune's start, one actor per CPU "
        f"importing torch) was {wall - conc_sum / cpus:.1f} s; one-at-a-time sweep wall "
        f"{t_alone:.1f} s = {t_alone / wall:.2f}x the concurrent one"
    )


if __name__ == "__main__":
    main()
