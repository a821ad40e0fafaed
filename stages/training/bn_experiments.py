"""Training loops for the Batch Normalization experiments (Ioffe & Szegedy 2015, REFERENCE §2).

:func:`train_classifier` trains any classifier by minibatch SGD and, every ``eval_every`` steps
(and at step 0), records test accuracy and — for Figure 1(b, c) — the 15/50/85th percentiles of one
last-hidden-layer sigmoid input over a fixed probe batch. :func:`steps_to_reach` turns a curve into
Figure 3's "steps to match" column. :func:`train_data_parallel` is the same loop as a
``TrainContext`` training function (Ray Train workers, or in-process), used to compare per-worker
and synchronised BN statistics.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PERCENTILES = (15, 50, 85)  # Figure 1(b, c)


@dataclass(frozen=True)
class Arrays:
    """Float inputs and int64 labels of one split, in memory (small sets: MNIST, digits, CIFAR)."""

    x: torch.Tensor  # (N, ...) float32
    y: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device | str) -> Arrays:
        return Arrays(self.x.to(device), self.y.to(device))


def trial_device() -> torch.device:
    """A trial's GPU when Ray (or the user) gave it one; the sets are small enough to live there."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def percentiles(
    values: torch.Tensor | np.ndarray, qs: Sequence[float] = PERCENTILES
) -> list[float]:
    """The ``qs`` percentiles of a 1-D sample (linear interpolation, numpy's default)."""
    v = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"percentiles need a non-empty 1-D sample, got shape {v.shape}")
    return [float(p) for p in np.percentile(v, qs)]


@torch.no_grad()
def sigmoid_input_percentiles(
    model: nn.Module, probe_x: torch.Tensor, unit: int, qs: Sequence[float] = PERCENTILES
) -> list[float]:
    """Percentiles over the probe batch of unit ``unit``'s input to the last hidden sigmoid
    (``model.preactivations``), evaluated in inference mode so probing changes no statistics."""
    was_training = model.training
    model.eval()
    _, pre = model.preactivations(probe_x)
    model.train(was_training)
    return percentiles(pre[-1][:, unit], qs)


def steps_to_reach(steps: Sequence[int], values: Sequence[float], target: float) -> int | None:
    """First recorded step whose value is >= ``target`` (None if never): Figure 3's column."""
    for step, value in zip(steps, values, strict=True):
        if value >= target - 1e-12:
            return int(step)
    return None


@torch.no_grad()
def accuracy(
    model: nn.Module, data: Arrays, batch_size: int = 1000, batch_statistics: bool = False
) -> float:
    """Top-1 accuracy. ``batch_statistics=True`` normalises each test minibatch of ``batch_size``
    by its own statistics (BN in training mode, on a copy so no running statistic moves): the
    train-mode side of the batch-size study. Every example is then scored in a batch of exactly
    ``batch_size``: the last ``len % batch_size`` examples go through as the tail of the last
    ``batch_size`` examples (a short last batch would be normalised by fewer statistics)."""
    if batch_statistics:
        model = copy.deepcopy(model).train()
        for m in model.modules():  # dropout stays off; only BN uses batch statistics
            if isinstance(m, nn.Dropout):
                m.eval()
    else:
        was_training = model.training
        model.eval()
    correct, n = 0, len(data)
    for i in range(0, n, batch_size):
        start = i
        if batch_statistics and i + batch_size > n:
            start = max(0, n - batch_size)  # a full batch whose new examples are i..n
        logits = model(data.x[start : i + batch_size])[i - start :]
        correct += int((logits.argmax(1) == data.y[i : i + batch_size]).sum())
    if not batch_statistics:
        model.train(was_training)
    return correct / len(data)


def make_optimizer(
    model: nn.Module, kind: str, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    # L2 on weights only: BN's γ/β and biases are not decayed (a scale-free γ has no use for it)
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    rest = [p for n, p in model.named_parameters() if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0}]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr)
    raise ValueError(f"unknown optimizer {kind!r}; valid: sgd, adam")


def lr_at(step: int, lr: float, decay_rate: float, decay_steps: int) -> float:
    """Exponential decay, lr · rate^(step / decay_steps) (Inception's schedule, stepwise-smooth)."""
    return lr * decay_rate ** (step / decay_steps) if decay_steps > 0 else lr


SHUFFLES = ("full", "blocks")


