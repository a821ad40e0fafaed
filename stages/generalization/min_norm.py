"""Minimum-norm interpolation with kernels, Zhang et al. 2017 §5.

SGD on a linear model ``y = Xw`` started from zero keeps ``w`` in the span of the data,
``w = Xᵀα``; if it interpolates, ``XXᵀα = y``. With a kernel ``K`` the same holds for ``Kα = y``,
and the interpolant found is the one of minimum RKHS norm ``‖f‖ = sqrt(αᵀKα)``. §5 solves these
systems exactly (MNIST: 1.2% test error on raw pixels) and observes that the norm alone does not
predict generalisation. Here we also watch the norm grow with label corruption p.

Labels are one-hot targets ``Y`` (n, K); a prediction is the argmax of ``K(test, train) α``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    out = np.zeros((len(labels), num_classes))
    out[np.arange(len(labels)), labels] = 1.0
    return out


def sq_distances(x: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (N, M) between rows of x (N, d) and z (M, d), clipped at 0."""
    d = (x * x).sum(1)[:, None] + (z * z).sum(1)[None, :] - 2.0 * x @ z.T
    return np.maximum(d, 0.0)


def median_gamma(x: np.ndarray, max_points: int = 1000) -> float:
    """Gaussian-kernel width by the median heuristic: γ = 1 / median ‖x_i − x_j‖²."""
    sub = x[:max_points]
    d = sq_distances(sub, sub)[np.triu_indices(len(sub), 1)]
    return 1.0 / float(np.median(d[d > 0]))


def kernel(x: np.ndarray, z: np.ndarray, kind: str, gamma: float = 1.0) -> np.ndarray:
    """``K(x, z)``: ``"linear"`` ⟨x, z⟩, or ``"gaussian"`` exp(−γ‖x − z‖²)."""
    x, z = np.asarray(x, np.float64), np.asarray(z, np.float64)
    if kind == "linear":
        return x @ z.T
    if kind == "gaussian":
        return np.exp(-gamma * sq_distances(x, z))
    raise ValueError(f"unknown kernel {kind!r}; valid: linear, gaussian")


def random_relu_features(x: np.ndarray, num_features: int, seed: int = 0) -> np.ndarray:
    """φ(x) = max(Wx, 0)/sqrt(D) with Gaussian W (D, d): a random-feature map whose linear kernel
    ΦΦᵀ interpolates once D ≥ n (the optional "random features" row of §5)."""
    x = np.asarray(x, np.float64)
    w = np.random.default_rng(seed).standard_normal((x.shape[1], num_features)) / np.sqrt(
        x.shape[1]
    )
    return np.maximum(x @ w, 0.0) / np.sqrt(num_features)


@dataclass(frozen=True)
class Interpolant:
    alpha: np.ndarray  # (n,) or (n, K)
    method: str  # "cholesky" (K positive definite) or "pinv" (minimum-norm least squares)
    max_residual: float  # max |Kα − y|: ~0 when the system was solved exactly
    norm: float  # sqrt(trace(αᵀKα)): RKHS norm of the interpolant (Frobenius over outputs)


def solve_min_norm(k: np.ndarray, y: np.ndarray) -> Interpolant:
    """Solve ``Kα = y`` for a symmetric PSD ``K`` (n, n).

    A Cholesky solve when K is numerically positive definite; otherwise the minimum-norm
    least-squares solution ``pinv(K) y`` (from an eigendecomposition). Either way α is the one that
    plain gradient descent from α = 0 converges to. No explicit inverse is formed.
    """
    k = np.asarray(k, np.float64)
    y = np.asarray(y, np.float64)
    method = "cholesky"
    try:
        alpha = scipy.linalg.solve(k, y, assume_a="pos")
        # a "successful" Cholesky of a nearly singular K can still miss y badly
        exact = np.all(np.isfinite(alpha)) and np.max(np.abs(k @ alpha - y)) <= 1e-6 * max(
            1.0, float(np.abs(y).max())
        )
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        exact = False
    if not exact:
        alpha, method = psd_pinv_solve(k, y), "pinv"
    residual = float(np.max(np.abs(k @ alpha - y)))
    norm = float(np.sqrt(max(np.trace(np.atleast_2d(alpha.T @ k @ alpha)), 0.0)))
    return Interpolant(alpha=alpha, method=method, max_residual=residual, norm=norm)


