"""R-CNN fine-tuning input vs the model, side by side in one run (issue 19, DESIGN "input pipelines
keep up with the model": goal input windows/s ÷ model windows/s >= 1.0).

Windows are drawn as fine-tuning draws them (128 per minibatch, uniformly over a dataset-wide pool,
so nearly every window comes from another image) from VOC-sized JPEGs (500 × 375, scikit-learn's
sample photos) with random proposals; images are decoded before timing in every arm, as a training
run's first epoch leaves them.

- before: the window source fine-tuning used until issue 19 (``pipelines.rcnn.common.
  WarpedWindows``), one image at a time, on the training thread, paying the whole-image float
  conversion that ``warp_regions`` did per call until then (reproduced here: that function now
  converts only each window).
- after: ``stages.training.rcnn.ImageWindows`` (per-window conversion, geometry vectorised per
  batch, crops pasted straight into the (B, 3, S, S) batch) with random flips, through
  ``prefetch`` on 0 and 2 background threads.
- model: one fine-tuning step (forward, backward, SGD) per minibatch of 128 on ready windows, for
  the CPU presets' net (``rcnn_small`` at 64 px) and the paper's (AlexNet at 227 px).

Two ratios: windows per CPU-second (input on one thread vs the model on one thread: on a 2-core
machine shared with other work this one does not move with the load) and windows per wall-second
(input on 0 or 2 background threads vs the model on all torch threads: what a run sees, but under
load a 2-thread model step slows far more than the input, its threads waiting for each other).
- loop: ``finetune_train_fn`` itself for a few iterations with the image windows vs with a source
  that returns ready windows: the end-to-end cost of the input on this CPU (1.0 = free).

    python benchmarks/bench_rcnn_input.py [--images 64] [--batches 20] [--alexnet-steps 3]
                                          [--device cuda]   # model on a GPU (gpu_check.sh)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import sklearn.datasets
import torch
import torch.nn.functional as F

from pipelines.rcnn.common import WarpedWindows
from stages.detection.warp import IMAGENET_MEAN_BGR
from stages.models.registry import create
from stages.training.context import LocalTrainContext
from stages.training.rcnn import ImageWindows, _flip, finetune_train_fn, prefetch

NETS = {  # (model kwargs, input size, context padding) as the presets use them
    "rcnn_small": ({"input_size": 64, "widths": (16, 32, 64, 128)}, 64, 4),
    "rcnn_alexnet": ({}, 227, 16),
}


def make_images(folder: Path, count: int, proposals: int, seed: int = 0):
    """``count`` 500x375 JPEG crops of the sample photos and ``proposals`` random boxes each."""
    rng = np.random.default_rng(seed)
    photos = [p[:, :, ::-1] for p in sklearn.datasets.load_sample_images().images]  # RGB -> BGR
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        y, x = rng.integers(0, photo.shape[0] - 375), rng.integers(0, photo.shape[1] - 500)
        paths.append(str(folder / f"{i:04d}.jpg"))
        cv2.imwrite(paths[-1], np.ascontiguousarray(photo[y : y + 375, x : x + 500]))
    index = np.repeat(np.arange(count), proposals)
    w, h = rng.uniform(20, 400, len(index)), rng.uniform(20, 300, len(index))
    x1, y1 = rng.uniform(1, 500 - w), rng.uniform(1, 375 - h)
    boxes = np.stack([x1, y1, x1 + w, y1 + h], 1).round().astype(np.float32)
    labels = np.where(rng.random(len(index)) < 0.25, rng.integers(1, 21, len(index)), 0)
    return paths, index, boxes, labels


class WholeImageConversion(WarpedWindows):
    """The pre-issue-19 source: ``WarpedWindows`` plus the whole-image ``astype(float32) - mean``
    that ``warp_regions`` performed on every call."""

    def get(self, indices):
        mean = np.asarray(IMAGENET_MEAN_BGR, np.float32)
        for i in np.unique(self.image_index[indices]):
            _ = self._image(int(i)).astype(np.float32) - mean  # (H, W, 3), discarded
        return super().get(indices)


def batches(n: int, pool: int, seed: int = 0) -> list[np.ndarray]:
    return [np.random.default_rng([seed, b]).integers(0, pool, 128) for b in range(n)]


def input_rate(source, draws: list[np.ndarray], threads: int | None) -> tuple[float, float]:
    """(windows/s, windows per CPU-second) of minibatches (with flips) as the loop receives them."""

    def one(b: int) -> torch.Tensor:
        crops = torch.as_tensor(source.get(draws[b]), dtype=torch.float32)
        return _flip(crops, np.random.default_rng(b))

    t0, c0 = time.perf_counter(), time.process_time()
    if threads is None:  # before: on the training thread, no flip pipeline
        for d in draws:
            source.get(d)
    else:
        for _ in prefetch(one, range(len(draws)), threads=threads):
            pass
    n = 128 * len(draws)
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def model_rate(name: str, steps: int, threads: int, device: str = "cpu") -> tuple[float, float]:
    """(windows/s, windows per CPU-second) of fine-tuning steps on ready windows; on a GPU the
    windows start in host memory, as the input pipeline delivers them, and each step copies them
    over and waits for the device."""
    kwargs, size, _ = NETS[name]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = create(name, num_classes=21, **kwargs).train().to(device)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    x, y = torch.randn(128, 3, size, size), torch.randint(0, 21, (128,))

    def step():
        loss = F.cross_entropy(net(x.to(device)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device != "cpu":
            torch.cuda.synchronize()

    step()  # warm-up: allocator, oneDNN primitives
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    torch.set_num_threads(before)
    return 128 * steps / wall, 128 * steps / cpu


class ReadyWindows:
    """A window source whose minibatches cost nothing: the loop's time without input work."""

    def __init__(self, labels: np.ndarray, size: int):
        self.labels, self.crops = labels, torch.randn(128, 3, size, size)

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, indices: np.ndarray) -> torch.Tensor:
        return self.crops[: len(indices)]


