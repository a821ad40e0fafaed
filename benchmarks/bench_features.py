"""R-CNN feature extraction and feature cache, measured side by side in one run.

1. Extraction from an image (500×375, random boxes): the `features` step's own code
   (`pipelines.rcnn.features.image_features`: 256 boxes warped per call, 16 crops per forward
   pass on a CPU, BatchNorm folded into the convolutions) against a per-region loop (warp one
   box, one forward pass, the unfused network), in crops/s;
2. the forward pass alone: crops/s at 1, 16 and 256 crops per pass, and the achieved FLOP/s
   (torch.utils.flop_counter) against this machine's matrix-multiply FLOP/s (the best of float32
   GEMMs of 1024-4096 on the same threads): the ceiling a batched forward can reach;
3. Parquet feature-cache read throughput vs np.load of the same float32 array;
4. with ``--store STORE`` (a store holding an R-CNN run of ``--preset``): the whole `features`
   step recomputed on a copy of it, in-process and through Ray Data's actor pool on an embedded
   Ray (Ray started before timing), in crops/s against the per-region loop of part 1 — the same
   CNN when the preset uses ``rcnn_small`` at 64 px, as the CPU presets do.

    python benchmarks/bench_features.py [--model rcnn_small|rcnn_alexnet|rcnn_vgg16] [--crops N]
        [--device cpu|cuda] [--amp none|bf16] [--channels-last] [--rows 0 (skip the cache part)]
        [--store STORE --preset tiny]

With ``--amp bf16`` the step runs as ``features.amp=bf16`` does (bfloat16 autocast, 64 crops per
pass on a CPU), the matmul reference is a bf16 GEMM, and part 1 also prints the step against the
per-region loop in float32, the loop a user would write. On a GPU the matmul reference is a
GEMM on the same device, and every timing synchronises the device.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipelines.rcnn.features import WARP_CHUNK, default_chunk, image_features
from stages.detection.features import read_feature_shard, write_feature_shard
from stages.detection.warp import warp_regions_tensor
from stages.models.rcnn_backbones import FEATURE_LAYERS
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


def matmul_flops(device: str = "cpu", dtype=torch.float32) -> float:
    """The best FLOP/s of square GEMMs of a few sizes (one size alone under-reads the peak)."""
    best = 0.0
    for n in (1024, 2048, 4096):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        best = max(best, 2 * n**3 / best_of(lambda a=a, b=b: a @ b, 5))
    return best


def random_boxes(n: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """Proposal-like boxes, VOC 1-based inclusive: sides 20-100% of the image, anywhere in it."""
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.2, 1.0, n) * width
    h = rng.uniform(0.2, 1.0, n) * height
    x1 = 1 + rng.uniform(0, 1, n) * (width - w)
    y1 = 1 + rng.uniform(0, 1, n) * (height - h)
    return np.stack([x1, y1, x1 + w - 1, y1 + h - 1], 1).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="rcnn_small")
    ap.add_argument("--crops", type=int, default=0, help="default: 1024 (rcnn_small), else 128")
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--amp", default="none", choices=["none", "bf16"])
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument(
        "--tf32", action="store_true", help="CUDA: TF32 for float32 convolutions and matmuls"
    )
    ap.add_argument(
        "--store", help="a store holding an rcnn run of --preset: time its features step"
    )
    ap.add_argument("--preset", default="tiny")
    args = ap.parse_args()

    # one setting for the convolutions and the GEMM reference (torch's defaults differ: cuDNN
    # convolutions in TF32, matmuls in strict float32), so "float32" means float32 on both sides
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.tf32
    kwargs = {"input_size": 64} if args.model == "rcnn_small" else {}
    crops = args.crops or (1024 if args.model == "rcnn_small" else 128)
    torch.manual_seed(0)
    model = create(args.model, num_classes=21, **kwargs).eval().to(args.device)
    fused = model.fused_for_inference()
    size = model.input_size
    if args.channels_last:
        model.channels_last = fused.channels_last = True
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.features_all(torch.zeros(1, 3, size, size, device=args.device))
    flops_per_crop = counter.get_total_flops()
    amp = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.amp == "bf16")
    chunk = default_chunk(torch.device(args.device), args.amp)

    # 1. from an image: the step's chunked path vs a per-region loop
    image = np.random.default_rng(1).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    boxes = random_boxes(crops, 500, 375)
    loop_n = min(64 if args.model == "rcnn_small" else 16, crops)
    dev = args.device

    def step_path(amp_mode: str):  # the features step's own code
        def run():
            image_features(
                fused, image, boxes, layers=FEATURE_LAYERS, padding=16, mode="warp",
                chunk=default_chunk(torch.device(dev), amp_mode), device=torch.device(dev),
                amp=amp_mode,
            )  # fmt: skip

        return run

    def per_region(amp_mode: str):
        def run():
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp_mode == "bf16"):
                for b in boxes[:loop_n]:
                    x = warp_regions_tensor(image, b[None], size=size, padding=16)
                    model.features_all(x.to(dev))

        return run

    # arms interleaved over 3 rounds, the best time of each: this machine's speed drifts by
    # up to 1.5x between minutes, so arms timed one after the other are not comparable
    modes = ["none"] if args.amp == "none" else ["none", args.amp]
    arms = {(kind, m): (crops if kind == "step" else loop_n, f(m))
            for m in modes for kind, f in (("step", step_path), ("loop", per_region))}  # fmt: skip
    best = dict.fromkeys(arms, float("inf"))
    with torch.inference_mode():
        for _n, run in arms.values():
            run()  # warm-up (allocator, oneDNN/cuDNN algorithm choice)
        for _ in range(3):
            for arm, (_n, run) in arms.items():
                best[arm] = min(best[arm], best_of(run, 1))
    rate = {arm: arms[arm][0] / t for arm, t in best.items()}
    step_rate, loop_rate = rate["step", args.amp], rate["loop", args.amp]
    fp32_loop_rate = rate["loop", "none"]
    where = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"{torch.get_num_threads()} threads"
    )
    print(
        f"{args.model} at {size}px on {where} (amp={args.amp}, channels_last="
        f"{model.channels_last}, tf32={args.tf32}): {flops_per_crop / 1e9:.3f} GFLOP/crop"
    )
    print(
        f"  from the image: features step (warp {WARP_CHUNK} boxes/call, {chunk} crops/pass, BN "
        f"folded) {step_rate:6.0f} crops/s"
        f" vs per-region loop {loop_rate:6.0f} crops/s = {step_rate / loop_rate:.1f}x (goal >= 10x)"
    )
    if args.amp != "none":
        fp32_step_rate = rate["step", "none"]
        print(
            f"  the same step vs the per-region loop in float32 ({fp32_loop_rate:.0f} crops/s): "
            f"{step_rate / fp32_loop_rate:.1f}x; vs the float32 step ({fp32_step_rate:.0f} "
            f"crops/s, {fp32_step_rate / fp32_loop_rate:.1f}x the loop): "
            f"{step_rate / fp32_step_rate:.2f}x"
        )
    print(
        f"  2000 proposals/image: {2000 / step_rate:.1f} s/image for warping + features "
        "(paper: 53 s/image on a CPU, 13 s/image on a GPU, proposals included)"
    )

    # 2. the forward pass alone, against the machine's GEMM FLOP/s
    x = torch.randn(crops, 3, size, size, device=args.device)
    peak = matmul_flops(
        device=args.device, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float32
    )
    rates = {}
    with torch.inference_mode(), amp:
        for bs in dict.fromkeys((1, min(chunk, crops), min(256, crops))):  # labels = real sizes
            n = loop_n if bs == 1 else crops
            fused.features_all(x[:bs])

            def run(bs=bs, n=n):
                for i in range(0, n, bs):
                    fused.features_all(x[i : i + bs])

            rates[bs] = n / best_of(run, 2)
    for bs, rate in rates.items():
        print(
            f"  forward only, {bs:3d} crops/pass: {rate:8.0f} crops/s = "
            f"{rate * flops_per_crop / 1e9:6.1f} GFLOP/s = {rate * flops_per_crop / peak:.2f} of "
            f"matmul's {peak / 1e9:.0f} GFLOP/s (goal >= 0.6)"
        )
    best = max(rates.values())
    print(
        f"  ceiling of batching here: the best batched rate is {best / rates[1]:.1f}x one crop "
        f"per pass, which already runs at {rates[1] * flops_per_crop / peak:.2f} of matmul"
    )

    if args.store:
        features_step(args.store, args.preset, fp32_loop_rate, args.amp)
    if args.rows <= 0:
        return
    rng = np.random.default_rng(0)
    feats = np.maximum(rng.standard_normal((args.rows, args.dim), dtype=np.float32), 0)
    n = args.rows
    with tempfile.TemporaryDirectory() as d:
        npy = Path(d) / "f.npy"
        np.save(npy, feats)
        t_npy = best_of(lambda: np.load(npy).sum())
        mb = feats.nbytes / 2**20
        for dtype in ("float32", "float16"):
            pq_path = Path(d) / f"f-{dtype}.parquet"
            write_feature_shard(
                pq_path,
                image_ids=["im"] * n,
                box_index=np.arange(n, dtype=np.int32),
                is_gt=np.zeros(n, bool),
                boxes=np.ones((n, 4), np.float32),
                gt_class=-np.ones(n, np.int16),
                max_iou=np.zeros((n, 20), np.float32),
                features=feats,
                dtype=dtype,
            )
            t_pq = best_of(lambda p=pq_path: read_feature_shard(p, ["features"])["features"].sum())
            print(
                f"feature cache {n}x{args.dim} as {dtype} ({mb:.0f} MiB as float32): np.load "
                f"{mb / t_npy:.0f} MiB/s, Parquet {mb / t_pq:.0f} MiB/s of float32 out = "
                f"{t_npy / t_pq:.2f} of .npy (goal >= 0.5); size on disk "
                f"{pq_path.stat().st_size / npy.stat().st_size:.2f} of the float32 .npy"
            )


def features_step(store: str, preset: str, loop_rate: float, amp: str = "none") -> None:
    """Part 4: the `features` step itself, in-process and through Ray Data, on copies of store
    (with ``features.amp`` = ``amp``), against the float32 per-region loop's ``loop_rate``."""
    import shutil

    from cluster import runtime
    from pipelines import runner

    runtime.connect(include_dashboard=False, temp_dir="/tmp/pl-bench")
    quiet = dict(progress=False, log=lambda _: None, force="features", until="features")
    with tempfile.TemporaryDirectory() as d:
        rates = {}
        for executor in ("local", "ray"):
            copy = f"{d}/store-{executor}"
            shutil.copytree(
                store, copy, ignore=shutil.ignore_patterns("_work", "features", "region_features")
            )
            t0 = time.perf_counter()
            overrides = {"features.amp": amp} if amp != "none" else {}
            out = runner.run(
                "rcnn", preset, overrides, store=copy, runs=f"{d}/runs", executor=executor, **quiet
            )
            wall = time.perf_counter() - t0
            assert out.computed() == ["features"], out.manifest  # the rest stays cached
            rows = out.metrics["feature_rows"]
            rates[executor] = rows / wall
            print(
                f"  features step of rcnn/{preset} ({rows} crops, warp + CNN + Parquet) on "
                f"{executor}: {wall:.1f} s = {rates[executor]:.0f} crops/s = "
                f"{rates[executor] / loop_rate:.1f}x the per-region loop"
            )
        print(f"  through Ray Data / in-process: {rates['ray'] / rates['local']:.2f}")


if __name__ == "__main__":
    main()
