"""R-CNN feature extraction and feature cache, measured side by side in one run.

1. crops/s of the CNN batched (chunks of 256) vs a per-region loop, and achieved FLOP/s vs this
   machine's measured matrix-multiply FLOP/s (torch.utils.flop_counter counts the model's FLOPs);
2. Parquet feature-cache read throughput vs np.load of the same float32 array.

    python benchmarks/bench_features.py [--model rcnn_small|rcnn_alexnet|rcnn_vgg16] [--crops 1024]
        [--device cpu|cuda] [--amp none|bf16] [--channels-last] [--rows 0 (skip the cache part)]

On a GPU the matmul reference is a bf16/float32 GEMM on the same device, and every timing
synchronises the device.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from stages.detection.features import read_feature_shard, write_feature_shard
from stages.models.registry import create


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_flops(n: int = 2048, device: str = "cpu", dtype=torch.float32) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    return 2 * n**3 / best_of(lambda: a @ b)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="rcnn_small")
    ap.add_argument("--crops", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--amp", default="none", choices=["none", "bf16"])
    ap.add_argument("--channels-last", action="store_true")
    args = ap.parse_args()

    kwargs = {"input_size": 64} if args.model == "rcnn_small" else {}
    model = create(args.model, **kwargs).eval().to(args.device)
    size = model.input_size
    x = torch.randn(args.crops, 3, size, size, device=args.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.features_all(x[:1])
    flops_per_crop = counter.get_total_flops()
    amp = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.amp == "bf16")
    with torch.inference_mode(), amp:
        model.features_all(x[:256])  # warm-up (cuDNN autotuning, allocator)
        batched = best_of(
            lambda: [model.features_all(x[i : i + 256]) for i in range(0, len(x), 256)], 2
        )
        loop_n = min(64, args.crops)
        per_region = best_of(lambda: [model.features_all(x[i : i + 1]) for i in range(loop_n)], 2)
    crops_batched, crops_loop = args.crops / batched, loop_n / per_region
    peak = matmul_flops(
        device=args.device, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float32
    )
    where = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"{torch.get_num_threads()} threads"
    )
    print(
        f"{args.model} at {size}px on {where} (amp={args.amp}, channels_last="
        f"{args.channels_last}): {flops_per_crop / 1e9:.3f} GFLOP/crop"
    )
    print(f"  batched:    {crops_batched:8.0f} crops/s")
    print(
        f"  per-region: {crops_loop:8.0f} crops/s   -> batched is {crops_batched / crops_loop:.1f}x "
        "(goal >= 10x)"
    )
    print(
        f"  achieved {crops_batched * flops_per_crop / 1e9:.1f} GFLOP/s vs matmul "
        f"{peak / 1e9:.1f} GFLOP/s = {crops_batched * flops_per_crop / peak:.2f} (goal >= 0.6)"
    )
    print(
        f"  2000 proposals/image: {2000 / crops_batched:.1f} s/image for features "
        "(paper: 53 s/image on a CPU incl. proposals, 13 s/image on a GPU)"
    )

    if args.rows <= 0:
        return
    rng = np.random.default_rng(0)
    feats = np.maximum(rng.standard_normal((args.rows, args.dim), dtype=np.float32), 0)
    n = args.rows
    with tempfile.TemporaryDirectory() as d:
        npy, pq_path = Path(d) / "f.npy", Path(d) / "f.parquet"
        np.save(npy, feats)
        write_feature_shard(
            pq_path,
            image_ids=["im"] * n,
            box_index=np.arange(n, dtype=np.int32),
            is_gt=np.zeros(n, bool),
            boxes=np.ones((n, 4), np.float32),
            gt_class=-np.ones(n, np.int16),
            max_iou=np.zeros((n, 20), np.float32),
            features=feats,
        )
        t_npy = best_of(lambda: np.load(npy).sum())
        t_pq = best_of(lambda: read_feature_shard(pq_path, ["features"])["features"].sum())
        mb = feats.nbytes / 2**20
        print(
            f"feature cache {n}x{args.dim} float32 ({mb:.0f} MiB): np.load {mb / t_npy:.0f} MiB/s, "
            f"Parquet {mb / t_pq:.0f} MiB/s = {t_npy / t_pq:.2f} of .npy (goal >= 0.5); "
            f"size on disk {pq_path.stat().st_size / npy.stat().st_size:.2f} of .npy"
        )


if __name__ == "__main__":
    main()
