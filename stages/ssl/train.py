"""The training loop of Ren, Yeh & Schwing 2020 (REFERENCE §5): FixMatch inner steps with per-example
weights λ, influence-function outer steps, and the baselines, as ``train_fn(ctx, config)``.

Methods (one per run):

- ``learned``: λ_u per unlabeled example, updated every ``inner_steps`` iterations by the masked Adam
  on the last-layer influence hypergradient (``stages.ssl.influence``);
- ``uniform``: λ_u = 1, plain FixMatch; ``scalar``: λ_u = one constant (tuned on validation data);
- ``mcdropout``: λ_u = MC-dropout confidence of u's pseudo-label (the reviewers' simpler alternative);
- ``supervised``: the labelled loss only.

The same function runs in-process or under Ray Train with N workers (``ctx.world_size``): DDP
averages θ's gradients; each worker draws its own slice of the unlabeled batch, and the λ update is
all-reduced (a dense sum of per-example hypergradients and of visit counts), so every worker applies
the same masked-Adam step and λ stays identical everywhere.

A run is long (FixMatch: 2^20 steps), so it can checkpoint every ``checkpoint_every`` steps: θ, the
EMA model, the optimizer and schedule, λ with its Adam moments, the statistics so far, torch's RNG
and the step number. Every other draw is a function of ``(seed, rank, step)``, so a run resumed
from a checkpoint ends bit for bit where the uninterrupted run ends (on CPU;
``tests/stages/test_fixmatch.py``).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from stages.models.registry import create
from stages.ssl.augment import strong_augment, weak_augment
from stages.ssl.fixmatch import (
    ema_model,
    fixmatch_loss,
    mc_dropout_confidence,
    pseudo_labels,
    update_ema,
)
from stages.ssl.influence import MaskedAdam, weight_hypergradients

METHODS = ("learned", "uniform", "scalar", "mcdropout", "supervised")


@dataclass(frozen=True)
class TrainSettings:
    """One run's hyper-parameters; defaults are the paper's CIFAR-10 setting (REFERENCE §5)."""

    method: str = "learned"
    model: str = "wrn_28_2"
    model_kwargs: tuple = ()  # extra constructor arguments as (name, value) pairs
    steps: int = 2**20  # FixMatch: 2^20 iterations
    batch_size: int = 64  # labelled, global (split over workers)
    mu: int = 7  # unlabeled batch = mu · batch_size
    lr: float = 0.03  # SGD, Nesterov momentum 0.9, cosine decay cos(7πk/16K)
    momentum: float = 0.9
    weight_decay: float = 5e-4  # CIFAR-10; not applied to biases and BN (FixMatch)
    threshold: float = 0.95  # pseudo-label confidence τ
    unlabeled_coef: float = 1.0  # FixMatch's λ_U in front of the unlabeled mean
    ema_decay: float = 0.999
    inner_steps: int = 512  # θ steps between λ updates (paper's runs)
    outer_lr: float = 0.01  # masked Adam on λ, β = (0.9, 0.999), λ ∈ [0, 2]
    damping: float = 0.0  # added to the L2 term (wd) on the last-layer Hessian's diagonal
    val_batch: int = 0  # validation examples per outer step; 0 = the whole validation split
    scalar_weight: float = 1.0  # method=scalar
    mc_samples: int = 8  # method=mcdropout: dropout masks on the head
    mc_dropout: float = 0.5
    flip: bool = True  # weak augmentation: horizontal flip (off for digits)
    translate_frac: float = 0.125
    ra_ops: int = 2  # RandAugment: ops per image, magnitude bins
    ra_bins: int = 10
    cutout_frac: float = 0.5
    eval_every: int = 1024  # evaluations of the EMA model; the metric is the median of the last k
    last_k: int = 20
    lambda_snapshots: int = 5  # copies of λ kept over training, for histograms

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")


def split_pool(
    labels: np.ndarray, labels_per_class: int, val_per_class: int, seed: int, val_seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices ``(labelled, validation, unlabeled)`` into a training pool with ``labels (N,)``.

    The labelled validation split (``val_per_class`` per class, REFERENCE §5: 1000 held-out
    training images) depends only on ``val_seed``, so every seed and label count is tuned against
    the same examples; the labelled set (``labels_per_class`` per class) depends on ``seed``; the
    unlabeled set is the whole pool minus validation (labelled examples included, as in FixMatch).
    """
    classes = np.unique(labels)
    rng_val, rng = np.random.default_rng([val_seed, 7]), np.random.default_rng([seed, 11])
    val, lab = [], []
    for c in classes:
        members = rng_val.permutation(np.flatnonzero(labels == c))
        if len(members) < val_per_class + labels_per_class:
            raise ValueError(
                f"class {c}: {len(members)} examples < {val_per_class} validation + "
                f"{labels_per_class} labelled"
            )
        val.append(members[:val_per_class])
        lab.append(rng.permutation(members[val_per_class:])[:labels_per_class])
    val_idx, lab_idx = np.sort(np.concatenate(val)), np.sort(np.concatenate(lab))
    return lab_idx, val_idx, np.setdiff1d(np.arange(len(labels)), val_idx)


