import numpy as np
import pytest

from stages.detection.bbox_regression import BoxRegressor, decode_boxes, encode_boxes


def random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    x1, y1 = rng.uniform(1, 300, n), rng.uniform(1, 300, n)
    return np.stack([x1, y1, x1 + rng.uniform(5, 200, n), y1 + rng.uniform(5, 200, n)], axis=1)


def test_hand_worked_targets_both_width_conventions():
    p = np.array([[1, 1, 10, 10]], dtype=float)
    g = np.array([[3, 1, 12, 10]], dtype=float)
    # R-CNN code: w = x2 - x1 = 9, centres 1 + 4.5 = 5.5 and 3 + 4.5 = 7.5 -> tx = 2/9.
    np.testing.assert_allclose(encode_boxes(p, g), [[2 / 9, 0, 0, 0]], atol=1e-12)
    # Inclusive pixels: w = 10, centres 6 and 8 -> tx = 0.2.
    np.testing.assert_allclose(encode_boxes(p, g, width_offset=1.0), [[0.2, 0, 0, 0]], atol=1e-12)
    # Scale change: G = (1, 1, 19, 10). Offset 0: Gw = 18, Gx = 10 -> tx = 4.5/9, tw = log 2.
    # Offset 1: Gw = 19, Gx = 10.5 -> tx = 4.5/10, tw = log 1.9.
    g2 = np.array([[1, 1, 19, 10]], dtype=float)
    np.testing.assert_allclose(encode_boxes(p, g2), [[0.5, 0, np.log(2), 0]], atol=1e-12)
    np.testing.assert_allclose(
        encode_boxes(p, g2, width_offset=1.0), [[0.45, 0, np.log(1.9), 0]], atol=1e-12
    )


@pytest.mark.parametrize("width_offset", [0.0, 1.0])
def test_encode_decode_round_trip_and_identity(width_offset):
    rng = np.random.default_rng(0)
    p, g = random_boxes(rng, 500), random_boxes(rng, 500)
    t = encode_boxes(p, g, width_offset=width_offset)
    np.testing.assert_allclose(decode_boxes(p, t, width_offset=width_offset), g, atol=1e-4)
    np.testing.assert_allclose(encode_boxes(p, p, width_offset=width_offset), 0, atol=1e-12)
    zeros = np.zeros_like(p)
    np.testing.assert_allclose(decode_boxes(p, zeros, width_offset=width_offset), p, atol=1e-9)


def test_rejects_degenerate_boxes():
    good = [1, 1, 10, 10]
    with pytest.raises(ValueError, match="proposals box 1 "):
        encode_boxes(np.array([good, [5, 5, 5, 9]], float), np.array([good, good], float))
    # A one-pixel-wide box is fine with inclusive widths.
    encode_boxes(np.array([[5, 5, 5, 9]], float), np.array([good], float), width_offset=1.0)
    with pytest.raises(ValueError, match="pair up"):
        encode_boxes(np.array([good], float), np.array([good, good], float))


def synthetic_problem(rng, n=400, d=6):
    features = rng.normal(size=(n, d))
    true_coef = rng.normal(scale=0.05, size=(4, d))
    true_bias = np.array([0.02, -0.03, 0.1, -0.05])
    proposals = random_boxes(rng, n)
    gt = decode_boxes(proposals, features @ true_coef.T + true_bias)
    return features, proposals, gt, true_coef, true_bias


def test_regressor_recovers_linear_map():
    rng = np.random.default_rng(1)
    x, p, g, coef, bias = synthetic_problem(rng)
    reg = BoxRegressor(alpha=1e-8).fit(x, p, g, np.full(len(x), 0.9))
    assert reg.coef_.shape == (4, 6) and reg.intercept_.shape == (4,) and reg.n_train_ == 400
    np.testing.assert_allclose(reg.coef_, coef, atol=1e-8)
    np.testing.assert_allclose(reg.intercept_, bias, atol=1e-8)
    # unseen features and proposals, targets from the same map
    rng_new = np.random.default_rng(7)
    x_new, p_new = rng_new.normal(size=(100, 6)), random_boxes(rng_new, 100)
    g_new = decode_boxes(p_new, x_new @ coef.T + bias)
    np.testing.assert_allclose(reg.predict(x_new, p_new), g_new, atol=1e-5)
    # R-CNN's lambda = 1000 shrinks the weights on 400 unit-scale rows.
    strong = BoxRegressor().fit(x, p, g, np.full(len(x), 0.9))
    assert np.linalg.norm(strong.coef_) < 0.5 * np.linalg.norm(coef)


def test_parity_with_rcnn_matlab_recipe():
    """rcnn_train_bbox_regressor.m: bias column, centred + whitened targets, Cholesky ridge."""
    rng = np.random.default_rng(2)
    x, p, g, _, _ = synthetic_problem(rng, n=60, d=5)
    x = np.abs(x) * 3  # non-negative like pool5, so the penalised bias matters
    lam = 30.0
    y = encode_boxes(p, g)
    a = np.hstack([x, np.ones((len(x), 1))])
    mu = y.mean(axis=0)
    yc = y - mu
    evals, evecs = np.linalg.eigh(yc.T @ yc / len(yc))
    t = evecs @ np.diag(1 / np.sqrt(evals + 0.001)) @ evecs.T
    t_inv = evecs @ np.diag(np.sqrt(evals + 0.001)) @ evecs.T
    r = np.linalg.cholesky(a.T @ a + lam * np.eye(a.shape[1]))  # lower: R' in MATLAB terms
    beta = np.linalg.solve(r.T, np.linalg.solve(r, a.T @ (yc @ t)))
    want = (a @ beta) @ t_inv + mu  # rcnn_predict_bbox_regressor.m
    reg = BoxRegressor(alpha=lam).fit(x, p, g, np.ones(len(x)))
    np.testing.assert_allclose(reg.predict_deltas(x), want, atol=1e-8)
    # An unpenalised intercept (sklearn's fit_intercept=True) is a different estimator.
    from sklearn.linear_model import Ridge

    other = Ridge(alpha=lam).fit(x, y).predict(x)
    assert np.abs(other - want).max() > 1e-4


def test_iou_exactly_min_iou_is_excluded():
    rng = np.random.default_rng(3)
    x, p, g, _, _ = synthetic_problem(rng, n=100)
    ious = np.where(np.arange(100) < 70, 0.61, 0.6)
    g_noisy = g.copy()
    g_noisy[70:] += 40.0  # would wreck the fit if these rows were used
    reg = BoxRegressor(alpha=1.0).fit(x, p, g_noisy, ious)
    ref = BoxRegressor(alpha=1.0).fit(x[:70], p[:70], g[:70], ious[:70])
    assert reg.n_train_ == 70
    np.testing.assert_allclose(reg.coef_, ref.coef_, atol=1e-12)
    np.testing.assert_allclose(reg.intercept_, ref.intercept_, atol=1e-12)
    with pytest.raises(ValueError, match="no training pairs"):
        BoxRegressor().fit(x, p, g, np.full(100, 0.6))