class MinibatchSampler:
    """Minibatches of m, a new pass when fewer than m examples are left.

    ``shuffle="full"`` reshuffles every example every pass (§4.2.1's "shuffle training examples
    more thoroughly", which let the same examples stop "always appearing in a mini-batch
    together"). ``"blocks"`` is the less thorough shuffling it replaced: the examples are
    permuted once into fixed minibatches and only the order of those minibatches changes from
    pass to pass, so each example always meets the same m − 1 others."""

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: str = "full"):
        if shuffle not in SHUFFLES:
            raise ValueError(f"shuffle must be one of {SHUFFLES}, got {shuffle!r}")
        self.n, self.batch_size, self.shuffle = n, batch_size, shuffle
        self.g = torch.Generator().manual_seed(seed)
        if shuffle == "blocks":  # ("full" draws nothing more: its passes are as before)
            perm = torch.randperm(n, generator=self.g)
            self.blocks = perm[: n - n % batch_size].view(-1, batch_size)
        self.order, self.pos = self._pass(), 0

    def _pass(self) -> torch.Tensor:
        if self.shuffle == "full":
            return torch.randperm(self.n, generator=self.g)
        return self.blocks[torch.randperm(len(self.blocks), generator=self.g)].reshape(-1)

    def next(self) -> torch.Tensor:
        if self.pos + self.batch_size > len(self.order):
            self.order, self.pos = self._pass(), 0
        idx = self.order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx


# §4.2.1 "reduce the photometric distortions": Inception trained on distorted images and the
# accelerated BN networks distorted them less. The paper gives no magnitudes; at strength s a
# training image (standardised inputs) gets brightness + U(−0.25 s, 0.25 s) and its contrast about
# its own mean scaled by U(1 − 0.3 s, 1 + 0.3 s), drawn per image per step.
BRIGHTNESS, CONTRAST = 0.25, 0.3


def photometric(x: torch.Tensor, strength: float, g: torch.Generator) -> torch.Tensor:
    """Random brightness and contrast per image of ``x`` (N, C, H, W) at ``strength`` (0: none);
    draws come from ``g`` (CPU) so a seed gives the same distortions on any device."""
    if strength <= 0:
        return x
    n = x.shape[0]
    shift = (torch.rand(n, generator=g) * 2 - 1) * BRIGHTNESS * strength
    scale = 1 + (torch.rand(n, generator=g) * 2 - 1) * CONTRAST * strength
    shift, scale = (t.to(x.device, x.dtype).view(n, 1, 1, 1) for t in (shift, scale))
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * scale + mean + shift


