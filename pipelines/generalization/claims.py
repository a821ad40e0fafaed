"""Zhang et al.'s claims (§2 Figure 1, Table 1, §4 Theorem 1) as data, evaluated over seeds and
training / test examples from the sweeps' rows.

"Fits" uses the paper's own bar: its Table 1 counts MLP 1×512 on random labels (99.34% train) as
fitted, so a model fits when its training accuracy is above 99%, not only at exactly 100%.
"""

from __future__ import annotations

import numpy as np

from pipelines import claims as core
from pipelines.claims import Claim

FIT_BAR = 0.99  # Table 1: 99.34% counts as fitted
CHANCE, CHANCE_BAND = 0.1, 0.03


def _claims_for(model: str) -> dict[str, Claim]:
    paper_train = {"mlp_1x512": 0.9934}.get(model, 1.0)
    paper_test = {"mlp_1x512": 0.1061, "mlp_3x512": 0.1048, "small_alexnet": 0.0986,
                  "small_inception": 0.0978, "small_inception_no_bn": 0.1012}.get(model)  # fmt: skip
    return {
        c.id: c
        for c in (
            Claim(
                f"fits_random_labels/{model}",
                f"{model} fits random labels",
                "§2, Table 1",
                "train acc on random labels",
                ">",
                FIT_BAR,
                paper_value=paper_train,
                unit="%",
                scale=100,
            ),  # fmt: skip
            Claim(
                f"random_labels_test_chance/{model}",
                f"{model} on random labels tests at chance",
                "§2, Table 1",
                "test acc on random labels",
                "≈",
                CHANCE,
                tolerance=CHANCE_BAND,
                paper_value=paper_test,
                unit="%",
                scale=100,
            ),  # fmt: skip
            Claim(
                f"random_labels_slower/{model}",
                "Random labels take a small constant factor longer to fit",
                "§2, Fig. 1a",
                "steps to fit (random) / steps (true labels)",
                ">",
                1.0,
                digits=2,
            ),  # fmt: skip
            Claim(
                f"gaussian_faster/{model}",
                "Gaussian inputs start converging faster than random labels",
                "§2, Fig. 1a",
                "steps to fit (random labels) − (Gaussian)",
                ">",
                0.0,
                unit="steps",
            ),  # fmt: skip
        )
    }


P_CLAIMS = {
    c.id: c
    for c in (
        Claim(
            "test_error_rises_with_p",
            "Test error rises with label corruption p",
            "§2, Fig. 1c",
            "Spearman ρ(p, test error)",
            ">",
            0.0,
            digits=2,
        ),  # fmt: skip
        Claim(
            "test_error_p1_chance",
            "At p = 1 test error approaches 90%",
            "§2, Fig. 1c",
            "test error at p = 1",
            "≈",
            0.9,
            tolerance=CHANCE_BAND,
            paper_value=0.9,
            unit="%",
            scale=100,
        ),  # fmt: skip
        Claim(
            "regularizers_not_necessary",
            "Every model fits random labels with or without regularisers",
            "§3, Table 1",
            "lowest random-label train acc over the regulariser combinations",
            ">",
            FIT_BAR,
            unit="%",
            scale=100,
        ),  # fmt: skip
        Claim(
            "theorem1_exact",
            "2n + d weights fit any n labels exactly (to float64's rounding)",
            "§4, Theorem 1",
            "largest max_i |c(x_i) − y_i| ÷ its float64 rounding bound over the grid",
            "<",
            1.0,
            digits=None,
        ),  # fmt: skip
    )
}


def _ok(rows):
    return [r for r in rows if r.get("error") is None]


def randomization_claims(rows: list[dict], n_train: int, n_test: int) -> list[core.ClaimResult]:
    rows = _ok(r for r in rows if r["experiment"] == "randomization")
    out = []
    for model in sorted({r["model"] for r in rows}):
        c = _claims_for(model)
        mine = [r for r in rows if r["model"] == model]

        def by(cond, key, mine=mine):
            return {r["seed"]: r[key] for r in mine if r["condition"] == cond}

        rl_train = list(by("random_labels", "train_acc").values())
        if not rl_train:
            out += [core.not_measured(x, "random_labels not in randomization.conditions")
                    for x in c.values()]  # fmt: skip
            continue
        out.append(core.accuracy_level(c[f"fits_random_labels/{model}"], rl_train, n_train,
                                       examples="training examples"))  # fmt: skip
        out.append(core.accuracy_level(c[f"random_labels_test_chance/{model}"],
                                       list(by("random_labels", "test_acc").values()), n_test))  # fmt: skip
        out.append(_steps_ratio(c[f"random_labels_slower/{model}"], by("random_labels",
                                "steps_to_fit"), by("true_labels", "steps_to_fit"), n_train))  # fmt: skip
        rl, ga = by("random_labels", "steps_to_fit"), by("gaussian", "steps_to_fit")
        claim = c[f"gaussian_faster/{model}"]
        if not ga:
            out.append(core.not_measured(claim, "gaussian not in randomization.conditions"))
        elif any(v is None for v in [*rl.values(), *ga.values()]):
            out.append(core.not_measured(claim, "a run never fitted within train.max_steps"))
        else:
            est, samples, n = core.paired_seed_samples(rl, ga)
            out.append(core.seed_claim(claim, est, samples, n))
    return out


