"""The outer step of Ren, Yeh & Schwing 2020 (REFERENCE §5): influence-function hypergradients
for per-example unlabeled weights λ, restricted to the last (linear) layer, and a masked Adam.

The training objective is ``F(θ, λ) = L_S(θ) + Σ_u λ_u ℓ_u(θ) + (wd/2)‖θ‖²`` and the outer objective
``L_V(θ*(λ))`` on labelled validation data. By the implicit-function theorem at an optimum θ*::

    ∂L_V/∂λ_u = −∇_θ L_Vᵀ H⁻¹ ∇_θ ℓ_u,     H = ∇²_θ F(θ*, λ)                       (paper eq. 6)

Approximation (1) of the paper: θ is only the last layer ``logits = W h + b`` with the features h
held fixed. Then everything is closed form. With ``h̃ = [h, 1]`` (bias as a constant feature), the
last-layer parameters are ``Θ = [W | b]`` of shape (K, D+1), flattened row-major to ``K·(D+1)``:

- per-example gradient of a cross-entropy term: ``(p − onehot(y)) ⊗ h̃`` (an outer product);
- per-example Hessian of a cross-entropy term: ``(diag p − p pᵀ) ⊗ h̃ h̃ᵀ`` (does not depend on y);
- the L2 term adds ``wd·I``; a further damping keeps H well-conditioned away from θ*.

H is symmetric positive definite once damped, so ``H⁻¹ g_V`` is one Cholesky solve — no inverse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def with_bias(features: torch.Tensor) -> torch.Tensor:
    """``(N, D)`` features → ``(N, D+1)`` with a trailing column of ones (the bias input)."""
    return torch.cat([features, features.new_ones(len(features), 1)], dim=1)


def flat_last_layer(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``W (K, D)``, ``b (K,)`` → ``Θ`` flattened ``(K·(D+1),)`` in the layout used here."""
    return torch.cat([weight, bias[:, None]], dim=1).reshape(-1)


