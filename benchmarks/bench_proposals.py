"""Selective search throughput: one worker vs every core, and seconds per image vs the paper.

Both arms run through the same Ray map (same overheads); the serial arm asks for every CPU per task
so that only one search runs at a time. Prints ratios; no pass/fail.

    python benchmarks/bench_proposals.py [--images 24] [--width 500 --height 375]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import ray

from cluster import runtime
from cluster.ray_executor import RayExecutor
from cluster.resources import Resources
from data.synthetic_voc import generate_voc
from data.voc import load_image


def search(path: str) -> int:
    from stages.detection.proposals import selective_search_isolated

    return len(selective_search_isolated(load_image(path), mode="rcnn"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--width", type=int, default=500)  # a typical PASCAL image is 500x375
    ap.add_argument("--height", type=int, default=375)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as d:
        generate_voc(d, num_train=args.images, num_test=1, image_size=(args.width, args.height))
        paths = sorted(str(p) for p in Path(d, "JPEGImages").glob("*.jpg"))[: args.images]
        runtime.connect(num_cpus=cores, include_dashboard=False, temp_dir="/tmp/pl-bench")
        ex = RayExecutor(progress=False)
        ex.map(search, paths[:cores], resources=Resources(cpus=1))  # warm workers and helpers
        t0 = time.perf_counter()
        counts = ex.map(search, paths, resources=Resources(cpus=cores))
        serial = time.perf_counter() - t0
        t0 = time.perf_counter()
        ex.map(search, paths, resources=Resources(cpus=1))
        parallel = time.perf_counter() - t0
        ray.shutdown()
    n = len(paths)
    speedup = serial / parallel
    print(f"images: {n} at {args.width}x{args.height}, proposals/image: {sum(counts) / n:.0f}")
    print(f"1 worker:      {n / serial:.2f} images/s  ({serial / n:.2f} s/image; paper ≈2 s/image)")
    print(f"{cores} workers:     {n / parallel:.2f} images/s")
    print(
        f"speed-up: {speedup:.2f}x on {cores} cores = {speedup / cores:.2f} of linear "
        f"(goal >= 0.85)"
    )


if __name__ == "__main__":
    main()