def confident_updates(
    indices: torch.Tensor, grads: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(indices, grads)`` of the examples whose pseudo-label passed the confidence mask.
    A masked-out example's λ multiplies nothing in the loss (its hypergradient is exactly 0), so it
    is not an Adam step: stepping it would advance its count and decay its moments, and move λ
    by the old momentum (issue 21)."""
    keep = torch.as_tensor(mask).reshape(-1) > 0
    return indices[keep], grads[keep]


def _mean_over_workers(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def allreduce_weight_grads(
    num: int, indices: torch.Tensor, grads: torch.Tensor, world_size: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every worker's ``(indices, ∂L_V/∂λ)`` summed into one update, identical on all workers."""
    dense = torch.zeros(2, num, device=device)  # (grad sums, visit counts)
    dense[0].index_add_(0, indices.to(device), grads.to(device))
    dense[1].index_add_(0, indices.to(device), torch.ones(len(indices), device=device))
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(dense)
    dense = dense.cpu()
    idx = torch.nonzero(dense[1]).flatten()
    return idx, dense[0, idx]


def _normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255 - mean) / std  # (B, C, H, W)


@torch.no_grad()
def evaluate(model, images, labels, mean, std, device, batch: int = 512) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on uint8 ``images (N, C, H, W)``."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        x = _normalize(images[i : i + batch].to(device), mean, std)
        correct += (model(x).argmax(1).cpu() == labels[i : i + batch]).sum().item()
    return correct / max(len(images), 1)


