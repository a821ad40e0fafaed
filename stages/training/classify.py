"""Supervised image classification on a CIFAR-10-format set: one training loop for Ray Train and Tune.

``train_classifier(ctx, config)`` is a ``train_fn`` (``stages.training.context``): it runs unchanged
in-process (``LocalTrainContext``), under Ray Train with DDP (the context's ``prepare_model`` /
``prepare_data_loader``) and, through ``tune_trainable``, as a Ray Tune trial that reports once per
epoch (so ASHA can stop it early). Nothing here is specific to one paper: the model comes from the
registry by name with keyword arguments, the optimiser and schedule are config values.

Config keys (``DEFAULTS``; unknown keys are errors):

- data: ``dataset_root`` (a CIFAR-10 binary directory, ``data.cifar.read_cifar10``; or MNIST-format
  IDX files with ``dataset_format="mnist"``, grey images as one channel), ``max_train``
  / ``max_test`` (0 = all: first N images), ``resolution`` (bilinear with antialiasing from 32 px:
  downsized once at load, upsized per batch on the device so a 224-px run does not hold the set at
  224 px in memory), ``augment`` (random translation by up to 1/8 of the side with zero fill +
  horizontal flip, the usual CIFAR augmentation, before any upsizing), ``num_classes``.
- model: ``model`` (registry name) and ``model_kwargs``.
- optimisation: ``optimizer`` ``sgd | rmsprop | adamw``, ``lr``, ``momentum``, ``weight_decay``,
  ``rmsprop_alpha``/``rmsprop_eps`` (PyTorch adds eps *outside* the square root, TF inside: with
  the small mean squares of a trained net both act as a floor on the denominator),
  ``schedule`` ``exponential`` (``lr · lr_decay^epoch``, per epoch) | ``cosine`` (per step, to 0),
  ``warmup_epochs`` (linear, per step), ``label_smoothing``, ``epochs``, ``batch_size`` (the
  *global* batch: each of ``world_size`` workers takes ``batch_size / world_size``).
- bookkeeping: ``seed`` (initialisation, shuffling, augmentation), ``checkpoint`` (report the
  state every epoch so a rerun resumes), ``eval_batch_size``.

Each epoch reports ``{"epoch", "train_loss", "train_accuracy", "accuracy" (test top-1), "lr"}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stages.models.registry import create

DEFAULTS: dict[str, Any] = {
    "dataset_root": "",
    "dataset_format": "cifar10",  # or "mnist": MNIST-format IDX, grey (N, 1, 28, 28)
    "max_train": 0,
    "max_test": 0,
    "resolution": 32,
    "augment": True,
    "num_classes": 10,
    "model": "",
    "model_kwargs": {},
    "optimizer": "sgd",
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "rmsprop_alpha": 0.9,
    "rmsprop_eps": 1.0,
    "schedule": "cosine",
    "lr_decay": 0.98,
    "warmup_epochs": 0.0,
    "label_smoothing": 0.0,
    "epochs": 10,
    "batch_size": 128,
    "eval_batch_size": 500,
    "seed": 0,
    "checkpoint": False,
}


def resolve_config(config: dict) -> dict:
    """``DEFAULTS`` updated by ``config``; unknown keys and bad values are errors."""
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise KeyError(f"unknown training config keys {unknown}; valid: {sorted(DEFAULTS)}")
    cfg = {**DEFAULTS, **config}
    if not cfg["dataset_root"] or not cfg["model"]:
        raise ValueError("training config needs dataset_root and model")
    if cfg["dataset_format"] not in ("cifar10", "mnist"):
        raise ValueError(f"dataset_format must be cifar10|mnist, got {cfg['dataset_format']!r}")
    if cfg["optimizer"] not in ("sgd", "rmsprop", "adamw"):
        raise ValueError(f"optimizer must be sgd|rmsprop|adamw, got {cfg['optimizer']!r}")
    if cfg["schedule"] not in ("exponential", "cosine"):
        raise ValueError(f"schedule must be exponential|cosine, got {cfg['schedule']!r}")
    if cfg["epochs"] < 1 or cfg["batch_size"] < 1 or cfg["resolution"] < 8:
        raise ValueError("need epochs >= 1, batch_size >= 1, resolution >= 8")
    return cfg


def load_split(
    root: str, split: str, resolution: int, max_images: int = 0, dataset_format: str = "cifar10"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``float32 (N, C, S, S)`` in [0, 1] at ``S = min(resolution, native side)``, labels
    ``int64 (N,)``: CIFAR-10 binary (C = 3, 32 px) or MNIST-format IDX (C = 1, 28 px: the grey
    image goes in as one channel, the model's stem takes ``in_channels=1``)."""
    if dataset_format == "mnist":
        from data.mnist import read_mnist

        images, labels = read_mnist(root, split)  # uint8 (N, 28, 28)
        images = images[..., None]  # (N, 28, 28, 1)
    else:
        from data.cifar import read_cifar10

        images, labels = read_cifar10(root, split)  # uint8 (N, 32, 32, 3), int64 (N,)
    if max_images:
        images, labels = images[:max_images], labels[:max_images]
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    if resolution < x.shape[-1]:
        x = resize(x, resolution)
    return x.contiguous(), torch.from_numpy(np.asarray(labels, dtype=np.int64))


