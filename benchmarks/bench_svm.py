"""Hard negative mining vs training on all negatives: SVM-step time ratio and mAP difference.

Runs the R-CNN pipeline (in-process) on one preset twice, sharing every step up to the feature
cache, with `svm.mode=hnm` and `svm.mode=all`; the SVM step's wall time comes from the manifest.
Memory proxy: negatives held by the mining cache vs all negatives.

    python benchmarks/bench_svm.py [--preset ci]
"""

from __future__ import annotations

import argparse
import json
import tempfile

from pipelines import runner


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="ci")
    args = ap.parse_args()
    out = {}
    with tempfile.TemporaryDirectory() as d:
        kw = dict(
            store=f"{d}/store",
            runs=f"{d}/runs",
            executor="local",
            progress=False,
            log=lambda _: None,
        )
        runner.run("rcnn", args.preset, until="features", **kw)  # shared, not timed
        for mode in ("hnm", "all"):
            result = runner.run("rcnn", args.preset, {"svm.mode": mode}, **kw)
            wall = next(m["wall_s"] for m in result.manifest if m["step"] == "svm")
            stats = json.loads((result.artifacts["svm"].local_dir() / "svm_stats.json").read_text())
            out[mode] = (wall, result.metrics["mAP_voc07"], sum(s["cache"] for s in stats.values()))
    (t_h, map_h, cache_h), (t_a, map_a, cache_a) = out["hnm"], out["all"]
    print(
        f"rcnn/{args.preset}: SVM step hnm {t_h:.2f} s vs all negatives {t_a:.2f} s "
        f"= {t_a / t_h:.2f}x faster (goal >= 3x)"
    )
    print(
        f"  mAP_voc07 hnm {100 * map_h:.1f} vs all {100 * map_a:.1f}: "
        f"difference {100 * (map_h - map_a):+.1f} points (goal within 0.5)"
    )
    print(
        f"  negatives held in memory (summed over classes): hnm {cache_h} vs all {cache_a} "
        f"= {cache_h / max(cache_a, 1):.2f}"
    )


if __name__ == "__main__":
    main()