def train_classifier(
    model: nn.Module,
    train: Arrays,
    test: Arrays,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    lr_decay_rate: float = 1.0,
    lr_decay_steps: int = 0,
    eval_every: int = 100,
    seed: int = 0,
    probe_x: torch.Tensor | None = None,
    probe_unit: int = 0,
    on_record: Callable[[dict], None] | None = None,
    shuffle: str = "full",
    distortion: float = 0.0,
) -> list[dict]:
    """Minibatch training with cross-entropy; returns one record per evaluation:
    ``{"step", "test_acc", "train_loss", "wall_s"[, "p15", "p50", "p85"]}`` (step 0 = init).
    ``train_loss`` is the mean minibatch loss since the previous record. ``shuffle`` and
    ``distortion`` (photometric strength) are §4.2.1's two data changes (`MinibatchSampler`,
    `photometric`); the defaults (full reshuffle, no distortion) are §4.1's MNIST setting."""
    if batch_size > len(train):
        raise ValueError(f"batch size {batch_size} exceeds the {len(train)} training examples")
    opt = make_optimizer(model, optimizer, lr, momentum, weight_decay)
    sampler = MinibatchSampler(len(train), batch_size, seed, shuffle)
    distort = torch.Generator().manual_seed(seed * 7919 + 17)
    records: list[dict] = []
    losses: list[float] = []
    train_s = 0.0

    def record(step: int) -> None:
        rec = {
            "step": step,
            "test_acc": accuracy(model, test),
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "wall_s": train_s,
        }
        if probe_x is not None:
            rec.update(
                zip(
                    ("p15", "p50", "p85"),
                    sigmoid_input_percentiles(model, probe_x, probe_unit),
                    strict=True,
                )
            )
        records.append(rec)
        losses.clear()
        if on_record is not None:
            on_record(rec)

    model.train()
    record(0)
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, lr, lr_decay_rate, lr_decay_steps)
        idx = sampler.next()
        loss = F.cross_entropy(model(photometric(train.x[idx], distortion, distort)), train.y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        train_s += time.perf_counter() - t0
        losses.append(loss.item())
        if step % eval_every == 0 or step == steps:
            record(step)
    return records


# ----------------------------------------------------------------------------------------------
# data-parallel BN: per-worker vs synchronised statistics (REFERENCE §2, "known criticisms")
def train_data_parallel(ctx, config: dict) -> None:
    """``TrainContext`` training function: the §4.1 BN network, each worker on its own shard and
    minibatch of ``per_worker_batch``, trained once per entry of ``sync`` (False: each worker
    normalises by its own minibatch; True: by the moments of the global batch, all-reduced). Both
    runs share one Ray Train start-up (≈15 s) and start from the same initial weights.

    config: ``data_path`` (an ``.npz`` with x_train/y_train/x_test/y_test), ``sync`` (a list of
    bools), ``steps``, ``per_worker_batch``, ``lr``, ``eval_every``, ``seed``, ``init_std``,
    ``hidden``. Reports ``{"step", "sync", "test_acc", "train_s", "steps_per_s", "world_size"}``
    every ``eval_every`` steps (accuracy from rank 0's replica; DDP keeps the replicas equal).
    """
    from stages.models.bn_nets import MnistMLP

    train, test = load_npz_arrays(config["data_path"])
    rank, world = ctx.rank, ctx.world_size
    shard = Arrays(train.x[rank::world], train.y[rank::world]).to(ctx.device)  # disjoint shards
    test = test.to(ctx.device)
    for sync in config["sync"]:
        torch.manual_seed(config["seed"])  # the same initial replica on every worker
        # one worker (in process, no process group): its statistics are the global batch's, so
        # "sync" is the per-worker computation, said explicitly (sync BN refuses to fall back)
        net = MnistMLP(
            bn=True, hidden=tuple(config["hidden"]), init_std=config["init_std"],
            sync_bn=bool(sync) and world > 1,
        )  # fmt: skip
        model = ctx.prepare_model(net)
        opt = torch.optim.SGD(model.parameters(), lr=config["lr"])
        sampler = MinibatchSampler(
            len(shard), config["per_worker_batch"], config["seed"] * 1000 + rank
        )
        train_s = 0.0
        for step in range(1, config["steps"] + 1):
            t0 = time.perf_counter()
            idx = sampler.next()
            loss = F.cross_entropy(model(shard.x[idx]), shard.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()  # DDP averages gradients across workers
            opt.step()
            train_s += time.perf_counter() - t0
            if step % config["eval_every"] == 0 or step == config["steps"]:
                acc = accuracy(net, test) if rank == 0 else float("nan")
                metrics = {
                    "step": step,
                    "sync": bool(sync),
                    "test_acc": acc,
                    "train_s": train_s,
                    "steps_per_s": step / max(train_s, 1e-9),
                    "world_size": world,
                }
                # Ray Train (V2) keeps the metrics of reports that carry a checkpoint
                ctx.report(metrics, checkpoint={"step": step, "sync": bool(sync), "test_acc": acc})


def load_npz_arrays(path: str) -> tuple[Arrays, Arrays]:
    """(train, test) from an ``.npz`` of uint8 images ``x_*`` (N, ...) and labels ``y_*``; pixels
    scaled to [0, 1]."""
    with np.load(path) as z:
        return tuple(
            Arrays(
                torch.from_numpy(z[f"x_{s}"].astype(np.float32) / 255.0),
                torch.from_numpy(z[f"y_{s}"].astype(np.int64)),
            )
            for s in ("train", "test")
        )


# ----------------------------------------------------------------------------------------------
# sweep trainables: ``trial(config, report)``, called by Tune or in-process (plain dict configs)
def mnist_trial(config: dict, report: Callable[[dict], None]) -> None:
    """§4.1: one network (``bn`` or not) for one seed; reports every evaluation record, then a
    ``final`` record with Algorithm 2's accuracy (exact population statistics, and folded)."""
    from stages.models.batchnorm import estimate_population_statistics, fold_batchnorm
    from stages.models.bn_nets import MnistMLP

    device = trial_device()
    train, test = (a.to(device) for a in load_npz_arrays(config["data_path"]))
    torch.manual_seed(config["seed"])
    model = MnistMLP(
        bn=config["bn"],
        hidden=tuple(config["hidden"]),
        init_std=config["init_std"],
        bn_kind=config["bn_kind"],
    ).to(device)
    records = train_classifier(
        model,
        train,
        test,
        steps=config["steps"],
        batch_size=config["batch_size"],
        lr=config["lr"],
        optimizer=config["optimizer"],
        eval_every=config["eval_every"],
        seed=config["seed"],
        probe_x=test.x[: config["probe_size"]],
        probe_unit=config["probe_unit"],
    )
    final = _final_record(records)
    if config["bn"]:
        final.update(
            _algorithm2_accuracies(
                model, train, test, config, estimate_population_statistics, fold_batchnorm
            )
        )
    for rec in records:
        report(rec)
    report(final)


def _final_record(records: list[dict]) -> dict:
    best = max(records, key=lambda r: r["test_acc"])
    return {
        "final": True,
        "step": records[-1]["step"],
        "test_acc": records[-1]["test_acc"],
        "best_acc": best["test_acc"],
        "best_step": best["step"],
        "train_s": records[-1]["wall_s"],
    }


def _algorithm2_accuracies(model, train, test, config, estimate, fold) -> dict:
    """Accuracy with moving averages (as trained), with Algorithm 2's population statistics over
    ``population_batches`` training minibatches, and with BN folded into affine maps."""
    moving = accuracy(model, test)
    sampler = MinibatchSampler(len(train), config["batch_size"], config["seed"] + 10_000)
    estimate(model, (train.x[sampler.next()] for _ in range(config["population_batches"])))
    population = accuracy(model, test)
    folded = fold(model)
    with torch.no_grad():
        same = float((folded(test.x).argmax(1) == model.eval()(test.x).argmax(1)).float().mean())
    return {
        "acc_moving_average": moving,
        "acc_population": population,
        "acc_folded": accuracy(folded, test),
        "folded_same_prediction_frac": same,
    }


def load_cifar_arrays(
    root: str, image_px: int, max_train: int = 0, max_test: int = 0
) -> tuple[Arrays, Arrays]:
    """CIFAR-10 binary batches as float (N, 3, S, S) normalised per channel by the training mean
    and std (S = ``image_px``, area-resized from 32)."""
    from data.cifar import read_cifar10

    out = []
    for split, limit in (("train", max_train), ("test", max_test)):
        x, y = read_cifar10(root, split)
        if limit:
            x, y = x[:limit], y[:limit]
        t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, 32, 32)
        if image_px != t.shape[-1]:
            t = F.interpolate(t, size=(image_px, image_px), mode="area")
        out.append(Arrays(t, torch.from_numpy(y.astype(np.int64))))
    mean = out[0].x.mean(dim=(0, 2, 3), keepdim=True)
    std = out[0].x.std(dim=(0, 2, 3), keepdim=True)
    return tuple(Arrays((a.x - mean) / std, a.y) for a in out)


def variant_trial(config: dict, report: Callable[[dict], None]) -> None:
    """§4.2: one Figure 3 row (``config["settings"][variant]``) for one seed on a CIFAR-format set."""
    from stages.models.bn_nets import SmallInception

    s = config["settings"][config["variant"]]
    device = trial_device()
    train, test = load_cifar_arrays(
        config["cifar_root"], config["image_px"], config["max_train"], config["max_test"]
    )
    train, test = train.to(device), test.to(device)
    torch.manual_seed(config["seed"])
    model = SmallInception(
        width=config["width"],
        bn=s["bn"],
        activation=s["activation"],
        dropout=s["dropout"],
        lrn=s["lrn"],
    ).to(device)
    records = train_classifier(
        model,
        train,
        test,
        steps=config["steps"],
        batch_size=config["batch_size"],
        lr=s["lr"],
        momentum=config["momentum"],
        weight_decay=s["weight_decay"],
        lr_decay_rate=config["lr_decay_rate"],
        lr_decay_steps=s["lr_decay_steps"],
        eval_every=config["eval_every"],
        seed=config["seed"],
        on_record=report,
        shuffle=s["shuffle"],
        distortion=s["distortion"],
    )
    report(_final_record(records))


def batch_size_trial(config: dict, report: Callable[[dict], None]) -> None:
    """The §4.1 network at minibatch size m = ``batch_size``, with or without BN, for ``steps`` steps
    (budget "steps") or ``steps · ref_batch / m`` steps (budget "examples"). The final record
    adds, for BN, the accuracy when test minibatches of m are normalised by their own statistics
    (train mode) beside inference-mode accuracy (moving averages, and Algorithm 2's statistics)."""
    from stages.models.batchnorm import estimate_population_statistics
    from stages.models.bn_nets import MnistMLP

    device = trial_device()
    train, test = (a.to(device) for a in load_npz_arrays(config["data_path"]))
    m = config["batch_size"]
    # budget "examples": as many examples as ``steps`` minibatches of ``ref_batch`` (same data seen)
    scale = config["ref_batch"] / m if config["budget"] == "examples" else 1.0
    steps = max(1, round(config["steps"] * scale))
    eval_every = max(1, round(config["eval_every"] * scale))
    torch.manual_seed(config["seed"])
    model = MnistMLP(
        bn=config["bn"],
        hidden=tuple(config["hidden"]),
        init_std=config["init_std"],
        bn_kind=config["bn_kind"],
    ).to(device)
    records = train_classifier(
        model, train, test, steps=steps, batch_size=m, lr=config["lr"],
        eval_every=eval_every, seed=config["seed"], on_record=report,
    )  # fmt: skip
    final = _final_record(records)
    if config["bn"]:
        final["acc_batch_stats"] = accuracy(model, test, batch_size=m, batch_statistics=True)
        final["acc_moving_average"] = final["test_acc"]
        sampler = MinibatchSampler(len(train), m, config["seed"] + 10_000)
        estimate_population_statistics(model, (train.x[sampler.next()] for _ in range(100)))
        final["acc_population"] = accuracy(model, test)
    report(final)