def resize(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B, C, resolution, resolution)``, bilinear with antialiasing."""
    if x.shape[-1] == resolution and x.shape[-2] == resolution:
        return x
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True)


def random_crop_flip(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Per-image random ``pad``-pixel translation (zero fill) and horizontal flip of ``(B, C, H, W)``."""
    b, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    cols = torch.where(flip[:, None, None, None], cols.flip(-1), cols)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[bi, ci, rows, cols]


def make_optimizer(model: torch.nn.Module, cfg: dict) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg["optimizer"] == "rmsprop":  # MobileNetV2 §6.1: decay 0.9, momentum 0.9
        return torch.optim.RMSprop(
            params,
            lr=cfg["lr"],
            alpha=cfg["rmsprop_alpha"],
            eps=cfg["rmsprop_eps"],
            momentum=cfg["momentum"],
            weight_decay=cfg["weight_decay"],
        )
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    return torch.optim.SGD(
        params,
        lr=cfg["lr"],
        momentum=cfg["momentum"],
        weight_decay=cfg["weight_decay"],
        nesterov=True,
    )


def learning_rate(cfg: dict, epoch: int, step: int, steps_per_epoch: int) -> float:
    """The rate at ``step`` of ``epoch`` (both 0-based)."""
    t = epoch + step / steps_per_epoch
    warm = cfg["warmup_epochs"]
    if warm > 0 and t < warm:
        return cfg["lr"] * (t + 1 / steps_per_epoch) / warm
    if cfg["schedule"] == "exponential":
        return cfg["lr"] * cfg["lr_decay"] ** epoch
    progress = (t - warm) / max(cfg["epochs"] - warm, 1e-8)
    return cfg["lr"] * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    device,
    batch_size: int = 500,
    resolution: int | None = None,
) -> float:
    """Top-1 accuracy of ``model`` on ``x (N, 3, S, S)`` (resized to ``resolution``), ``y (N,)``."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(device)
        logits = model(resize(xb, resolution) if resolution else xb)
        correct += int((logits.argmax(1).cpu() == y[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / max(len(x), 1)


def train_classifier(ctx, config: dict) -> None:
    """Train ``config["model"]`` on the set at ``config["dataset_root"]``; report every epoch."""
    cfg = resolve_config(config)
    torch.manual_seed(cfg["seed"])
    root, fmt = cfg["dataset_root"], cfg["dataset_format"]
    x_train, y_train = load_split(root, "train", cfg["resolution"], cfg["max_train"], fmt)
    x_test, y_test = load_split(root, "test", cfg["resolution"], cfg["max_test"], fmt)
    model = create(cfg["model"], num_classes=cfg["num_classes"], **cfg["model_kwargs"])
    model = ctx.prepare_model(model)
    optimizer = make_optimizer(model, cfg)
    per_worker = max(1, cfg["batch_size"] // ctx.world_size)
    shuffle = torch.Generator().manual_seed(cfg["seed"])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_train, y_train),
        batch_size=per_worker,
        shuffle=True,
        drop_last=len(x_train) >= per_worker * ctx.world_size,
        generator=shuffle,
    )
    loader = ctx.prepare_data_loader(loader)
    augment_rng = torch.Generator().manual_seed(cfg["seed"] * 1000 + ctx.rank)
    start_epoch = 0
    state = ctx.load_checkpoint()
    if state is not None:  # resume where the last reported epoch ended
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"]) + 1
        augment_rng.manual_seed(cfg["seed"] * 1000 + ctx.rank + start_epoch)
    steps_per_epoch = max(len(loader), 1)
    pad = max(1, x_train.shape[-1] // 8)
    for epoch in range(start_epoch, cfg["epochs"]):
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # DistributedSampler: a new shuffle each epoch
            sampler.set_epoch(epoch)
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        for step, (xb, yb) in enumerate(loader):
            lr = learning_rate(cfg, epoch, step, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            xb, yb = xb.to(ctx.device), yb.to(ctx.device)
            if cfg["augment"]:
                xb = random_crop_flip(xb, pad, augment_rng)
            xb = resize(xb, cfg["resolution"])
            logits = model(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=cfg["label_smoothing"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(yb)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "train_accuracy": correct / max(seen, 1),
            "accuracy": evaluate(
                model, x_test, y_test, ctx.device, cfg["eval_batch_size"], cfg["resolution"]
            ),
            "lr": lr,
        }
        checkpoint = None
        if cfg["checkpoint"] or epoch + 1 == cfg["epochs"]:
            checkpoint = {
                "model": _unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
            }
        ctx.report(metrics, checkpoint=checkpoint if ctx.rank == 0 else None)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel wraps the model


class ReportContext:
    """A one-process ``TrainContext`` whose ``report`` forwards metrics to ``report_fn`` (Tune)."""

    world_size = 1
    rank = 0

    def __init__(self, report_fn: Callable[[dict], None], device: str | None = None):
        self.report_fn = report_fn
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def prepare_model(self, model):
        return model.to(self.device)

    def prepare_data_loader(self, loader):
        return loader

    def report(self, metrics: dict, checkpoint: dict | None = None) -> None:
        self.report_fn(dict(metrics))  # trials keep no checkpoints: a rerun retrains

    def load_checkpoint(self) -> dict | None:
        return None


def tune_trainable(config: dict, report: Callable[[dict], None]) -> None:
    """``trainable(config, report)`` for ``ctx.sweep``: the same loop, one report per epoch."""
    train_classifier(ReportContext(report), config)