def psd_pinv_solve(k: np.ndarray, y: np.ndarray, rcond: float = 1e-10) -> np.ndarray:
    """``pinv(K) y`` for symmetric PSD ``K``: eigenvalues below ``rcond · λ_max`` count as zero
    (the data's span; rank-deficient K such as XXᵀ with n > d)."""
    lam, v = scipy.linalg.eigh(k)
    keep = lam > rcond * max(float(lam.max()), 0.0)
    return v[:, keep] @ ((v[:, keep].T @ y) / (lam[keep][:, None] if y.ndim == 2 else lam[keep]))


def min_norm_weights(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The minimum-norm linear interpolant in weight space, ``w = Xᵀα`` with ``XXᵀα = y``
    (equals ``pinv(X) y``; tests check this)."""
    x = np.asarray(x, np.float64)
    return x.T @ solve_min_norm(x @ x.T, y).alpha


def fit_and_test(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    kind: str,
    num_classes: int,
    gamma: float | None = None,
    num_features: int = 0,
    seed: int = 0,
) -> dict:
    """Interpolate one-hot ``train_y`` with kernel ``kind`` and score the test set.

    ``kind``: ``"linear"`` (raw inputs), ``"gaussian"`` (γ by the median heuristic unless given)
    or ``"random_features"`` (linear kernel on ``num_features`` random ReLU features, default 2n).
    Inputs are flattened rows (n, d). Returns test and train error (train 0 when interpolating),
    the norm, the residual, the solve method and the γ used.
    """
    train_x = np.asarray(train_x, np.float64)
    test_x = np.asarray(test_x, np.float64)
    base = kind
    if kind == "random_features":
        both = random_relu_features(
            np.concatenate([train_x, test_x]), num_features or 2 * len(train_x), seed
        )
        train_x, test_x, base = both[: len(train_x)], both[len(train_x) :], "linear"
    if base == "gaussian" and gamma is None:
        gamma = median_gamma(train_x)
    k = kernel(train_x, train_x, base, gamma or 1.0)
    fit = solve_min_norm(k, one_hot(train_y, num_classes))
    train_pred = (k @ fit.alpha).argmax(1)
    test_pred = (kernel(test_x, train_x, base, gamma or 1.0) @ fit.alpha).argmax(1)
    return {
        "kernel": kind,
        "gamma": float(gamma or 0.0),
        "method": fit.method,
        "max_residual": fit.max_residual,
        "norm": fit.norm,
        "train_error": float(np.mean(train_pred != train_y)),
        "test_error": float(np.mean(test_pred != test_y)),
    }


def corruption_curve(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    kernels: tuple[str, ...],
    ps: tuple[float, ...],
    num_classes: int,
    seed: int = 0,
) -> list[dict]:
    """``fit_and_test`` for every kernel and label-corruption level p (test labels stay true).
    The Gaussian width is fixed from the clean inputs so only the labels change along p."""
    from stages.generalization.randomize import corrupt_labels

    gamma = median_gamma(np.asarray(train_x, np.float64))
    rows = []
    for p in ps:
        y = corrupt_labels(train_y, p, num_classes, (seed, round(p * 1000)))
        for kind in kernels:
            row = fit_and_test(
                train_x, y, test_x, test_y, kind=kind, num_classes=num_classes,
                gamma=gamma if kind == "gaussian" else None, seed=seed,
            )  # fmt: skip
            rows.append({"p": float(p), "labels_changed_frac": float(np.mean(y != train_y)), **row})
    return rows
