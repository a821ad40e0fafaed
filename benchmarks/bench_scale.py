"""Does R-CNN's cost grow with the work and no faster? (issue 19, DESIGN "Performance contract")

`rcnn` with the `ci` settings (small CNN at 64 px, 150 proposals per image; 5 pretraining epochs
and 50 fine-tuning iterations instead of 20 and 150) on generated VOC sets
of N = 24, 48, 96, 192 images (2/3 trainval, 1/3 test), with 4 classes and with 20, each run in a
fresh process (its own embedded Ray, its own peak RSS). Recorded per step: wall time, the
driver's peak RSS and the object store's peak bytes while the step ran (sampled every 0.2 s),
and bytes read from the feature cache. Printed:

- the fitted growth exponent of the run's time vs N (goal <= 1.1), and of each step's;
- driver peak RSS, largest N / smallest N (goal <= 1.2);
- object-store peak, largest / smallest (goal <= 1.5);
- bytes read by svm + bbox_regression / the cache's size (goal <= 3), and per layer how many
  passes over the training shards that is.

Cache reads are counted where they happen: ``stages.detection.features`` appends one line per
shard read (path, Arrow bytes of the columns read) to the file ``PAPERLINE_FEATURE_READ_LOG``
names, from the driver and from every Ray worker (they inherit the variable). svm and
bbox_regression read training shards, detection test shards; svm reads the SVM layer (fc7) and
box regression pool5, so (layer, split) of the path says which step read it, even when the
steps run concurrently on Ray.

The 20-class sets are the 4-class generator's images with each object's class name suffixed by
one of 5 tags in turn (circle-0 ... star-4): as many objects, 5x the classes; only the cost
matters here, not what the classes mean.

python benchmarks/bench_scale.py [--quick] [--sizes 24,48,96,192] [--classes 4,20]
                                 [--executor ray|local]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TAGS = 5  # 4 shapes x 5 tags = 20 classes
SAMPLE_S = 0.2
SHORT_TRAINING = {"pretrain.epochs": "5", "finetune.iterations": "50"}


def make_set(root: Path, images: int, classes: int) -> None:
    """A generated VOC set of ``images`` (2/3 trainval) with 4 or 20 classes."""
    from data.synthetic_voc import generate_voc
    from data.voc import read_annotation, write_annotation

    train = round(images * 2 / 3)
    generate_voc(root, num_train=train, num_test=images - train, seed=0, image_size=(240, 180))
    if classes == 4:
        return
    if classes != 4 * TAGS:
        raise SystemExit(f"--classes: 4 or {4 * TAGS}, got {classes}")
    k = 0
    for xml in sorted((root / "Annotations").glob("*.xml")):
        im = read_annotation(xml)
        objects = []
        for o in im.objects:
            objects.append(dataclasses.replace(o, name=f"{o.name}-{k % TAGS}"))
            k += 1
        write_annotation(xml, im.image_id, im.width, im.height, objects, segmented=True)


def _object_store_bytes() -> int:
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    state = get_state_from_address(ray.get_runtime_context().gcs_address)
    return int(get_memory_info_reply(state).store_stats.object_store_bytes_used)


class Sampler(threading.Thread):
    """Driver RSS and object-store bytes every ``SAMPLE_S``, peaks kept per running step."""

    def __init__(self, ray: bool):
        import psutil

        super().__init__(daemon=True)
        self.proc, self.ray = psutil.Process(), ray
        self.running: set[str] = set()
        self.rss: dict[str, int] = {"run": 0}
        self.store: dict[str, int] = {"run": 0}
        self.stop = threading.Event()

    def log(self, line: str) -> None:
        """The engine's step lines say when a step starts and ends."""
        if "] " not in line or ": " not in line:
            return
        step, _, what = line.split("] ", 1)[1].partition(": ")
        if what.startswith("running"):
            self.running.add(step)
        elif what.startswith(("computed", "cached")):
            self.sample()
            self.running.discard(step)

    def sample(self) -> None:
        rss = self.proc.memory_info().rss
        store = _object_store_bytes() if self.ray else 0
        for step in [*self.running, "run"]:
            self.rss[step] = max(self.rss.get(step, 0), rss)
            self.store[step] = max(self.store.get(step, 0), store)

    def run(self) -> None:
        while not self.stop.wait(SAMPLE_S):
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - Ray shutting down under us: keep what we have
                pass


