"""§5 minimum-norm interpolation: the kernel solve equals the pseudo-inverse solution."""

import numpy as np
import pytest

from stages.generalization.min_norm import (
    corruption_curve,
    fit_and_test,
    kernel,
    min_norm_weights,
    one_hot,
    solve_min_norm,
)


@pytest.mark.parametrize("outputs", [1, 4])
def test_min_norm_weights_equal_the_pseudo_inverse_solution(outputs):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 80))  # n < d: infinitely many interpolants
    y = rng.standard_normal((30, outputs)) if outputs > 1 else rng.standard_normal(30)
    w = min_norm_weights(x, y)
    assert np.allclose(w, np.linalg.pinv(x) @ y, atol=1e-10)
    assert np.allclose(x @ w, y, atol=1e-10)
    # any other interpolant (w + a null-space direction) has a larger norm
    null = np.linalg.svd(x)[2][-1]
    other = w + (null[:, None] if outputs > 1 else null)
    assert np.allclose(x @ other, y) and np.linalg.norm(other) > np.linalg.norm(w)


def test_gradient_descent_from_zero_finds_the_min_norm_solution():
    """§5: SGD from w = 0 stays in the span of the data, so it converges to pinv(X) y."""
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((10, 25)), rng.standard_normal(10)
    w = np.zeros(25)
    lr = 1 / np.linalg.norm(x, 2) ** 2
    for _ in range(5000):
        w -= lr * x.T @ (x @ w - y)
    assert np.allclose(w, min_norm_weights(x, y), atol=1e-8)


def test_positive_definite_kernel_is_solved_exactly():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((60, 5)), one_hot(rng.integers(0, 3, 60), 3)
    k = kernel(x, x, "gaussian", gamma=0.5)
    fit = solve_min_norm(k, y)
    assert fit.method == "cholesky" and fit.max_residual < 1e-8
    assert np.allclose(fit.alpha, np.linalg.pinv(k) @ y, atol=1e-6)
    assert fit.norm == pytest.approx(np.sqrt(np.trace(y.T @ np.linalg.solve(k, y))), rel=1e-8)


def test_rank_deficient_kernel_gets_the_pseudo_inverse_least_squares_solution():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((50, 4))  # linear kernel, n > d: K has rank 4
    y = rng.standard_normal(50)
    k = kernel(x, x, "linear")
    fit = solve_min_norm(k, y)
    assert fit.method == "pinv" and fit.max_residual > 0.1  # no exact interpolant exists
    assert np.allclose(fit.alpha, np.linalg.pinv(k, rcond=1e-10, hermitian=True) @ y, atol=1e-8)


def test_kernels_against_a_loop():
    rng = np.random.default_rng(4)
    x, z = rng.standard_normal((4, 3)), rng.standard_normal((5, 3))
    gauss = [[np.exp(-0.3 * np.sum((a - b) ** 2)) for b in z] for a in x]
    assert np.allclose(kernel(x, z, "gaussian", 0.3), gauss)
    assert np.allclose(kernel(x, z, "linear"), [[a @ b for b in z] for a in x])
    with pytest.raises(ValueError, match="unknown kernel 'poly'"):
        kernel(x, z, "poly")


def test_norm_grows_with_label_corruption_while_train_error_stays_zero():
    rng = np.random.default_rng(5)
    centers = rng.standard_normal((3, 10)) * 3
    labels = rng.integers(0, 3, 260)
    x = centers[labels] + rng.standard_normal((260, 10))
    rows = corruption_curve(x[:200], labels[:200], x[200:], labels[200:],
                            kernels=("gaussian", "random_features"), ps=(0.0, 0.5, 1.0),
                            num_classes=3)  # fmt: skip
    for kind in ("gaussian", "random_features"):
        rs = [r for r in rows if r["kernel"] == kind]
        assert [r["p"] for r in rs] == [0.0, 0.5, 1.0]
        assert all(r["train_error"] == 0 and r["max_residual"] < 1e-6 for r in rs)
        assert rs[0]["norm"] < rs[1]["norm"] < rs[2]["norm"]
        assert rs[0]["test_error"] < 0.05 and rs[2]["test_error"] > 0.4  # chance is 2/3
    direct = fit_and_test(x[:200], labels[:200], x[200:], labels[200:], kind="gaussian",
                          num_classes=3, gamma=rows[0]["gamma"])  # fmt: skip
    assert direct["norm"] == pytest.approx(rows[0]["norm"])


def test_condition_number_is_reported_per_row():
    """Issue 21: an "exact" solve of an ill-conditioned K fits noise; every row now says cond(K)."""
    from stages.generalization.min_norm import condition_number, corruption_curve

    assert condition_number(np.diag([4.0, 2.0, 0.5])) == pytest.approx(8.0)
    assert condition_number(np.ones((3, 3))) > 1e15  # rank 1: inf, or 1/rounding error
    rng = np.random.default_rng(0)
    low_rank = rng.normal(size=(20, 4)) @ rng.normal(size=(4, 30))  # rank 4, n = 20 < d = 30
    # rounding to 1e-3 lifts XXᵀ to full rank 20, as the rounded upscaled digits: a linear
    # "interpolant" then exists, but only through the rounding noise (cond ≈ 4e9 here)
    x = np.round(low_rank * 1000) / 1000
    rows = corruption_curve(x, rng.integers(0, 3, 20), x[:5], np.zeros(5, int),
                            kernels=("linear", "gaussian"), ps=(0.0,), num_classes=3, seed=0)  # fmt: skip
    cond = {r["kernel"]: r["condition_number"] for r in rows}
    assert 1e9 < cond["linear"] < float("inf") and cond["gaussian"] < 1e6


def test_condition_number_by_lanczos_matches_the_exact_one():
    # above exact_below rows the two extreme eigenvalues come from Lanczos (λ_min through the
    # Cholesky factor): a full eigvalsh at n = 20,000 outlasted the rest of §5 (issue 20)
    from stages.generalization.min_norm import condition_number

    x = np.random.default_rng(6).standard_normal((600, 10))
    k = kernel(x, x, "gaussian", 0.05)
    exact = condition_number(k)
    assert exact > 1e3
    assert condition_number(k, exact_below=100) == pytest.approx(exact, rel=1e-6)
    singular = kernel(x, x, "linear")  # rank 10 < 600: not positive definite
    assert condition_number(singular, exact_below=100) == float("inf")
