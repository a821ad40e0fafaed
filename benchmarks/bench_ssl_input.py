"""SSL input pipeline vs the model it feeds (issue 19; DESIGN "input pipelines keep up with the
model"): for one FixMatch step, the time to build its views (weak views of the labelled batch,
weak + strong views of the unlabeled batch) against the time of the model's training step on
those views, measured side by side in one run, interleaved, same threads.

Input arms:
- ``serial``: the strong view as before issue 19, one torchvision ``v2.RandAugment`` call per image
  (FixMatch's per-image draw), inside ``fork_rng`` so the draw is seeded;
- ``serial/8``: the same with one draw per 8 images (what the CPU presets ran, ``ra_group=8``);
- ``batched``: ``stages.ssl.augment`` as the training loop now calls it (one vectorised call per
  op over the images that drew it; per-image draws kept).

The model arm is a forward over all views, the FixMatch loss, backward and an SGD step.
Throughput is in FixMatch examples (labelled + unlabeled) per second; ``input/model`` ≥ 1 means
the input pipeline keeps up (goal). Setups: ``cpu`` = the CPU presets (ssl_convnet, 1×16×16,
batch 16 + 3·16), the default; ``paper`` = WRN-28-2 on 3×32×32, batch 64 + 7·64, whose model step
takes 30 s to minutes per round on one CPU thread (so it is opt-in).

    python benchmarks/bench_ssl_input.py [--setups cpu,paper] [--rounds 5] [--threads 1]
                                         [--device cuda]   # model on a GPU (gpu_check.sh)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from stages.models.registry import create
from stages.ssl.augment import cutout, strong_augment, weak_augment

SETUPS = {  # name: (model, kwargs, channels, side_px, labelled batch, mu)
    "cpu": ("ssl_convnet", {}, 1, 16, 16, 3),
    "paper": ("wrn_28_2", {}, 3, 32, 64, 7),
}


def serial_strong(images: torch.Tensor, seed: int, group: int) -> torch.Tensor:
    """The strong view before issue 19: weak, then one seeded RandAugment call per ``group``
    images, then Cutout."""
    out = weak_augment(images, seed)
    g = torch.Generator().manual_seed(seed + 1)
    chunks = torch.split(torch.arange(len(out)), group)
    magnitudes = torch.randint(0, 10, (len(chunks),), generator=g)
    op_seeds = torch.randint(0, 2**62, (len(chunks),), generator=g)
    views = torch.empty_like(out)
    with torch.random.fork_rng(devices=[]):
        for idx, m, s in zip(chunks, magnitudes.tolist(), op_seeds.tolist(), strict=True):
            torch.default_generator.manual_seed(s)
            views[idx] = v2.RandAugment(num_ops=2, magnitude=m, num_magnitude_bins=10)(out[idx])
    return cutout(views, seed + 2)


def make_views(lab: torch.Tensor, unl: torch.Tensor, seed: int, arm: str) -> torch.Tensor:
    parts = [weak_augment(lab, seed), weak_augment(unl, seed + 10)]
    if arm == "batched":
        parts.append(strong_augment(unl, seed + 20))
    else:
        parts.append(serial_strong(unl, seed + 20, 1 if arm == "serial" else 8))
    return torch.cat(parts)  # (b + 2·bu, C, H, W) uint8


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def _sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def bench_setup(name: str, rounds: int, device: str = "cpu") -> dict:
    model_name, kwargs, c, side, b, mu = SETUPS[name]
    bu = mu * b
    g = torch.Generator().manual_seed(0)
    pool = torch.randint(0, 256, (4 * (b + bu), c, side, side), dtype=torch.uint8, generator=g)
    torch.manual_seed(0)
    net = create(model_name, num_classes=10, in_channels=c, **kwargs).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.03, momentum=0.9, nesterov=True)
    y = torch.randint(0, 10, (b,), generator=g).to(device)
    net.train()

    def model_step(x: torch.Tensor) -> None:
        """As the loop: views built in host memory, copied to the device, one step, waited for."""
        x = x.to(device)
        logits = net((x.float() / 255 - 0.5) / 0.25)
        weak = logits[b : b + bu].detach().softmax(1)
        conf, pl = weak.max(1)
        mask = (conf >= 0.95).float()
        loss_u = (mask * F.cross_entropy(logits[b + bu :], pl, reduction="none")).mean()
        loss = F.cross_entropy(logits[:b], y) + loss_u
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)

    def on_device(lab: torch.Tensor, unl: torch.Tensor, seed: int) -> None:
        """The batched views built from images already on the device (one candidate for a GPU
        run; the loop builds them on the host today)."""
        make_views(lab.to(device), unl.to(device), seed, "batched")
        _sync(device)

    arms = ("serial", "serial/8", "batched") + (("batched@device",) if device != "cpu" else ())
    times: dict[str, list[float]] = {a: [] for a in (*arms, "model")}
    views = make_views(pool[:b], pool[b : b + bu], 0, "batched")
    model_step(views)  # warm-up: first-call allocations
    for r in range(rounds):  # interleaved, so load changes hit every arm alike
        lab = pool[(r * b) % len(pool) :][:b]
        unl = pool[torch.randperm(len(pool), generator=g)[:bu]]
        for arm in arms:
            if arm == "batched@device":
                times[arm].append(timed(on_device, lab, unl, r))
            else:
                times[arm].append(timed(make_views, lab, unl, r, arm))
        times["model"].append(timed(model_step, views))
    return {arm: float(np.median(t)) for arm, t in times.items()} | {"examples": b + bu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setups", default="cpu")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads, as one Ray worker")
    ap.add_argument("--device", default="cpu", help="where the model step runs (cuda: a GPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads: {args.threads}; model on {args.device}; "
          f"median of {args.rounds} interleaved rounds")  # fmt: skip
    print(f"{'setup':6} {'arm':9} {'step s':>8} {'examples/s':>11} {'input/model':>12}")
    for name in args.setups.split(","):
        t = bench_setup(name, args.rounds, args.device)
        n, model_s = t["examples"], t["model"]
        print(f"{name:6} {'model':9} {model_s:8.3f} {n / model_s:11.0f} {'':>12}")
        for arm in [a for a in ("serial", "serial/8", "batched", "batched@device") if a in t]:
            print(f"{name:6} {arm:9} {t[arm]:8.3f} {n / t[arm]:11.0f} {model_s / t[arm]:12.2f}")
        print(f"{name:6} batched vs serial: {t['serial'] / t['batched']:.1f}x faster input")


if __name__ == "__main__":
    main()