def child(images: int, classes: int, executor: str, work: Path) -> dict:
    """One run in this (fresh) process; returns its measurements."""
    reads = work / "reads.log"
    os.environ["PAPERLINE_FEATURE_READ_LOG"] = str(reads)  # before Ray starts its workers
    make_set(work / "voc", images, classes)
    from pipelines import runner

    ray_dir = f"/tmp/pl-scale-{os.getpid()}"  # short: Ray's socket paths (DESIGN)
    if executor == "ray":
        from cluster import runtime

        # with its dashboard: Ray Train's placement-group cleaner asks a dashboard whether our
        # run is alive, and without our own it may find another cluster's (cluster/runtime.py)
        runtime.connect(temp_dir=ray_dir)
    sampler = Sampler(executor == "ray")
    sampler.start()
    # the ci preset with shorter training: its cost is fixed (fine-tuning) or already linear in N
    # (pretraining epochs), and on 2 cores it would take most of the time
    overrides = {"data.source": "voc", "data.root": str(work / "voc"), **SHORT_TRAINING}
    t0 = time.perf_counter()
    result = runner.run(
        "rcnn", "ci", overrides, store=str(work / "store"), runs=work / "runs",
        executor=executor, progress=False, log=sampler.log,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    if executor == "ray":
        runtime.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)  # session logs: hundreds of MB
    feats = result.artifacts["features"].local_dir()
    import pyarrow.parquet as pq

    split_of = {m["shard"]: m["split"] for m in pq.read_table(feats / "shards.parquet").to_pylist()}
    cache: dict[str, int] = {}  # "layer/split" -> bytes on disk
    for f in feats.glob("*/*.parquet"):
        key = f"{f.parent.name}/{split_of[f.name]}"
        cache[key] = cache.get(key, 0) + f.stat().st_size
    read: dict[str, int] = {}
    for line in reads.read_text().splitlines() if reads.exists() else []:
        path, nbytes = line.rsplit("\t", 1)
        p = Path(path)
        key = f"{p.parent.name}/{split_of[p.name]}"
        read[key] = read.get(key, 0) + int(nbytes)
    return {
        "images": images,
        "classes": classes,
        "wall_s": wall,
        "steps": {m["step"]: m["wall_s"] for m in result.manifest},
        "rss": sampler.rss,
        "store": sampler.store,
        "cache": cache,
        "read": read,
        "train_split": json.loads(
            (result.artifacts["dataset"].local_dir() / "splits.json").read_text()
        )["train"],
    }


def _fit_exponent(ns: list[int], ts: list[float]) -> float:
    """Slope of log t vs log N (least squares): 1 = linear."""
    return float(np.polyfit(np.log(ns), np.log(np.maximum(ts, 1e-3)), 1)[0])