def loop_rate(name: str, source, iterations: int) -> float:
    kwargs = NETS[name][0]
    config = {
        "model": name,
        "model_kwargs": kwargs,
        "num_classes": 20,
        "window_source": source,
        "iterations": iterations + 1,
        "report_every": 10**6,
        "input_threads": 2,
    }
    finetune_train_fn(LocalTrainContext(), {**config, "iterations": 1})  # warm-up
    t0 = time.perf_counter()
    finetune_train_fn(LocalTrainContext(), config)
    return 128 * (iterations + 1) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--proposals", type=int, default=300)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--small-steps", type=int, default=10)
    ap.add_argument("--alexnet-steps", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="where the model step runs (cuda: a GPU)")
    args = ap.parse_args()
    threads = torch.get_num_threads()
    cv2.setNumThreads(threads)
    with tempfile.TemporaryDirectory() as d:
        paths, index, boxes, labels = make_images(Path(d), args.images, args.proposals)
        draws = batches(args.batches, len(labels))
        print(
            f"{args.images} images 500x375, {len(labels)} windows, minibatches of 128, "
            f"{threads} torch threads"
        )
        for name, steps in (("rcnn_small", args.small_steps), ("rcnn_alexnet", args.alexnet_steps)):
            if steps > 0:
                compare(name, steps, paths, index, boxes, labels, draws, args.proposals,
                        args.device)  # fmt: skip


def compare(name, steps, paths, index, boxes, labels, draws, proposals, device="cpu") -> None:
    _, size, padding = NETS[name]
    kw = dict(size=size, padding=padding)
    before = WholeImageConversion(paths, index, boxes, labels, **kw)
    after = ImageWindows(paths, [(500, 375)] * len(paths), index, boxes, labels, **kw)
    for source in (before, after):  # decode every image before timing
        source.get(np.arange(0, len(labels), proposals))
    threads = torch.get_num_threads()
    arms = {
        "before": lambda: input_rate(before, draws, None),
        "after, 0 threads": lambda: input_rate(after, draws, 0),
        "after, 2 threads": lambda: input_rate(after, draws, 2),
        "model": lambda: model_rate(name, steps, threads, device),
        "model, 1 thread": lambda: model_rate(name, steps, 1, device),
    }
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for _ in range(2):  # interleaved: the machine's other load hits every arm alike; best of 2
        for arm, fn in arms.items():
            w, c = fn()
            wall[arm], cpu[arm] = max(wall.get(arm, 0.0), w), max(cpu.get(arm, 0.0), c)
    model, model_cpu = wall["model"], cpu["model, 1 thread"]
    print(
        f"{name} @ {size} px on {device}: model step {model:.0f} windows/s on {threads} threads, "
        f"{model_cpu:.0f} windows per CPU-second on 1"
    )
    for arm in ("before", "after, 0 threads"):
        print(
            f"  input {arm:17s} {cpu[arm]:6.0f} windows per CPU-second = "
            f"{cpu[arm] / model_cpu:6.2f} x the model's (goal >= 1.0; load-independent)"
        )
    for arm in ("before", "after, 0 threads", "after, 2 threads"):
        print(
            f"  input {arm:17s} {wall[arm]:6.0f} windows/s = {wall[arm] / model:6.2f} x the"
            f" model's {threads}-thread step (goal >= 1.0)"
        )
    if device != "cpu":  # finetune_train_fn in-process runs on the CPU
        return
    fast = loop_rate(name, after, steps)
    ready = loop_rate(name, ReadyWindows(labels, size), steps)
    print(
        f"  finetune_train_fn: {fast:.0f} windows/s with image windows vs {ready:.0f} with ready"
        f" ones = {fast / ready:.2f} (1.0: the input costs the loop nothing)"
    )


if __name__ == "__main__":
    main()
