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
import time

import numpy as np
from sklearn.metrics import average_precision_score

from pipelines import runner
from stages.detection.svm import HardNegativeSVM


def synthetic_stream(images: int, per_image: int, dim: int, seed: int = 0):
    """Detection-like data: few positives, many negatives of which a small share are hard
    (close to the positives), streamed one 'image' at a time."""
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(dim).astype(np.float32)
    direction /= np.linalg.norm(direction)

    def draw(n, shift):
        x = rng.standard_normal((n, dim)).astype(np.float32) + shift * direction
        return 20 * x / np.linalg.norm(x, axis=1, keepdims=True).mean()  # mean norm 20

    positives = draw(images // 2, 3.0)
    batches = []
    for i in range(images):
        hard = rng.random(per_image) < 0.02
        neg = np.where(hard[:, None], draw(per_image, 2.0), draw(per_image, -0.5))
        batches.append((i * per_image + np.arange(per_image), neg))
    test = (draw(200, 3.0), draw(5000, -0.5), draw(100, 2.0))
    return positives, batches, test


def scaling(images: int, per_image: int, dim: int) -> None:
    positives, batches, (tp, tn_easy, tn_hard) = synthetic_stream(images, per_image, dim)
    x_test = np.concatenate([tp, tn_easy, tn_hard])
    y_test = np.r_[np.ones(len(tp)), np.zeros(len(tn_easy) + len(tn_hard))]
    res = {}
    for mode in ("hnm", "all"):
        t0 = time.perf_counter()
        svm = HardNegativeSVM(mode=mode).fit_stream(positives, iter(batches))
        res[mode] = (
            time.perf_counter() - t0,
            average_precision_score(y_test, svm.decision_function(x_test)),
            svm.n_negatives_cache_,
        )
    (t_h, ap_h, c_h), (t_a, ap_a, c_a) = res["hnm"], res["all"]
    n = images * per_image
    print(
        f"synthetic stream, {images} images x {per_image} negatives x {dim} dims ({n} negatives):"
    )
    print(
        f"  hnm {t_h:.1f} s vs all {t_a:.1f} s = {t_a / t_h:.2f}x faster (goal >= 3x); "
        f"AP hnm {ap_h:.4f} vs all {ap_a:.4f}; negatives held {c_h} vs {c_a}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="ci")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--per-image", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=512)
    args = ap.parse_args()
    scaling(args.images, args.per_image, args.dim)
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