def report(runs: list[dict]) -> None:
    mb = 1 / 2**20
    for classes in sorted({r["classes"] for r in runs}):
        rs = sorted((r for r in runs if r["classes"] == classes), key=lambda r: r["images"])
        ns = [r["images"] for r in rs]
        print(f"\n== {classes} classes, N = {', '.join(map(str, ns))} images")
        steps = list(rs[0]["steps"])
        print(f"{'step':<18}" + "".join(f"{f'N={n} s':>10}" for n in ns) + f"{'exponent':>10}")
        for s in steps:
            ts = [r["steps"].get(s, 0.0) for r in rs]
            exp = f"{_fit_exponent(ns, ts):>10.2f}" if len(ns) > 1 and min(ts) > 0.05 else " " * 10
            print(f"{s:<18}" + "".join(f"{t:>10.1f}" for t in ts) + exp)
        walls = [r["wall_s"] for r in rs]
        print(f"{'run':<18}" + "".join(f"{t:>10.1f}" for t in walls))
        rss = [r["rss"]["run"] for r in rs]
        store = [r["store"]["run"] for r in rs]
        print(f"driver peak RSS MiB: {', '.join(f'{x * mb:.0f}' for x in rss)}")
        print(f"object-store peak KiB: {', '.join(f'{x / 1024:.1f}' for x in store)}")
        top = max(rs[-1]["store"].items(), key=lambda kv: kv[1] if kv[0] != "run" else 0)
        print(f"  at N={ns[-1]} the object store peaked during {top[0]}")
        top = max(rs[-1]["rss"].items(), key=lambda kv: kv[1] if kv[0] != "run" else 0)
        print(f"  at N={ns[-1]} the driver peaked during {top[0]} ({top[1] * mb:.0f} MiB)")
        if len(ns) > 1:
            print(
                f"time growth exponent vs N: {_fit_exponent(ns, walls):.2f} (goal <= 1.1); "
                f"between the two largest N: {_fit_exponent(ns[-2:], walls[-2:]):.2f} (fixed "
                "costs weigh less there)"
            )
            print(f"driver RSS largest/smallest: {max(rss) / min(rss):.2f} (goal <= 1.2)")
            if min(store) > 0:
                print(f"object-store peak largest/smallest: {max(store) / min(store):.2f} "
                      "(goal <= 1.5)")  # fmt: skip
        for r in rs:
            c, rd, train = r["cache"], r["read"], r["train_split"]
            total = sum(c.values())
            svm_bbox = sum(v for k, v in rd.items() if k.endswith("/" + train))
            passes = ", ".join(
                f"{k.split('/')[0]} {rd.get(k, 0) / v:.1f}"
                for k, v in sorted(c.items())
                if k.endswith("/" + train)
            )
            print(
                f"N={r['images']}: svm + bbox_regression read {svm_bbox * mb:.1f} MiB = "
                f"{svm_bbox / total:.2f} x the cache ({total * mb:.1f} MiB; goal <= 3); passes "
                f"over the training shards: {passes}"
            )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="N = 24, 48 only")
    ap.add_argument("--sizes", default="24,48,96,192")
    ap.add_argument("--classes", default="4,20")
    ap.add_argument("--executor", default="ray", choices=["ray", "local"])
    ap.add_argument("--json", help="also write every run's measurements here")
    ap.add_argument("--from-json", nargs="+", metavar="JSON", help="print saved runs' report")
    ap.add_argument("--child", nargs=3, metavar=("N", "CLASSES", "WORKDIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        n, c, work = args.child
        out = child(int(n), int(c), args.executor, Path(work))
        (Path(work) / "result.json").write_text(json.dumps(out))
        return
    if args.from_json:
        report([r for f in args.from_json for r in json.loads(Path(f).read_text())])
        return
    sizes = [24, 48] if args.quick else [int(x) for x in args.sizes.split(",")]
    runs = []
    # this checkout's code first, in the run and in Ray's workers (a copy of another commit
    # measures that commit)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("RAY_ADDRESS", None)
    with tempfile.TemporaryDirectory(prefix="pl-scale-") as tmp:
        for classes in (int(x) for x in args.classes.split(",")):
            for n in sizes:
                work = Path(tmp) / f"{classes}-{n}"
                work.mkdir()
                cmd = [sys.executable, __file__, "--executor", args.executor, "--child"]
                subprocess.run([*cmd, str(n), str(classes), str(work)], env=env, check=True)
                runs.append(json.loads((work / "result.json").read_text()))
                print(f"[bench_scale] {classes} classes, N={n}: {runs[-1]['wall_s']:.1f} s",
                      flush=True)  # fmt: skip
                shutil.rmtree(work, ignore_errors=True)  # stores of the big runs: hundreds of MB
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    report(runs)


if __name__ == "__main__":
    main()