def per_example_grads(
    features: torch.Tensor, probs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Gradients of ``CE(W h_i + b, y_i)`` w.r.t. ``Θ = [W | b]``, one row per example.

    ``features (N, D)``, ``probs (N, K)`` = softmax of the logits, ``targets (N,)`` int64.
    Returns ``(N, K·(D+1))``: row i is ``(p_i − onehot(y_i)) ⊗ [h_i, 1]`` flattened row-major
    (paper code: outer products of inputs and output gradients).
    """
    delta = probs - F.one_hot(targets, probs.shape[1]).to(probs.dtype)  # (N, K)
    return torch.einsum("nk,nd->nkd", delta, with_bias(features)).reshape(len(features), -1)


def last_layer_hessian(
    features: torch.Tensor, probs: torch.Tensor, weights: torch.Tensor, l2: float
) -> torch.Tensor:
    """Exact Hessian of ``Σ_i w_i CE_i + (l2/2)‖Θ‖²`` w.r.t. the flattened last layer.

    ``features (N, D)``, ``probs (N, K)``, ``weights (N,)`` (e.g. 1/B for a batch mean, λ_u·mask_u/B
    for the unlabeled terms). Returns ``(P, P)`` with ``P = K·(D+1)``:
    ``Σ_i w_i (diag p_i − p_i p_iᵀ) ⊗ h̃_i h̃_iᵀ + l2·I``.
    """
    h = with_bias(features)  # (N, D1)
    k, d1 = probs.shape[1], h.shape[1]
    # (diag p − p pᵀ) ⊗ h̃h̃ᵀ  =  diag-part − rank-one part; both as weighted Gram matrices
    hw = h * weights[:, None]  # (N, D1)
    # diag part: block (a, a) = Σ_i w_i p_ia h̃_i h̃_iᵀ
    diag_blocks = torch.einsum("na,nc,nd->acd", probs, hw, h)  # (K, D1, D1)
    ph = (probs[:, :, None] * h[:, None, :]).reshape(len(h), -1)  # (N, K·D1): p_i ⊗ h̃_i
    hess = -(ph * weights[:, None]).T @ ph  # (P, P): −Σ w (p⊗h̃)(p⊗h̃)ᵀ
    blocks = hess.view(k, d1, k, d1)
    idx = torch.arange(k)
    blocks[idx, :, idx, :] += diag_blocks
    hess.diagonal().add_(l2)
    return hess


def hypergradient(
    val_grad: torch.Tensor, hessian: torch.Tensor, example_grads: torch.Tensor
) -> torch.Tensor:
    """``∂L_V/∂λ_u = −g_Vᵀ H⁻¹ ∇ℓ_u`` for each row of ``example_grads``.

    ``val_grad (P,)`` = ∇_Θ L_V, ``hessian (P, P)`` symmetric positive definite, ``example_grads
    (U, P)`` = ∂F/∂λ_u's gradient (∇_Θ of the λ_u-weighted term). Returns ``(U,)``. H⁻¹ g_V comes
    from a Cholesky solve (H is SPD: a convex last layer plus damping), never an explicit inverse.
    """
    chol, info = torch.linalg.cholesky_ex(hessian)
    if int(info) != 0:  # not positive definite: the caller's damping was too small
        raise ValueError(
            f"last-layer Hessian is not positive definite (leading minor {int(info)}); "
            "increase the damping"
        )
    v = torch.cholesky_solve(val_grad[:, None], chol)[:, 0]  # (P,) = H⁻¹ g_V
    return -(example_grads @ v)


class MaskedAdam:
    """Adam on a vector of per-example weights, stepping only the entries of the current batch.

    Paper approximation (2): only λ of the unlabeled minibatch move; each entry keeps its own
    moments and step count (so bias correction counts that entry's updates), lr 0.01,
    β = (0.9, 0.999); λ starts at 1 and is clipped to ``[low, high] = [0, 2]`` after each step.
    """

    def __init__(
        self,
        num: int,
        *,
        lr: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        init: float = 1.0,
        low: float = 0.0,
        high: float = 2.0,
    ):
        self.lr, self.betas, self.eps, self.low, self.high = lr, betas, eps, low, high
        self.weights = torch.full((num,), float(init), dtype=torch.float32)
        self.exp_avg = torch.zeros(num)
        self.exp_avg_sq = torch.zeros(num)
        self.steps = torch.zeros(num, dtype=torch.int64)

    def step(self, indices: torch.Tensor, grads: torch.Tensor) -> None:
        """Update ``weights[indices]`` with ``grads`` (same length); repeated indices are summed."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        grads = torch.as_tensor(grads, dtype=torch.float32)
        if indices.shape != grads.shape or indices.ndim != 1:
            raise ValueError(f"indices {indices.shape} and grads {grads.shape} must be equal (B,)")
        idx, inverse = torch.unique(indices, return_inverse=True)
        g = torch.zeros(len(idx)).index_add_(0, inverse, grads)
        b1, b2 = self.betas
        self.steps[idx] += 1
        t = self.steps[idx].to(torch.float32)
        m = self.exp_avg[idx].mul_(b1).add_(g, alpha=1 - b1)
        v = self.exp_avg_sq[idx].mul_(b2).addcmul_(g, g, value=1 - b2)
        self.exp_avg[idx], self.exp_avg_sq[idx] = m, v
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        update = self.lr * m_hat / (v_hat.sqrt() + self.eps)
        self.weights[idx] = (self.weights[idx] - update).clamp_(self.low, self.high)

    def state_dict(self) -> dict:
        return {
            "weights": self.weights,
            "exp_avg": self.exp_avg,
            "exp_avg_sq": self.exp_avg_sq,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("weights", "exp_avg", "exp_avg_sq", "steps"):
            getattr(self, key).copy_(state[key])


def weight_hypergradients(
    *,
    labeled_features: torch.Tensor,
    labeled_probs: torch.Tensor,
    unlabeled_features: torch.Tensor,
    unlabeled_probs: torch.Tensor,
    pseudo_targets: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    val_features: torch.Tensor,
    val_probs: torch.Tensor,
    val_targets: torch.Tensor,
    unlabeled_coef: float = 1.0,
    l2: float = 5e-4,
    damping: float = 0.0,
    num_unlabeled_total: int | None = None,
    reduce_hessian=None,
) -> torch.Tensor:
    """``∂L_V/∂λ_u (U,)`` for the FixMatch objective of ``stages.ssl.fixmatch`` on one batch.

    Inputs are the (detached) penultimate features and softmax outputs of the current batch: the
    labelled examples ``(B, D)/(B, K)``, the strong views of the unlabeled ones ``(U, D)/(U, K)``
    with their pseudo-labels, confidence mask and current weights ``(U,)``, and a labelled
    validation batch. The objective ``mean_b CE_b + c·(1/U) Σ_u λ_u m_u CE_u + (l2/2)‖Θ‖²`` gives
    ``H`` (its exact last-layer Hessian on this batch, plus ``damping·I``) and ``∂F/∂λ_u``'s
    gradient ``(c/U) m_u ∇CE_u``. Computed in float64: the solve sees condition numbers ≈ 1/l2.

    Data parallel (W workers, each holding 1/W of the batch): ``num_unlabeled_total`` is the
    global U, so ``∂F/∂λ_u`` carries the global ``c/U`` (with the local size it was W× too large);
    ``reduce_hessian(H) -> H`` averages the workers' local Hessians (each a mean over its own
    examples) into the global batch's. Both default to this batch being the whole batch.
    """
    f64 = torch.float64
    b, u = len(labeled_features), len(unlabeled_features)
    u_total = num_unlabeled_total or u
    term_weights = torch.cat(
        [
            torch.full((b,), 1.0 / b, dtype=f64, device=labeled_features.device),
            (unlabeled_coef / u) * weights.to(f64) * mask.to(f64),
        ]
    )
    hess = last_layer_hessian(
        torch.cat([labeled_features, unlabeled_features]).to(f64),
        torch.cat([labeled_probs, unlabeled_probs]).to(f64),
        term_weights,
        l2 + damping,
    )
    if reduce_hessian is not None:  # the mean of equal-sized shards' means is the global mean
        hess = reduce_hessian(hess)  # (l2 + damping)·I averages to itself
    val_grad = per_example_grads(val_features.to(f64), val_probs.to(f64), val_targets).mean(0)
    example_grads = (
        per_example_grads(unlabeled_features.to(f64), unlabeled_probs.to(f64), pseudo_targets)
        * ((unlabeled_coef / u_total) * mask.to(f64))[:, None]
    )
    return hypergradient(val_grad, hess, example_grads).to(torch.float32)
