"""Batch Normalization's claims (§4.1 Figure 1, §4.2 Figure 3, the summary's batch-size
criticism) as data, evaluated over seeds and test examples from the sweeps' curves and finals."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipelines import claims as core
from pipelines.claims import Claim
from stages.training.bn_experiments import steps_to_reach

CHANCE = 0.1  # 10 classes
CHANCE_BAND = 0.05  # "at chance": within 0.1 ± 0.05
LEFT_CHANCE = 0.2  # a net whose best is below this has not left chance: comparisons degenerate


def _pts(cid, statement, source, metric, paper=None, direction=">", threshold=0.0, **kw):
    return Claim(cid, statement, source, metric, direction, threshold, paper_value=paper,
                 unit="points", scale=100, **kw)  # fmt: skip


def _steps(cid, statement, source, metric, paper=None):
    return Claim(cid, statement, source, metric, ">", 0.0, paper_value=paper, unit="steps")


CLAIMS = {
    c.id: c
    for c in (
        _steps(
            "mnist_bn_faster",
            "BN reaches the plain net's best accuracy in fewer steps",
            "§4.1, Fig. 1a",
            "steps(no BN) − steps(BN) to each seed's non-BN best",
        ),  # fmt: skip
        _pts(
            "mnist_bn_higher",
            "BN reaches a higher test accuracy",
            "§4.1, Fig. 1a",
            "best test acc(BN) − best test acc(no BN)",
        ),  # fmt: skip
        Claim(
            "mnist_median_stable",
            "The sigmoid input's median drifts without BN, stays with BN",
            "§4.1, Fig. 1b,c",
            "|Δ median|(no BN) − |Δ median|(BN), first to last evaluation",
        ),  # fmt: skip
        Claim(
            "mnist_spread_stable",
            "The sigmoid input's 15–85th spread drifts without BN, stays with BN",
            "§4.1, Fig. 1b,c",
            "|Δ spread|(no BN) − |Δ spread|(BN), first to last evaluation",
        ),  # fmt: skip
        _steps(
            "bn_baseline_faster",
            "BN-Baseline reaches Baseline's best in fewer steps",
            "§4.2, Fig. 3",
            "steps(Baseline) − steps(BN-Baseline)",
            31.0e6 - 13.3e6,
        ),  # fmt: skip
        _steps(
            "bn_x5_faster",
            "BN-x5 reaches Baseline's best faster than BN-Baseline",
            "§4.2, Fig. 3",
            "steps(BN-Baseline) − steps(BN-x5)",
            13.3e6 - 2.1e6,
        ),  # fmt: skip
        _pts(
            "bn_baseline_higher",
            "BN-Baseline peaks above Baseline",
            "§4.2, Fig. 3",
            "best acc(BN-Baseline) − best acc(Baseline)",
            0.727 - 0.722,
        ),  # fmt: skip
        _pts(
            "bn_x30_over_x5",
            "BN-x30 peaks above BN-x5",
            "§4.2, Fig. 3",
            "best acc(BN-x30) − best acc(BN-x5)",
            0.748 - 0.730,
        ),  # fmt: skip
        _pts(
            "sigmoid_trains_with_bn",
            "With sigmoid, BN-x5-Sigmoid trains",
            "§4.2, Fig. 3",
            "best acc(BN-x5-Sigmoid) − best acc(Baseline-Sigmoid)",
            0.698 - 0.1,
        ),  # fmt: skip
        _pts(
            "sigmoid_without_bn_chance",
            "Without BN, the sigmoid net never beats chance",
            "§4.2 (text)",
            "best acc(Baseline-Sigmoid)",
            direction="≈",
            threshold=CHANCE,
            tolerance=CHANCE_BAND,
        ),  # fmt: skip
        _pts(
            "x5_needs_bn",
            "At ×5 the learning rate, BN is what makes training work (control: "
            "the plain net with the same changes)",
            "§3.3, §4.2.1",
            "best acc(BN-x5) − best acc(Baseline-x5)",
        ),  # fmt: skip
        _pts(
            "x30_needs_bn",
            "At ×30 the learning rate, BN is what makes training work (control)",
            "§3.3, §4.2.1",
            "best acc(BN-x30) − best acc(Baseline-x30)",
        ),  # fmt: skip
        _pts(
            "m1_bn_chance",
            "BN does not work with minibatch size 1",
            "summary (criticism)",
            "test acc of BN at m = 1",
            direction="≈",
            threshold=CHANCE,
            tolerance=CHANCE_BAND,
        ),  # fmt: skip
        _pts(
            "small_m_bn_below_plain",
            "BN falls below the plain net at small minibatches",
            "summary (criticism)",
            "test acc(no BN) − test acc(BN) at the smallest m > 1",
        ),  # fmt: skip
        _pts(
            "small_m_batch_stats_gap",
            "BN's minibatch statistics hurt at small m",
            "summary (criticism)",
            "inference acc − batch-statistics acc (BN) at the smallest m > 1",
        ),  # fmt: skip
    )
}


def _seed_curves(curves: pa.Table, experiment: str, variant: str, metric: str = "test_acc"):
    from pipelines.batchnorm.report import seed_curves

    return seed_curves(curves, experiment, variant, metric)


def _steps_claim(claim, curves, experiment, slow, fast, target_variant, note=""):
    """Per seed: steps for ``slow`` − steps for ``fast`` to ``target_variant``'s best accuracy on
    that seed. "Never" counts as one evaluation past the budget (censored: a lower bound)."""
    slow_c, fast_c = (_seed_curves(curves, experiment, v) for v in (slow, fast))
    targets = _seed_curves(curves, experiment, target_variant)
    seeds = sorted(set(slow_c) & set(fast_c) & set(targets))
    if not seeds:
        return core.not_measured(claim, f"{slow} or {fast} was not run")
    diffs, censored = {}, 0
    for sd in seeds:
        t = float(targets[sd][1].max())
        got = []
        for steps, acc in (slow_c[sd], fast_c[sd]):
            s = steps_to_reach(steps, acc, t)
            if s is None:
                censored += 1
                s = int(steps[-1] + (steps[-1] - steps[-2] if len(steps) > 1 else 1))
            got.append(s)
        diffs[sd] = got[0] - got[1]
    est, samples, n = core.paired_seed_samples(diffs, {s: 0.0 for s in diffs})
    chance = [sd for sd in seeds if float(targets[sd][1].max()) < LEFT_CHANCE]
    notes = [note] if note else []
    if censored:
        notes.append(f"{censored} run(s) never reached the target (counted at the budget)")
    if chance:
        notes.append(f"the target net is at chance on seed(s) {chance}: degenerate comparison")
    return core.seed_claim(claim, est, samples, n, note="; ".join(notes),
                           details={"per_seed": diffs})  # fmt: skip


def _best_by_seed(finals: list[dict], variant: str, key: str = "best_acc") -> list[float]:
    return [float(f[key]) for f in finals if f["variant"] == variant and key in f]


def _curve_best(curves, experiment, variant) -> list[float]:
    per_seed = _seed_curves(curves, experiment, variant)
    return [float(per_seed[sd][1].max()) for sd in sorted(per_seed)]


def mnist_claims(curves: pa.Table, n_test: int) -> list[core.ClaimResult]:
    out = [_steps_claim(CLAIMS["mnist_bn_faster"], curves, "mnist", "Baseline", "BN", "Baseline")]
    best_bn, best_no = _curve_best(curves, "mnist", "BN"), _curve_best(curves, "mnist", "Baseline")
    degenerate = max(best_no, default=0) < LEFT_CHANCE
    note = "the plain net never left chance: degenerate comparison" if degenerate else ""
    out.append(core.accuracy_difference(CLAIMS["mnist_bn_higher"], best_bn, best_no, n_test,
                                        note=note))  # fmt: skip
    for cid, q in (("mnist_median_stable", "median"), ("mnist_spread_stable", "spread")):
        drift = {v: _drift(curves, v, q) for v in ("Baseline", "BN")}
        est, samples, n = core.paired_seed_samples(drift["Baseline"], drift["BN"])
        out.append(core.seed_claim(CLAIMS[cid], est, samples, n,
                                   details={v: d for v, d in drift.items()}))  # fmt: skip
    return out


def _drift(curves, variant: str, what: str) -> dict:
    """Per seed: |change| of the probed sigmoid input's median (or 15–85th spread) from the first
    evaluation after initialisation to the last (Figure 1 b/c)."""
    p = {q: _seed_curves(curves, "mnist", variant, q) for q in ("p15", "p50", "p85")}
    out = {}
    for sd in p["p50"]:
        if what == "median":
            series = p["p50"][sd][1]
        else:
            series = p["p85"][sd][1] - p["p15"][sd][1]
        out[int(sd)] = float(abs(series[-1] - series[min(1, len(series) - 1)]))
    return out


def variants_claims(curves: pa.Table, finals: list[dict], n_test: int) -> list[core.ClaimResult]:
    have = {f["variant"] for f in finals}
    out = [
        _steps_claim(
            CLAIMS["bn_baseline_faster"], curves, "variants", "Baseline", "BN-Baseline", "Baseline"
        ),  # fmt: skip
        _steps_claim(
            CLAIMS["bn_x5_faster"], curves, "variants", "BN-Baseline", "BN-x5", "Baseline"
        ),  # fmt: skip
    ]
    for cid, a, b in (("bn_baseline_higher", "BN-Baseline", "Baseline"),
                      ("bn_x30_over_x5", "BN-x30", "BN-x5"),
                      ("sigmoid_trains_with_bn", "BN-x5-Sigmoid", "Baseline-Sigmoid"),
                      ("x5_needs_bn", "BN-x5", "Baseline-x5"),
                      ("x30_needs_bn", "BN-x30", "Baseline-x30")):  # fmt: skip
        if a not in have or b not in have:
            out.append(core.not_measured(CLAIMS[cid], f"variant {b if a in have else a} not in "
                                         "variants.variants"))  # fmt: skip
            continue
        out.append(core.accuracy_difference(CLAIMS[cid], _best_by_seed(finals, a),
                                            _best_by_seed(finals, b), n_test))  # fmt: skip
    if "Baseline-Sigmoid" in have:
        out.append(core.accuracy_level(CLAIMS["sigmoid_without_bn_chance"],
                                       _best_by_seed(finals, "Baseline-Sigmoid"), n_test))  # fmt: skip
    else:
        out.append(core.not_measured(CLAIMS["sigmoid_without_bn_chance"],
                                     "Baseline-Sigmoid not in variants.variants"))  # fmt: skip
    return out


def batch_size_claims(finals: list[dict], n_test: int) -> list[core.ClaimResult]:
    def acc(variant: str, key: str = "test_acc") -> list[float]:
        return [float(f[key]) for f in finals if f["variant"] == variant and key in f]

    sizes = sorted({int(f["variant"].rsplit("-m", 1)[1]) for f in finals})
    out = []
    if 1 in sizes:
        plain = np.mean(acc("Baseline-m1"))
        note = (f"the plain net is at chance too at m = 1 ({plain:.3f}): that is the equal-example "
                "budget's few steps, not BN" if plain < LEFT_CHANCE else "")  # fmt: skip
        out.append(core.accuracy_level(CLAIMS["m1_bn_chance"], acc("BN-m1"), n_test, note=note))
    else:
        out.append(core.not_measured(CLAIMS["m1_bn_chance"], "m = 1 not in batch_size.sizes"))
    # the smallest m > 1 at which the plain net has left chance: below it nothing is compared
    usable = [m for m in sizes if m > 1 and np.mean(acc(f"Baseline-m{m}")) >= LEFT_CHANCE]
    skipped = [m for m in sizes if m > 1 and m not in usable and (not usable or m < usable[0])]
    if not usable:
        for cid in ("small_m_bn_below_plain", "small_m_batch_stats_gap"):
            out.append(core.not_measured(CLAIMS[cid], "the plain net is at chance at every m > 1"))
        return out
    m = usable[0]
    note = f"m = {m}" + (f"; m = {skipped} left out: the plain net is at chance" if skipped else "")
    out.append(core.accuracy_difference(CLAIMS["small_m_bn_below_plain"], acc(f"Baseline-m{m}"),
                                        acc(f"BN-m{m}"), n_test, note=note))  # fmt: skip
    out.append(core.accuracy_difference(CLAIMS["small_m_batch_stats_gap"], acc(f"BN-m{m}"),
                                        acc(f"BN-m{m}", "acc_batch_stats"), n_test, note=note))  # fmt: skip
    return out
