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


def kernel(
    x: np.ndarray, z: np.ndarray, kind: str, gamma: float = 1.0, block_rows: int = 2048
) -> np.ndarray:
    """``K(x, z)``: ``"linear"`` ⟨x, z⟩, or ``"gaussian"`` exp(−γ‖x − z‖²). The Gaussian kernel is
    built ``block_rows`` rows at a time into one array: at n = 20,000 the whole-matrix expression
    would hold four n×n temporaries (13 GB) for a 3.2 GB result."""
    x, z = np.asarray(x, np.float64), np.asarray(z, np.float64)
    if kind == "linear":
        return x @ z.T
    if kind != "gaussian":
        raise ValueError(f"unknown kernel {kind!r}; valid: linear, gaussian")
    out = np.empty((len(x), len(z)))
    for i in range(0, len(x), block_rows):
        block = sq_distances(x[i : i + block_rows], z)
        block *= -gamma
        np.exp(block, out=out[i : i + block_rows])
    return out


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
    """What ``fit_and_test`` gives for every kernel and label-corruption level p (test labels
    stay true), one row per (p, kernel) in that order. The Gaussian width is fixed from the clean
    inputs, so only the labels change along p: each kernel matrix is built and factorised once
    and every p is a pair of triangular solves (at n = 20,000 a Cholesky takes about a minute).
    Rows add ``n_train`` and ``seconds`` (kernel + factorisation, shared by the p's, + the
    p's own solve and predictions)."""
    import time

    from stages.generalization.randomize import corrupt_labels

    train_x = np.asarray(train_x, np.float64)
    test_x = np.asarray(test_x, np.float64)
    gamma = median_gamma(train_x)
    labels = [corrupt_labels(train_y, p, num_classes, (seed, round(p * 1000))) for p in ps]
    by_kind = {}
    for kind in kernels:
        t0 = time.perf_counter()
        tr, te, base = train_x, test_x, kind
        if kind == "random_features":
            both = random_relu_features(np.concatenate([train_x, test_x]), 2 * len(train_x), seed)
            tr, te, base = both[: len(train_x)], both[len(train_x) :], "linear"
        g = gamma if base == "gaussian" else 0.0
        k = kernel(tr, tr, base, g or 1.0)
        k_test = kernel(te, tr, base, g or 1.0)
        solve = _factorised_solver(k)
        cond = condition_number(k)
        shared_s = time.perf_counter() - t0
        rows = []
        for p, y in zip(ps, labels, strict=True):
            t1 = time.perf_counter()
            fit = solve(one_hot(y, num_classes))
            row = {
                "kernel": kind,
                "gamma": float(g),
                "method": fit.method,
                "max_residual": fit.max_residual,
                "norm": fit.norm,
                # an "exact" solve of an ill-conditioned K fits noise (issue 21: the linear
                # kernel on rounded, upscaled 8×8 digits reached 1.6e9 at n = 400)
                "condition_number": cond,
                "train_error": float(np.mean((k @ fit.alpha).argmax(1) != y)),
                "test_error": float(np.mean((k_test @ fit.alpha).argmax(1) != test_y)),
            }
            seconds = shared_s + time.perf_counter() - t1
            rows.append({"p": float(p), "labels_changed_frac": float(np.mean(y != train_y)),
                         **row, "n_train": len(train_x), "seconds": seconds})  # fmt: skip
        by_kind[kind] = rows
        del k, k_test
    return [by_kind[kind][i] for i in range(len(ps)) for kind in kernels]


def condition_number(k: np.ndarray, exact_below: int = 4000) -> float:
    """2-norm condition number λ_max / λ_min of a symmetric PSD ``K`` (inf when singular).

    Exact (all eigenvalues) up to ``exact_below`` rows; above, the two extreme eigenvalues by
    Lanczos, λ_min through the Cholesky factor (shift-invert at 0): at n = 20,000 a full
    ``eigvalsh`` takes longer than the whole §5 step and a third copy of K (issue 20)."""
    if len(k) < exact_below:
        lam = scipy.linalg.eigvalsh(k, check_finite=False)
        return float(lam[-1] / lam[0]) if lam[0] > 0 else float("inf")
    from scipy.sparse.linalg import LinearOperator, eigsh

    try:
        factor = scipy.linalg.cho_factor(k, lower=True, check_finite=False)
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        return float("inf")  # not positive definite: λ_min <= 0
    n = len(k)
    lam_max = eigsh(k, k=1, which="LA", tol=1e-8, return_eigenvectors=False)[0]
    inverse = LinearOperator((n, n), matvec=lambda v: scipy.linalg.cho_solve(factor, v))
    inv_max = eigsh(inverse, k=1, which="LA", tol=1e-8, return_eigenvectors=False)[0]
    return float(lam_max * inv_max)


def _factorised_solver(k: np.ndarray):
    """``solve(y) -> Interpolant`` for many right-hand sides of one PSD ``K``: Cholesky once
    (what ``solve_min_norm``'s positive-definite path does), the pseudo-inverse path of
    ``solve_min_norm`` for a right-hand side it does not solve exactly."""
    try:
        factor = scipy.linalg.cho_factor(k, lower=True, check_finite=False)
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        factor = None

    def solve(y: np.ndarray) -> Interpolant:
        if factor is not None:
            alpha = scipy.linalg.cho_solve(factor, y, check_finite=False)
            residual = float(np.max(np.abs(k @ alpha - y)))
            if np.all(np.isfinite(alpha)) and residual <= 1e-6 * max(1.0, float(np.abs(y).max())):
                norm = float(np.sqrt(max(np.trace(np.atleast_2d(alpha.T @ k @ alpha)), 0.0)))
                return Interpolant(alpha=alpha, method="cholesky", max_residual=residual, norm=norm)
        return solve_min_norm_pinv(k, y)

    return solve


def solve_min_norm_pinv(k: np.ndarray, y: np.ndarray) -> Interpolant:
    """``solve_min_norm``'s fallback alone: the minimum-norm least-squares ``pinv(K) y``."""
    alpha = psd_pinv_solve(k, y)
    residual = float(np.max(np.abs(k @ alpha - y)))
    norm = float(np.sqrt(max(np.trace(np.atleast_2d(alpha.T @ k @ alpha)), 0.0)))
    return Interpolant(alpha=alpha, method="pinv", max_residual=residual, norm=norm)


def svc_baseline(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    C: float = 10.0,
) -> dict:
    """scikit-learn's ``SVC(kernel="rbf", C, gamma="scale")`` on the same inputs: the published
    Fashion-MNIST benchmark's best scikit-learn model (0.897 with C = 10 on all 60,000), to set
    the minimum-norm interpolant beside. Not in the paper."""
    import time

    from sklearn.svm import SVC

    t0 = time.perf_counter()
    clf = SVC(C=C, kernel="rbf", gamma="scale").fit(train_x, train_y)
    test_error = float(np.mean(clf.predict(test_x) != test_y))
    return {
        "kernel": "svc_rbf",
        "C": float(C),
        "n_train": len(train_x),
        "support_vectors": int(clf.n_support_.sum()),
        "test_error": test_error,
        "seconds": time.perf_counter() - t0,
    }
