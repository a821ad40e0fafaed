"""Theorem 1 of Zhang et al. 2017 (§4, App. C): a two-layer ReLU network with ``2n + d`` weights
represents any function on a sample of ``n`` points in ``d`` dimensions.

    c(x) = Σ_j w_j · max(⟨a, x⟩ − b_j, 0)

Project the points on a random direction ``a`` (distinct projections almost surely), sort them,
put one bias below each projection and above the previous one, b_1 < x_1 < b_2 < x_2 < … < b_n <
x_n. Then ``A_ij = max(x_i − b_j, 0)`` is lower triangular with positive diagonal
``A_ii = x_i − b_i`` and the output weights solve ``A w = y`` by forward substitution.

The construction is exact in real arithmetic; in floating point its accuracy is governed by the
smallest diagonal entry (half the smallest gap between neighbouring projections): close
neighbours with different targets need huge, cancelling output weights. "Exact" is therefore
judged against float64's own rounding: forward substitution is backward stable (the computed w
solves (A + δA) w = y with |δA| ≤ n·ε·|A|) and evaluating c(z_i) sums n terms, so to first order
|c(z_i) − y_i| ≤ 2n·ε·Σ_j |w_j| A_ij + ε|y_i|. ``rounding_ratio`` is the largest error over that
bound: ≈ 1e-3 for the construction here, ≫ 1 for a network that is not an exact fit (moving one
bias by 1e-3 of a mean gap gives 1e4–1e6).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg


@dataclass(frozen=True)
class TwoLayerReLU:
    """The width-n network of Theorem 1: ``a`` (d,), ``b`` (n,), ``w`` (n,) or (n, k)."""

    a: np.ndarray
    b: np.ndarray
    w: np.ndarray

    @property
    def num_weights(self) -> int:
        """Weights the network uses: d + n + n (one output column; the theorem's count)."""
        return self.a.size + self.b.size + self.w.shape[0]

    def hidden(self, x: np.ndarray) -> np.ndarray:
        """Hidden activations ``max(⟨a, x_i⟩ − b_j, 0)``, (N, n) for inputs (N, d)."""
        return np.maximum((np.asarray(x, np.float64) @ self.a)[:, None] - self.b[None, :], 0.0)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.hidden(x) @ self.w  # (N,) or (N, k)


@dataclass(frozen=True)
class FitReport:
    net: TwoLayerReLU
    max_abs_error: float  # max_i |c(z_i) − y_i| evaluated with the fitted network
    min_diagonal: float  # smallest A_ii: half the smallest gap between sorted projections
    max_abs_weight: float
    condition_number: float  # 2-norm condition number of A (nan when not computed)
    rounding_ratio: float = 0.0  # max_i |c(z_i) − y_i| / its float64 rounding bound (docstring)


def fit_theorem1(
    z: np.ndarray, y: np.ndarray, seed: int = 0, condition_limit: int = 500
) -> FitReport:
    """Fit ``y`` (n,) or (n, k) on points ``z`` (n, d) exactly with Theorem 1's construction.

    Raises ``ValueError`` when two points share a projection (identical inputs, or a degenerate
    ``a``): no function can give them different values, and the theorem assumes distinct points.
    The condition number of A is computed for ``n <= condition_limit`` (it costs an SVD).
    """
    z = np.asarray(z, np.float64)
    y = np.asarray(y, np.float64)
    n, d = z.shape
    if len(y) != n:
        raise ValueError(f"y has {len(y)} targets for {n} points")
    a = np.random.default_rng(seed).standard_normal(d)  # distinct projections almost surely
    x = z @ a  # (n,)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    gaps = np.diff(xs)
    if n > 1 and gaps.min() <= 0:
        raise ValueError(
            f"{int((gaps <= 0).sum())} pairs of points share a projection (duplicate inputs?); "
            "Theorem 1 needs n distinct points"
        )
    # biases halfway between neighbours; the first one a typical gap below the smallest point
    first_gap = gaps.mean() if n > 1 else 1.0
    b_sorted = np.concatenate([[xs[0] - first_gap], (xs[:-1] + xs[1:]) / 2])
    A = np.maximum(xs[:, None] - b_sorted[None, :], 0.0)  # (n, n) lower triangular
    w_sorted = scipy.linalg.solve_triangular(A, y[order], lower=True)  # forward substitution
    # hidden unit j is tied to the j-th smallest point; the network is the same in any unit order
    net = TwoLayerReLU(a=a, b=b_sorted, w=w_sorted)
    err = float(np.max(np.abs(net(z) - y))) if n else 0.0
    ratio = rounding_ratio(net, z, y)
    cond = float(np.linalg.cond(A)) if n <= condition_limit else float("nan")
    return FitReport(
        net=net,
        max_abs_error=err,
        min_diagonal=float(np.diag(A).min()),
        max_abs_weight=float(np.abs(w_sorted).max()),
        condition_number=cond,
        rounding_ratio=ratio,
    )


def rounding_ratio(net: TwoLayerReLU, z: np.ndarray, y: np.ndarray) -> float:
    """``max_i |c(z_i) − y_i| / (2n·ε·Σ_j |w_j| h_ij + ε|y_i|)``: ≤ 1 when the network fits the
    points as exactly as float64 can (module docstring), far above 1 when it does not."""
    y = np.asarray(y, np.float64)
    if not len(y):
        return 0.0
    h = net.hidden(z)
    eps = np.finfo(np.float64).eps
    w = np.abs(net.w)
    bound = 2 * h.shape[1] * eps * (h @ w) + eps * np.abs(y)
    resid = np.abs(net(z) - y)
    return float(np.max(resid / np.maximum(bound, np.finfo(np.float64).tiny)))


def dedupe_rows(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Drop repeated inputs (keeping the first): real data sets hold exact duplicates, which a
    function cannot map to two random labels. Returns (z, y, number dropped)."""
    _, first = np.unique(np.asarray(z), axis=0, return_index=True)
    keep = np.sort(first)
    return z[keep], y[keep], len(z) - len(keep)


def _row(setting: str, n: int, d: int, targets: str, rep: FitReport, dropped: int = 0) -> dict:
    return {
        "setting": setting,
        "n": n,
        "d": d,
        "targets": targets,
        "weights_used": rep.net.num_weights,
        "weights_theorem": 2 * n + d,
        "max_abs_error": rep.max_abs_error,
        "min_diagonal": rep.min_diagonal,
        "max_abs_weight": rep.max_abs_weight,
        "condition_number": rep.condition_number,
        "rounding_ratio": rep.rounding_ratio,
        "duplicates_dropped": dropped,
    }


def expressivity_grid(
    ns: tuple[int, ...],
    ds: tuple[int, ...],
    seed: int = 0,
    real_inputs: np.ndarray | None = None,
    num_classes: int = 10,
) -> list[dict]:
    """Theorem 1 on Gaussian points for every (n, d) with random integer labels and with real
    N(0, 1) targets, then on ``real_inputs`` (N, d) with random labels. One row per fit."""
    rows = []
    for n in ns:
        for d in ds:
            rng = np.random.default_rng([seed, n, d])
            z = rng.standard_normal((n, d))
            labels = rng.integers(0, num_classes, n).astype(np.float64)
            rows.append(_row("gaussian", n, d, "random_labels", fit_theorem1(z, labels, seed)))
            real = rng.standard_normal(n)
            rows.append(_row("gaussian", n, d, "real_targets", fit_theorem1(z, real, seed)))
    if real_inputs is not None and len(real_inputs):
        z = np.asarray(real_inputs, np.float64).reshape(len(real_inputs), -1)
        y = np.random.default_rng([seed, 1]).integers(0, num_classes, len(z)).astype(np.float64)
        z, y, dropped = dedupe_rows(z, y)
        rep = fit_theorem1(z, y, seed)
        rows.append(_row("digits", len(z), z.shape[1], "random_labels", rep, dropped))
    return rows