def _steps_ratio(claim, a: dict, b: dict, n_train: int) -> core.ClaimResult:
    if not a or not b:
        return core.not_measured(claim, "true_labels or random_labels not run")
    if any(v is None for v in [*a.values(), *b.values()]):
        return core.not_measured(claim, "a run never fitted within train.max_steps")
    est, samples, n = core.paired_seed_samples(a, b, lambda x, y: float(np.mean(x) / np.mean(y)))
    return core.seed_claim(claim, est, samples, n, note=f"n = {n_train} training images")


def corruption_claims(rows: list[dict], n_test: int) -> list[core.ClaimResult]:
    from scipy.stats import spearmanr

    rows = _ok(r for r in rows if r["experiment"] == "corruption")
    ps = sorted({r["p"] for r in rows})
    if len(ps) < 3:
        return [core.not_measured(P_CLAIMS["test_error_rises_with_p"], "fewer than 3 p values"),
                core.not_measured(P_CLAIMS["test_error_p1_chance"], "corruption not run")]  # fmt: skip
    errs = {p: np.array([1 - r["test_acc"] for r in rows if r["p"] == p]) for p in ps}
    rng = np.random.default_rng(core.SEED)

    def rho(means):
        return 0.0 if np.ptp(means) == 0 else float(spearmanr(ps, means).statistic)

    samples = np.empty(core.RESAMPLES)
    for b in range(core.RESAMPLES):
        means = [(rng.binomial(n_test, np.clip(e[rng.integers(0, len(e), len(e))], 0, 1))
                  / n_test).mean() for e in errs.values()]  # fmt: skip
        samples[b] = rho(np.array(means))
    n_seeds = min(len(e) for e in errs.values())
    out = [core.evaluate(P_CLAIMS["test_error_rises_with_p"], rho(np.array([e.mean() for e in
                         errs.values()])), samples, n=len(ps), note=f"{len(ps)} values of p",
                         method=f"bootstrap over {n_seeds} seed(s) × {n_test} test examples")]  # fmt: skip
    if 1.0 in errs:
        out.append(core.accuracy_level(P_CLAIMS["test_error_p1_chance"], list(errs[1.0]), n_test))
    else:
        out.append(core.not_measured(P_CLAIMS["test_error_p1_chance"], "p = 1 not in the grid"))
    return out


def regularizer_claims(rows: list[dict], n_train: int) -> list[core.ClaimResult]:
    rows = _ok(r for r in rows if r["experiment"] == "regularizers"
               and r["condition"] == "random_labels")  # fmt: skip
    claim = P_CLAIMS["regularizers_not_necessary"]
    if not rows:
        return [core.not_measured(claim, "regularizers not run on random labels")]
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["regularisers"]), []).append(r["train_acc"])
    keys = sorted(groups)
    draws = np.stack([core.accuracy_samples(groups[k], n_train) for k in keys])  # (G, B)
    est_key = min(keys, key=lambda k: np.mean(groups[k]))
    return [core.evaluate(claim, float(np.mean(groups[est_key])), draws.min(0),
                          method=f"bootstrap over seeds × {n_train} training examples",
                          n=len(keys), note=f"lowest: {est_key[0]} with {est_key[1]}; "
                          f"{len(keys)} combinations")]  # fmt: skip


def expressivity_claims(expressivity: list[dict]) -> list[core.ClaimResult]:
    claim = P_CLAIMS["theorem1_exact"]
    if not expressivity:
        return [core.not_measured(claim, "expressivity not run")]
    # rows from before the ratio existed judge nothing: recompute (the step's key changed too)
    if any("rounding_ratio" not in r for r in expressivity):
        return [core.not_measured(claim, "expressivity rows predate the rounding bound")]
    worst = max(expressivity, key=lambda r: r["rounding_ratio"])
    ratio = float(worst["rounding_ratio"])
    largest = max(float(r["max_abs_error"]) for r in expressivity)
    return [core.evaluate(claim, ratio, np.array([ratio]), method="exact construction", n=1,
                          note=f"worst: {worst['setting']}, n = {worst['n']}, d = {worst['d']}, "
                          f"cond(A) = {worst['condition_number']:.1e}, max |c(x_i) − y_i| = "
                          f"{worst['max_abs_error']:.1e} (largest over the grid {largest:.1e})")]  # fmt: skip
