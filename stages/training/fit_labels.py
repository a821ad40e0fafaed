"""Train a classifier until it fits its training set, Zhang et al. 2017 §2 and App. A.

SGD with momentum 0.9 and the learning rate decayed by 0.95 per epoch, the same schedule for true
and random labels; stop when the whole training set is classified correctly (or a step budget
runs out). Inputs are preprocessed as App. A: a 28×28 centre crop (a random crop when the random-
crop regulariser is on) and per-image standardisation.

``fit_labels`` records the minibatch loss/accuracy every ``log_every`` steps (Figure 1a), the step
at which the whole training set was fitted (Figure 1b), the final test accuracy (Figure 1c), and
two candidate capacity measures of the final network (§5's question of what grows with label
noise): the ℓ2 norm of the weights and the training margin.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class FitConfig:
    lr: float = 0.01  # App. A: 0.01 for small AlexNet and MLPs, 0.1 for small Inception
    momentum: float = 0.9  # App. A
    lr_decay: float = 0.95  # per epoch, App. A
    batch_size: int = 128
    weight_decay: float = 0.0  # Table 1's "weight decay" column
    random_crop: bool = False  # Table 1's "random crop" column (else the centre crop)
    crop_px: int = 28  # App. A: CIFAR-10 centre-cropped to 28x28
    max_steps: int = 20_000  # budget when the training set is never fitted
    target_train_acc: float = 1.0  # "fitted": full-training-set accuracy at or above this
    log_every: int = 10  # steps between curve points
    eval_every_epochs: int = 10  # full train-set scoring at least this often (and when near 100%)
    seed: int = 0


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Per-image standardisation (TF ``per_image_standardization``): zero mean, unit variance,
    std floored at 1/sqrt(#values) so a constant image stays finite. (B, C, H, W) → same."""
    flat = x.flatten(1)
    std = flat.std(1, unbiased=False).clamp_min(1.0 / math.sqrt(flat.shape[1]))
    return ((flat - flat.mean(1, keepdim=True)) / std[:, None]).view_as(x)


def crop(x: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Centre crop (generator None) or one random crop per image (B, C, H, W) → (B, C, size, size)."""
    _, _, h, w = x.shape
    if size >= h and size >= w:
        return x
    if generator is None:
        top, left = (h - size) // 2, (w - size) // 2
        return x[:, :, top : top + size, left : left + size]
    tops = torch.randint(0, h - size + 1, (len(x),), generator=generator)
    lefts = torch.randint(0, w - size + 1, (len(x),), generator=generator)
    rows = tops[:, None] + torch.arange(size)  # (B, size)
    cols = lefts[:, None] + torch.arange(size)
    idx_b = torch.arange(len(x))[:, None, None]
    return x.permute(0, 2, 3, 1)[idx_b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) uint8/float → float32 (N, C, H, W), unscaled (standardisation follows)."""
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, crop_px: int, batch_size: int = 500) -> torch.Tensor:
    """Logits (N, K) in eval mode on centre crops."""
    model.eval()
    device = next(model.parameters()).device
    out = [
        model(standardize(crop(x[i : i + batch_size], crop_px)).to(device)).float().cpu()
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(out)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, crop_px: int) -> float:
    return float((predict(model, x, crop_px).argmax(1) == y).float().mean())


def weight_l2(model: nn.Module) -> float:
    """ℓ2 norm of every conv/linear weight (biases and BN parameters excluded)."""
    sq = sum(
        float((m.weight.detach() ** 2).sum())
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    )
    return math.sqrt(sq)


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """f_y(x) − max_{j≠y} f_j(x) per example (N,): positive iff classified correctly."""
    true = logits.gather(1, labels[:, None])[:, 0]
    other = logits.scatter(1, labels[:, None], float("-inf")).max(1).values
    return true - other


