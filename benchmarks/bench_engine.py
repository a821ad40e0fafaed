"""Engine overhead: a fully cached re-run against the first run of the same pipeline.

python benchmarks/bench_engine.py [--executor local|ray] [--preset ci]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from pipelines import runner


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--executor", default="local", choices=["local", "ray"])
    ap.add_argument("--preset", default="ci")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        kw = dict(
            store=f"{d}/store",
            runs=f"{d}/runs",
            executor=args.executor,
            progress=False,
            log=lambda _: None,
        )
        if args.executor == "ray":  # start Ray before timing: both arms pay the same connect
            from cluster import runtime

            runtime.connect(include_dashboard=False, temp_dir="/tmp/pl-bench")
        t0 = time.perf_counter()
        first = runner.run("rcnn", args.preset, **kw)
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = runner.run("rcnn", args.preset, **kw)
        t_again = time.perf_counter() - t0
    assert again.cached() == [m["step"] for m in first.manifest]
    print(
        f"rcnn/{args.preset} on {args.executor}: first run {t_first:.2f} s, cached re-run "
        f"{t_again:.3f} s = {t_again / t_first:.3f} of the first (goal <= 0.05)"
    )


if __name__ == "__main__":
    main()
