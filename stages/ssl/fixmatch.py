"""FixMatch's consistency loss with per-example weights (REFERENCE §5; Sohn et al. 2020 §2.2).

For an unlabeled example u: the pseudo-label is the argmax of the prediction on a weak view, taken
without gradient and used only when its probability is ≥ τ = 0.95; the loss is cross-entropy of the
prediction on a strong view against it. Ren et al. weight each term by its own λ_u::

    L = (1/B) Σ_b CE(x_b, y_b)  +  λ_U · (1/μB) Σ_u λ_u · 1[max p_weak(u) ≥ τ] · CE(strong(u), ŷ_u)

(the unlabeled mean runs over the whole unlabeled batch, masked terms included, as in FixMatch).
Uniform λ_u = 1 is plain FixMatch. Evaluation uses an exponential moving average of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


@dataclass
class PseudoLabels:
    targets: torch.Tensor  # (U,) int64: argmax of the weak view's prediction
    confidence: torch.Tensor  # (U,) its probability
    mask: torch.Tensor  # (U,) float 0/1: confidence ≥ threshold


def pseudo_labels(logits_weak: torch.Tensor, threshold: float = 0.95) -> PseudoLabels:
    """Stop-gradient pseudo-labels from weak-view logits ``(U, K)`` (FixMatch eq. 3)."""
    probs = torch.softmax(logits_weak.detach(), dim=1)
    confidence, targets = probs.max(dim=1)
    return PseudoLabels(targets, confidence, (confidence >= threshold).to(probs.dtype))


def unlabeled_losses(logits_strong: torch.Tensor, pl: PseudoLabels) -> torch.Tensor:
    """Per-example ``ℓ_u = mask_u · CE(strong(u), ŷ_u)`` ``(U,)``; λ multiplies these."""
    return pl.mask * F.cross_entropy(logits_strong, pl.targets, reduction="none")


def fixmatch_loss(
    logits_labeled: torch.Tensor,
    targets: torch.Tensor,
    logits_strong: torch.Tensor,
    pl: PseudoLabels,
    weights: torch.Tensor,
    unlabeled_coef: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Total loss, labelled part, weighted unlabeled part; ``weights (U,)`` are the λ_u."""
    loss_s = F.cross_entropy(logits_labeled, targets)
    loss_u = (weights * unlabeled_losses(logits_strong, pl)).mean()
    return loss_s + unlabeled_coef * loss_u, loss_s, loss_u


def ema_model(model: torch.nn.Module, decay: float = 0.999) -> AveragedModel:
    """EMA of the parameters (FixMatch evaluates the EMA model, decay 0.999); see ``update_ema``."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)


@torch.no_grad()
def update_ema(ema: AveragedModel, model: torch.nn.Module) -> None:
    """One EMA step of the parameters; BN running statistics are copied, not averaged, as in
    FixMatch's reference code (averaging them on short runs leaves statistics that match neither
    the early nor the late weights)."""
    ema.update_parameters(model)
    for mine, theirs in zip(ema.module.buffers(), model.buffers(), strict=True):
        mine.copy_(theirs)


def mc_dropout_confidence(
    features: torch.Tensor,
    head: torch.nn.Linear,
    targets: torch.Tensor,
    *,
    samples: int = 8,
    p: float = 0.5,
    seed: int = 0,
) -> torch.Tensor:
    """MC-dropout confidence of each pseudo-label: mean over ``samples`` dropout masks on the
    penultimate ``features (U, D)`` of ``softmax(head(dropped))[ŷ_u]``; returns ``(U,)`` in [0, 1].

    The uncertainty-based weighting the paper's reviewers proposed as a simpler alternative
    (REFERENCE §5). Dropout sits on the head only, so the T passes cost T small matmuls; the masks
    come from their own generator (torch's global generator is not consumed).
    """
    g = torch.Generator(device=features.device).manual_seed(seed)
    keep = (torch.rand((samples, *features.shape), generator=g, device=features.device) >= p).to(
        features.dtype
    )  # (T, U, D)
    with torch.no_grad():
        probs = torch.softmax(head(features.detach()[None] * keep / (1 - p)), dim=-1)  # (T, U, K)
        return probs.mean(0).gather(1, targets[:, None])[:, 0]