def train_run(
    ctx,
    data: dict,
    s: TrainSettings,
    *,
    labels_per_class: int,
    val_per_class: int,
    seed: int,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[dict], None] | None = None,
    resume: dict | None = None,
) -> dict:
    """One SSL run; ``data`` holds uint8 ``train_images (N, C, H, W)``, ``train_labels (N,)`` and
    the test split likewise. Returns a row of results plus curves and λ snapshots.

    Every ``checkpoint_every`` steps (0: never) ``on_checkpoint(state)`` receives the run's whole
    state, a detached copy; ``resume=state`` continues the run from it. Every worker calls
    ``on_checkpoint`` at the same steps (Ray Train's report is collective)."""
    started = time.perf_counter()
    world, rank, device = ctx.world_size, ctx.rank, ctx.device
    images, labels = torch.as_tensor(data["train_images"]), torch.as_tensor(data["train_labels"])
    lab, val, unl = split_pool(labels.numpy(), labels_per_class, val_per_class, seed)
    b, bu = s.batch_size // world, s.mu * s.batch_size // world
    if s.batch_size % world or (s.mu * s.batch_size) % world:
        raise ValueError(f"batch_size {s.batch_size} (and mu·batch) must divide by {world} workers")
    if s.method != "supervised" and bu * world > len(unl):
        raise ValueError(f"unlabeled batch {bu * world} exceeds the {len(unl)} unlabeled examples")
    num_classes, channels = int(labels.max()) + 1, images.shape[1]
    mean = images[unl].float().mean((0, 2, 3)).div(255).view(1, -1, 1, 1).to(device)
    std = images[unl].float().div(255).std((0, 2, 3)).view(1, -1, 1, 1).to(device)

    torch.manual_seed(seed)
    net = create(s.model, num_classes=num_classes, in_channels=channels, **dict(s.model_kwargs))
    model = ctx.prepare_model(net)
    net = getattr(model, "module", model)
    ema = ema_model(net, s.ema_decay)
    captured = {}  # the last layer's input of the latest forward (registered after the EMA copy)
    net.head.register_forward_hook(lambda _m, inp, _o: captured.__setitem__("h", inp[0]))
    decay = [p for p in net.parameters() if p.ndim > 1]  # no decay on biases and BN (FixMatch)
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [
            {"params": decay, "weight_decay": s.weight_decay},
            {"params": no_decay, "weight_decay": 0},
        ],
        lr=s.lr,
        momentum=s.momentum,
        nesterov=True,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: math.cos(7 * math.pi * k / (16 * s.steps))
    )
    lam = MaskedAdam(len(unl), lr=s.outer_lr)
    stats = RunStats(labels[unl])
    val_x, val_y = images[val], labels[val]
    test_x, test_y = torch.as_tensor(data["test_images"]), torch.as_tensor(data["test_labels"])
    snap_at = set(np.linspace(0, s.steps, s.lambda_snapshots).round().astype(int).tolist())
    aug = dict(flip=s.flip, translate_frac=s.translate_frac)
    strong = dict(aug, num_ops=s.ra_ops, magnitude_bins=s.ra_bins, cutout_frac=s.cutout_frac)
    uses_unlabeled = s.method != "supervised"
    parts = dict(model=net, ema=ema, optimizer=opt, scheduler=sched, weights=lam, stats=stats)
    start, earlier_s = 0, 0.0
    if resume is not None:
        for name, part in parts.items():
            part.load_state_dict(resume[name])
        torch.set_rng_state(resume["torch_rng"])
        start, earlier_s = int(resume["step"]), float(resume["elapsed_s"])

    for step in range(start, s.steps):
        if step in snap_at and s.method == "learned":
            stats.snapshots.append({"step": step, "weights": lam.weights.clone()})
        t0 = time.perf_counter()
        rng = np.random.default_rng([seed, rank, step])  # this step's draws, and only these
        li = torch.as_tensor(rng.choice(lab, b, replace=b > len(lab)))
        x_parts = [weak_augment(images[li], int(rng.integers(2**62)), **aug)]
        if uses_unlabeled:  # unlabeled: one permutation per epoch shared by all ranks, sliced
            per_epoch = len(unl) // (bu * world)
            perm = np.random.default_rng([seed, 3, step // per_epoch]).permutation(len(unl))
            pos = (step % per_epoch) * bu * world + rank * bu
            ui = torch.as_tensor(perm[pos : pos + bu])  # (bu,) positions in the unlabeled set
            ux = images[unl[ui.numpy()]]
            x_parts.append(weak_augment(ux, int(rng.integers(2**62)), **aug))
            x_parts.append(strong_augment(ux, int(rng.integers(2**62)), **strong))
        model.train()
        x = _normalize(torch.cat(x_parts).to(device), mean, std)  # (b + 2·bu, C, H, W)
        logits = model(x)  # one forward for all views, as FixMatch (shared BN statistics)
        y = labels[li].to(device)
        if not uses_unlabeled:
            loss = F.cross_entropy(logits, y)
        else:
            feats = captured["h"].detach()  # (b + 2·bu, D): the last layer's inputs
            pl = pseudo_labels(logits[b : b + bu], s.threshold)
            if s.method in ("uniform", "scalar"):
                w = torch.full((bu,), 1.0 if s.method == "uniform" else s.scalar_weight)
            elif s.method == "mcdropout":
                w = mc_dropout_confidence(
                    feats[b : b + bu], net.head, pl.targets, samples=s.mc_samples,
                    p=s.mc_dropout, seed=int(rng.integers(2**62)),
                ).cpu()  # fmt: skip
            else:
                if step % s.inner_steps == 0:  # outer step, at the current θ
                    t1 = time.perf_counter()
                    vi = np.arange(len(val_y))
                    if s.val_batch:
                        vi = rng.choice(len(val_y), min(s.val_batch, len(val_y)), replace=False)
                    val_f, val_p = _eval_features(net, _normalize(val_x[vi].to(device), mean, std))
                    probs = torch.softmax(logits.detach(), 1)
                    # wd damps the whole last layer, biases too ("the L2 term acts as damping")
                    hyper = weight_hypergradients(
                        labeled_features=feats[:b], labeled_probs=probs[:b],
                        unlabeled_features=feats[b + bu :], unlabeled_probs=probs[b + bu :],
                        pseudo_targets=pl.targets, mask=pl.mask, weights=lam.weights[ui].to(device),
                        val_features=val_f, val_probs=val_p, val_targets=val_y[vi].to(device),
                        unlabeled_coef=s.unlabeled_coef, l2=s.weight_decay, damping=s.damping,
                        num_unlabeled_total=bu * world,
                        reduce_hessian=_mean_over_workers if world > 1 else None,
                    )  # fmt: skip
                    lam.step(*allreduce_weight_grads(
                        len(unl), *confident_updates(ui, hyper.cpu(), pl.mask.cpu()), world, device
                    ))  # fmt: skip
                    stats.outer_s.append(time.perf_counter() - t1)
                    t0 += stats.outer_s[-1]  # the inner-step clock excludes the outer step
                w = lam.weights[ui].clone()
            loss, _, _ = fixmatch_loss(
                logits[:b], y, logits[b + bu :], pl, w.to(device), s.unlabeled_coef
            )
            stats.visit(ui, w, pl)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        update_ema(ema, net)
        stats.inner_total_s += time.perf_counter() - t0
        stats.inner_steps += 1
        if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
            stats.curve.append(
                {
                    "step": step + 1,
                    "loss": loss.item(),
                    "test_accuracy": evaluate(ema, test_x, test_y, mean, std, device),
                    "val_accuracy": evaluate(ema, val_x, val_y, mean, std, device),
                }
            )
        last = step + 1 == s.steps  # a finished run is reported by the caller
        if on_checkpoint and checkpoint_every and (step + 1) % checkpoint_every == 0 and not last:
            state = {name: part.state_dict() for name, part in parts.items()}
            state.update(step=step + 1, torch_rng=torch.get_rng_state())
            state["elapsed_s"] = earlier_s + time.perf_counter() - started
            on_checkpoint(copy.deepcopy(state))  # a copy: training goes on mutating the tensors
    if s.method == "learned":
        stats.snapshots.append({"step": s.steps, "weights": lam.weights.clone()})
    spread = _rank_spread(lam.weights, device) if world > 1 and s.method == "learned" else 0.0
    return {
        "method": s.method,
        "labels_per_class": labels_per_class,
        "seed": seed,
        "scalar_weight": s.scalar_weight if s.method == "scalar" else float("nan"),
        "workers": world,
        "steps": s.steps,
        "lambda_rank_spread": spread,  # max |λ_rank − λ_rank'|: 0 when λ stays consistent
        **stats.summary(s.last_k),
        "wall_s": earlier_s + time.perf_counter() - started,
    }


@torch.no_grad()
def _eval_features(net, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features and softmax of validation images in eval mode: no BN statistics move
    and no torch RNG is drawn, so λ's lr = 0 leaves training bit-identical to FixMatch."""
    was_training = net.training
    net.eval()
    feats = net.features(x)  # (V, D)
    probs = torch.softmax(net.head(feats), 1)  # (V, K)
    net.train(was_training)
    return feats, probs


def _rank_spread(weights: torch.Tensor, device) -> float:
    import torch.distributed as dist

    hi, lo = weights.to(device), weights.to(device).clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float((hi - lo).abs().max())


class RunStats:
    """What a run records besides accuracy: per-example weights and pseudo-labels at each
    example's last visit, mask rate, pseudo-label accuracy, step timings, λ snapshots."""

    def __init__(self, true_labels: torch.Tensor):
        n = len(true_labels)
        self.true_labels = true_labels  # (U,) of the unlabeled set, for analysis only
        self.last_weight = torch.full((n,), float("nan"))
        self.last_pl, self.last_mask = torch.full((n,), -1), torch.zeros(n)
        self.masked = self.seen = self.pl_right = 0
        self.inner_total_s, self.inner_steps = 0.0, 0  # a sum, not 2^20 floats per checkpoint
        self.outer_s: list[float] = []
        self.curve: list[dict] = []
        self.snapshots: list[dict] = []

    _STATE = ("last_weight", "last_pl", "last_mask", "masked", "seen", "pl_right")
    _STATE += ("inner_total_s", "inner_steps", "outer_s", "curve", "snapshots")

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in self._STATE}

    def load_state_dict(self, state: dict) -> None:
        for k in self._STATE:
            setattr(self, k, copy.deepcopy(state[k]))

    def visit(self, ui: torch.Tensor, weights: torch.Tensor, pl) -> None:
        mask, targets = pl.mask.cpu(), pl.targets.cpu()
        self.last_weight[ui], self.last_pl[ui], self.last_mask[ui] = weights, targets, mask
        self.masked += int(mask.sum())
        self.pl_right += int((mask * (targets == self.true_labels[ui])).sum())
        self.seen += len(ui)

    def summary(self, last_k: int) -> dict:
        tail = self.curve[-last_k:]
        visited = ~torch.isnan(self.last_weight)
        confident = visited & (self.last_mask > 0)
        correct = (self.last_pl == self.true_labels).float()
        w = self.last_weight[confident]
        inner = self.inner_total_s / max(self.inner_steps, 1)
        outer = float(np.mean(self.outer_s)) if self.outer_s else float("nan")
        return {
            "accuracy": float(np.median([c["test_accuracy"] for c in tail])),  # paper's metric
            "val_accuracy": float(np.median([c["val_accuracy"] for c in tail])),
            "final_accuracy": self.curve[-1]["test_accuracy"],
            "mask_rate": self.masked / max(self.seen, 1),
            "pseudo_label_accuracy": self.pl_right / max(self.masked, 1),  # of confident ones
            "lambda_mean": float(w.mean()) if len(w) else float("nan"),
            "lambda_std": float(w.std()) if len(w) > 1 else float("nan"),
            # weight vs "pseudo-label correct", where the weight counted (confident at last visit)
            "lambda_pl_corr": _corr(self.last_weight[confident], correct[confident]),
            "inner_step_s": inner,
            "outer_step_s": outer,
            "outer_steps": len(self.outer_s),
            "outer_cost_ratio": outer / inner,
            "curve": self.curve,
            "lambda_snapshots": self.snapshots,
            "last_weight": self.last_weight,  # (U,) NaN where never visited
            "last_pseudo_correct": torch.where(confident, correct, torch.nan),  # (U,)
        }


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def ssl_train_fn(ctx, config: dict) -> None:
    """``train_fn`` for ``ctx.train``: runs ``config["runs"]`` (``labels_per_class``, ``seed``) in
    turn with ``TrainSettings(**config["settings"])`` on the arrays in ``config["data_path"]``
    (an ``.npz``). Reports after each run with the cumulative results as the checkpoint, and every
    ``config["checkpoint_every"]`` steps (0: only after runs) with the current run's state too; a
    new attempt (a restarted worker group, or a rerun of the step) skips the finished runs and
    resumes the current one from its last state."""
    settings = TrainSettings(**config["settings"])
    every = int(config.get("checkpoint_every", 0))
    with np.load(config["data_path"]) as f:
        data = {k: f[k] for k in f.files}
    last = ctx.load_checkpoint() or {}
    results = list(last.get("results", []))
    partial = last.get("partial")
    for i, run in enumerate(config["runs"]):
        if i < len(results):
            continue
        resume = None
        if partial is not None:
            if partial["run"] != run:
                raise ValueError(
                    f"checkpoint holds run {partial['run']} at step {partial['state']['step']}, "
                    f"but run {i} of this job is {run}: a checkpoint of another job?"
                )
            resume, partial = partial["state"], None

        def save(state: dict, run: dict = run, i: int = i) -> None:
            progress = {"runs_done": len(results), "run_step": state["step"], "run_index": i}
            ctx.report(
                progress, checkpoint={"results": results, "partial": {"run": run, "state": state}}
            )

        row = train_run(
            ctx, data, settings, val_per_class=config["val_per_class"], **run,
            checkpoint_every=every, on_checkpoint=save, resume=resume,
        )  # fmt: skip
        results.append(row)
        metrics = {k: v for k, v in row.items() if isinstance(v, int | float | str)}
        ctx.report({**metrics, "runs_done": len(results)}, checkpoint={"results": results})