def fit_labels(
    model: nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    cfg: FitConfig,
    report: Callable[[dict], None] | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """Train ``model`` on (train_x (N, C, H, W) float, train_y (N,) int64) until it fits.

    ``report`` receives a dict per curve point: step, epoch, lr, loss and batch_acc (means over
    the last ``log_every`` steps) and train_acc (the last full-training-set score). Returns the
    summary: steps_to_fit (None if never fitted), final train/test accuracy, steps, epochs,
    wall time, weight norm and margin statistics.
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = model.to(device)
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=cfg.lr_decay)
    n = len(train_x)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    step, epoch, fitted_at = 0, 0, None
    train_acc = 0.0
    window_loss, window_correct, window_seen = 0.0, 0, 0
    epoch_correct = epoch_seen = 0
    t0 = time.time()
    while step < cfg.max_steps and fitted_at is None:
        model.train()
        order = torch.randperm(n, generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            xb = crop(train_x[idx], cfg.crop_px, gen if cfg.random_crop else None)
            xb, yb = standardize(xb).to(device), train_y[idx].to(device)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            window_loss += loss.item() * len(idx)
            window_correct += int((logits.argmax(1) == yb).sum())
            window_seen += len(idx)
            epoch_correct += int((logits.argmax(1) == yb).sum())
            epoch_seen += len(idx)
            if step % cfg.log_every == 0 and report is not None:
                report(
                    {
                        "step": step,
                        "epoch": epoch,
                        "lr": opt.param_groups[0]["lr"],
                        "loss": window_loss / window_seen,
                        "batch_acc": window_correct / window_seen,
                        "train_acc": train_acc,
                    }
                )
            if step % cfg.log_every == 0:
                window_loss, window_correct, window_seen = 0.0, 0, 0
            if step >= cfg.max_steps:
                break
        epoch += 1
        sched.step()  # App. A: lr × 0.95 per epoch
        # The whole training set is re-scored (eval mode, centre crops) only once the epoch's
        # running accuracy is near the target, or every eval_every_epochs: on small sets a full
        # pass per epoch would cost more than the training itself.
        near = epoch_correct / max(epoch_seen, 1) >= cfg.target_train_acc - 0.05
        if near or epoch % cfg.eval_every_epochs == 0:
            train_acc = _accuracy(model, train_x, train_y, cfg.crop_px)
            if train_acc >= cfg.target_train_acc:
                fitted_at = step
        epoch_correct = epoch_seen = 0
    train_acc = _accuracy(model, train_x, train_y, cfg.crop_px)
    test_acc = _accuracy(model, test_x, test_y, cfg.crop_px)
    logits = predict(model, train_x, cfg.crop_px)
    m = margins(logits, train_y)
    return {
        "steps_to_fit": fitted_at,
        "fitted": fitted_at is not None,
        "steps": step,
        "epochs": epoch,
        "train_acc": train_acc,
        "test_acc": test_acc,
        "wall_s": time.time() - t0,
        "weight_l2": weight_l2(model),
        # margins scale with the weights; normalised by the norm they become comparable
        "margin_p10": float(m.quantile(0.1)),
        "margin_median": float(m.median()),
        "final_loss": float(F.cross_entropy(logits, train_y)),
    }


def run_trial(config: dict, report: Callable[[dict], None]) -> None:
    """One sweep trial: load a saved corruption, build a registered model, train it to fit.

    ``config`` keys: clean_dir, variants_dir (artifact paths), variant, seed, model, width,
    dropout, weight_decay, random_crop, num_classes, in_channels, and FitConfig's fields
    (``lr_inception`` replaces ``lr`` for Inception models, App. A). Every curve point is
    reported with ``final=0``; the last report carries the summary with ``final=1``.
    """
    from stages.generalization.randomize import load_variant
    from stages.models import small_nets
    from stages.models.registry import create

    arrays = load_variant(
        config["clean_dir"], config["variants_dir"], config["variant"], config["seed"]
    )
    fields = {f for f in FitConfig.__dataclass_fields__}
    fit = FitConfig(**{k: v for k, v in config.items() if k in fields})
    if config["model"].startswith("small_inception"):
        fit = dataclasses.replace(fit, lr=config["lr_inception"])
    torch.manual_seed(fit.seed)  # the same trial seed gives the same initial weights
    model = create(
        config["model"],
        in_shape=(config["in_channels"], fit.crop_px, fit.crop_px),
        num_classes=config["num_classes"],
        width=config["width"],
        dropout=config["dropout"],
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tx, ty = to_tensor(arrays["train_x"]), torch.from_numpy(arrays["train_y"]).long()
    vx, vy = to_tensor(arrays["test_x"]), torch.from_numpy(arrays["test_y"]).long()
    summary = fit_labels(
        model, tx, ty, vx, vy, fit, report=lambda m: report({**m, "final": 0}), device=device
    )
    steps_to_fit = summary.pop("steps_to_fit")
    report(
        {
            "step": summary["steps"],
            **summary,
            "fitted": int(summary["fitted"]),
            "steps_to_fit": -1 if steps_to_fit is None else steps_to_fit,
            "num_params": small_nets.num_params(model),
            "final": 1,
        }
    )
