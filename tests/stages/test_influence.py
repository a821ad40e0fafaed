"""The outer step (REFERENCE §5): last-layer gradients and Hessian against autograd, the
influence-function hypergradient against finite differences of a convex model solved exactly, and
the masked Adam against torch's Adam."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stages.ssl.influence import (
    MaskedAdam,
    hypergradient,
    last_layer_hessian,
    per_example_grads,
    weight_hypergradients,
    with_bias,
)

K, D = 3, 4  # classes, feature dimension of the "last layer" problem


def _problem(seed=0, n_s=12, n_u=10, n_v=15):
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64

    def feats(n):
        return torch.randn(n, D, generator=g, dtype=f64)

    def labels(n):
        return torch.randint(0, K, (n,), generator=g)

    return feats(n_s), labels(n_s), feats(n_u), labels(n_u), feats(n_v), labels(n_v)


def _logits(theta, x):
    return with_bias(x) @ theta.view(K, D + 1).T  # (N, K)


def _objective(theta, fs, ys, fu, yu, lam, l2):
    """F(θ, λ) = mean_s CE + (1/U) Σ_u λ_u CE_u + (l2/2)‖θ‖²: L2-regularised softmax regression."""
    loss_u = (lam * F.cross_entropy(_logits(theta, fu), yu, reduction="none")).mean()
    return F.cross_entropy(_logits(theta, fs), ys) + loss_u + 0.5 * l2 * theta @ theta


def _solve(fs, ys, fu, yu, lam, l2, start=None):
    """θ*(λ) by Newton's method with autograd's full Hessian (strictly convex: converges)."""
    theta = torch.zeros(K * (D + 1), dtype=torch.float64) if start is None else start
    fn = lambda t: _objective(t, fs, ys, fu, yu, lam, l2)  # noqa: E731
    for _ in range(50):
        grad = torch.func.grad(fn)(theta)
        if grad.norm() < 1e-13:
            break
        theta = theta - torch.linalg.solve(torch.func.hessian(fn)(theta), grad)
    return theta


def test_per_example_grads_match_autograd_one_example_at_a_time():
    g = torch.Generator().manual_seed(1)
    feats, targets = torch.randn(7, 5, generator=g), torch.randint(0, 4, (7,), generator=g)
    weight, bias = torch.randn(4, 5, generator=g), torch.randn(4, generator=g)
    probs = torch.softmax(feats @ weight.T + bias, dim=1)
    got = per_example_grads(feats, probs, targets)  # (7, 4·6)
    assert got.shape == (7, 24)
    for i in range(7):
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        F.cross_entropy((feats[i] @ w.T + b)[None], targets[i : i + 1]).backward()
        want = torch.cat([w.grad, b.grad[:, None]], dim=1).reshape(-1)
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6)


def test_last_layer_hessian_matches_autograd():
    fs, ys, fu, yu, _, _ = _problem(2)
    theta = torch.randn(
        K * (D + 1), dtype=torch.float64, generator=torch.Generator().manual_seed(3)
    )
    lam = torch.rand(len(fu), dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 2
    l2 = 0.05
    want = torch.autograd.functional.hessian(
        lambda t: _objective(t, fs, ys, fu, yu, lam, l2), theta
    )
    feats = torch.cat([fs, fu])
    probs = torch.softmax(_logits(theta, feats), dim=1)
    weights = torch.cat([torch.full((len(fs),), 1 / len(fs), dtype=torch.float64), lam / len(fu)])
    got = last_layer_hessian(feats, probs, weights, l2)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, got.T)


def test_hypergradient_matches_finite_differences_of_the_exact_optimum():
    """∂L_V(θ*(λ))/∂λ_u by central differences, θ* re-solved to machine precision each time."""
    fs, ys, fu, yu, fv, yv = _problem(0)
    lam, l2 = torch.linspace(0.2, 1.8, len(fu), dtype=torch.float64), 0.02
    theta = _solve(fs, ys, fu, yu, lam, l2)

    def val_loss(lam):  # Newton warm-started at θ*(λ): two or three steps to convergence
        return F.cross_entropy(_logits(_solve(fs, ys, fu, yu, lam, l2, theta), fv), yv).item()

    eps = 1e-4
    fd = torch.tensor(
        [
            (val_loss(lam + eps * e) - val_loss(lam - eps * e)) / (2 * eps)
            for e in torch.eye(len(fu), dtype=torch.float64)
        ],
        dtype=torch.float64,
    )
    got = weight_hypergradients(
        labeled_features=fs,
        labeled_probs=torch.softmax(_logits(theta, fs), 1),
        unlabeled_features=fu,
        unlabeled_probs=torch.softmax(_logits(theta, fu), 1),
        pseudo_targets=yu,
        mask=torch.ones(len(fu)),
        weights=lam,
        val_features=fv,
        val_probs=torch.softmax(_logits(theta, fv), 1),
        val_targets=yv,
        l2=l2,
    ).to(torch.float64)
    assert fd.abs().max() > 1e-3  # the weights matter: a non-trivial check
    assert (got - fd).norm() / fd.norm() < 1e-3
    assert torch.allclose(got, fd, rtol=1e-3, atol=1e-6)


def test_hypergradient_solves_instead_of_inverting_and_rejects_indefinite():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    hess = a @ a.T + 0.1 * torch.eye(6, dtype=torch.float64)
    val, ex = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g)
    want = -(ex.double() @ torch.linalg.inv(hess) @ val)
    torch.testing.assert_close(hypergradient(val, hess, ex.double()), want)
    with pytest.raises(ValueError, match="not positive definite"):
        hypergradient(val, -hess, ex.double())


def test_masked_adam_changes_only_batch_entries_and_stays_in_bounds():
    adam = MaskedAdam(10, lr=0.3)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        idx = torch.randperm(10, generator=g)[:3]
        before = adam.weights.clone()
        adam.step(idx, torch.randn(3, generator=g) * 100)
        others = torch.ones(10, dtype=torch.bool)
        others[idx] = False
        assert torch.equal(adam.weights[others], before[others])
        assert not torch.equal(adam.weights[idx], before[idx])
        assert adam.weights.min() >= 0 and adam.weights.max() <= 2
    adam.step(torch.tensor([0, 1]), torch.tensor([1e6, -1e6]))
    for _ in range(20):
        adam.step(torch.tensor([0, 1]), torch.tensor([1e6, -1e6]))
    assert adam.weights[0] == 0 and adam.weights[1] == 2  # clipped, not beyond
    assert adam.steps.sum() == 30 * 3 + 21 * 2


def test_masked_adam_is_torch_adam_on_each_entrys_own_steps():
    """An entry updated at its k-th visit moves exactly as torch's Adam at step k (lr 0.01)."""
    grads = {0: [0.3, -0.1, 0.2], 1: [-0.5, 0.4], 2: [0.05]}
    visits = [[0, 1], [0, 2], [0, 1]]  # batches of indices, in order
    adam = MaskedAdam(4)
    seen = {i: 0 for i in grads}
    for batch in visits:
        g = []
        for i in batch:
            g.append(grads[i][seen[i]])
            seen[i] += 1
        adam.step(torch.tensor(batch), torch.tensor(g))
    for i, seq in grads.items():
        p = torch.nn.Parameter(torch.ones(1))
        ref = torch.optim.Adam([p], lr=0.01, betas=(0.9, 0.999))
        for gi in seq:
            p.grad = torch.tensor([gi])
            ref.step()
        torch.testing.assert_close(adam.weights[i], p.detach()[0].clamp(0, 2))
    assert adam.weights[3] == 1.0 and adam.steps[3] == 0


def _batch(seed: int, b: int = 8, u: int = 12, d: int = 5, k: int = 3):
    g = torch.Generator().manual_seed(seed)
    probs = lambda n: torch.softmax(torch.randn(n, k, generator=g, dtype=torch.float64), 1)  # noqa: E731
    return dict(
        labeled_features=torch.randn(b, d, generator=g, dtype=torch.float64),
        labeled_probs=probs(b),
        unlabeled_features=torch.randn(u, d, generator=g, dtype=torch.float64),
        unlabeled_probs=probs(u),
        pseudo_targets=torch.randint(0, k, (u,), generator=g),
        mask=(torch.rand(u, generator=g) > 0.3).to(torch.float64),
        weights=torch.rand(u, generator=g, dtype=torch.float64) * 2,
        val_features=torch.randn(6, d, generator=g, dtype=torch.float64),
        val_probs=probs(6),
        val_targets=torch.randint(0, k, (6,), generator=g),
    )


def test_data_parallel_hypergradients_equal_the_single_process_ones():
    """Issue 21: with W workers each scaled ∂F/∂λ_u by c/u_local (W× too large) and solved with
    its own Hessian. Two shards, with the global U and the averaged Hessian, must give exactly
    the single-process hypergradients of the whole batch."""
    from stages.ssl.influence import last_layer_hessian

    full = _batch(0)
    kw = dict(unlabeled_coef=1.0, l2=5e-4)
    want = weight_hypergradients(**full, **kw)
    shards = []
    for w in range(2):
        part = dict(full)
        for key, n in (("labeled", 8), ("unlabeled", 12)):
            size = n // 2
            sl = slice(w * size, (w + 1) * size)
            for what in ("features", "probs"):
                part[f"{key}_{what}"] = full[f"{key}_{what}"][sl]
            if key == "unlabeled":
                for extra in ("pseudo_targets", "mask", "weights"):
                    part[extra] = full[extra][sl]
        shards.append(part)

    def local_hessian(p):  # what each worker builds before the all-reduce
        weights = torch.cat([torch.full((4,), 1 / 4, dtype=torch.float64),
                             (1.0 / 6) * p["weights"] * p["mask"]])  # fmt: skip
        feats = torch.cat([p["labeled_features"], p["unlabeled_features"]])
        return last_layer_hessian(feats, torch.cat([p["labeled_probs"], p["unlabeled_probs"]]),
                                  weights, kw["l2"])  # fmt: skip

    hessians = [local_hessian(p) for p in shards]
    got = torch.cat([
        weight_hypergradients(**p, **kw, num_unlabeled_total=12,
                              reduce_hessian=lambda h, w=w: (h + hessians[1 - w]) / 2)
        for w, p in enumerate(shards)
    ])  # fmt: skip
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-9)
    # the old per-worker scale: twice the single-process hypergradients
    old = weight_hypergradients(**shards[0], **kw)
    assert torch.abs(old).max() > 1.5 * torch.abs(want[:6]).max()


def test_masked_out_examples_take_no_adam_step():
    """Issue 21: an example whose pseudo-label is below the confidence threshold has a zero
    hypergradient; stepping it advanced its count and moved λ by the old momentum."""
    from stages.ssl.train import confident_updates

    def run(filtered: bool) -> MaskedAdam:
        lam = MaskedAdam(3)
        idx = torch.tensor([0, 1])
        for grads, mask in ((torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])),
                            (torch.tensor([0.0, -1.0]), torch.tensor([0.0, 1.0]))):  # fmt: skip
            lam.step(*(confident_updates(idx, grads, mask) if filtered else (idx, grads)))
        return lam

    lam = run(filtered=True)
    assert lam.steps.tolist() == [1, 2, 0]
    assert lam.weights[0] == pytest.approx(1 - 0.01)  # one Adam step of size lr, then untouched
    unfiltered = run(filtered=False)  # what the training loop did before
    assert unfiltered.steps[0] == 2 and unfiltered.weights[0] < lam.weights[0] - 1e-3
