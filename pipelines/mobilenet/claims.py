"""MobileNetV2's claims (Table 4 costs, Figure 5's accuracy–MAdds shape, Figure 6's ablations) as
data: costs are exact counts, accuracies are bootstrapped over seeds and test examples."""

from __future__ import annotations

import numpy as np

from pipelines import claims as core
from pipelines.claims import Claim


def _cost(cid: str, statement: str, paper_m: float) -> Claim:
    """Within 1% of the paper's count: our count is exact, the paper's is rounded to 1M."""
    return Claim(cid, statement, "Table 4", "MAdds, 1000 classes", "≈", paper_m * 1e6,
                 tolerance=0.01 * paper_m * 1e6, paper_value=paper_m * 1e6, unit="M",
                 scale=1e-6, digits=1)  # fmt: skip


def _acc(cid: str, statement: str, source: str, metric: str) -> Claim:
    return Claim(cid, statement, source, metric, ">", 0.0, unit="points", scale=100)


CLAIMS = {
    c.id: c
    for c in (
        _cost("madds_v2_1.0", "MobileNetV2 1.0 at 224 px costs 300M MAdds", 300),
        _cost("madds_v2_1.4", "MobileNetV2 1.4 at 224 px costs 585M MAdds", 585),
        _cost(
            "madds_v1_1.0", "MobileNetV1 1.0 at 224 px costs 575M MAdds (V1's own paper: 569M)", 575
        ),  # fmt: skip
        Claim(
            "accuracy_rises_with_madds",
            "Accuracy rises with MAdds across widths and resolutions",
            "Fig. 5",
            "Spearman ρ(MAdds, accuracy) over the V2 points",
            ">",
            0.0,
            digits=2,
        ),  # fmt: skip
        _acc(
            "v2_over_v1",
            "MobileNetV2 beats MobileNetV1 at the same width and resolution, with fewer MAdds",
            "Fig. 5",
            "acc(V2) − acc(V1), same α and resolution",
        ),  # fmt: skip
        _acc(
            "linear_over_relu6",
            "A linear bottleneck beats ReLU6 in the bottleneck",
            "Fig. 6a",
            "acc(linear) − acc(ReLU6 bottleneck)",
        ),  # fmt: skip
        _acc(
            "shortcut_bottleneck_over_expansion",
            "Shortcuts between bottlenecks beat shortcuts between expansions",
            "Fig. 6b",
            "acc(bottleneck shortcut) − acc(expansion shortcut)",
        ),  # fmt: skip
        _acc(
            "shortcut_expansion_over_none",
            "Shortcuts between expansions beat no residual",
            "Fig. 6b",
            "acc(expansion shortcut) − acc(no residual)",
        ),  # fmt: skip
    )
}
PAPER_MADDS_M = {"madds_v2_1.0": ("mobilenetv2", 1.0, 300), "madds_v2_1.4": ("mobilenetv2", 1.4, 585),
                 "madds_v1_1.0": ("mobilenetv1", 1.0, 575)}  # fmt: skip


def cost_claims(comp: list[dict]) -> list[core.ClaimResult]:
    """Exact counts: the interval is the point (no sampling)."""
    by_key = {(r["model"], r["width"], r["resolution"]): r for r in comp}
    out = []
    for cid, (model, width, paper_m) in PAPER_MADDS_M.items():
        r = by_key.get((model, width, 224))
        if r is None:
            out.append(
                core.not_measured(CLAIMS[cid], f"{model} {width}@224 not in the complexity grid")
            )
            continue
        m = float(r["madds"])
        out.append(core.evaluate(CLAIMS[cid], m, np.array([m]), method="exact count", n=1,
                                 note=f"{100 * (m / (paper_m * 1e6) - 1):+.1f}% of the paper's"))  # fmt: skip
    return out


def _acc_by_seed(rows: list[dict], **match) -> list[float]:
    return [r["accuracy"] for r in rows if all(r[k] == v for k, v in match.items())]


def sweep_claims(
    width_rows: list[dict], abl_rows: list[dict], n_test: int
) -> list[core.ClaimResult]:
    out = [_spearman_claim(width_rows, n_test)]
    v1 = sorted(
        {(r["width"], r["resolution"]) for r in width_rows if r["variant"] == "mobilenetv1"}
    )
    pair = next((p for p in v1 if _acc_by_seed(width_rows, variant="mobilenetv2", width=p[0],
                                                resolution=p[1])), None)  # fmt: skip
    if pair is None:
        out.append(
            core.not_measured(CLAIMS["v2_over_v1"], "no V1 point with a V2 twin in the sweep")
        )
    else:
        w, res = pair
        out.append(core.accuracy_difference(
            CLAIMS["v2_over_v1"],
            _acc_by_seed(width_rows, variant="mobilenetv2", width=w, resolution=res),
            _acc_by_seed(width_rows, variant="mobilenetv1", width=w, resolution=res),
            n_test, note=f"α {w} at {res} px",
        ))  # fmt: skip
    for cid, a, b in (("linear_over_relu6", "mobilenetv2", "relu6_bottleneck"),
                      ("shortcut_bottleneck_over_expansion", "mobilenetv2", "shortcut_expansion"),
                      ("shortcut_expansion_over_none", "shortcut_expansion", "no_shortcut")):  # fmt: skip
        out.append(core.accuracy_difference(CLAIMS[cid], _acc_by_seed(abl_rows, variant=a),
                                            _acc_by_seed(abl_rows, variant=b), n_test))  # fmt: skip
    return out


def _spearman_claim(width_rows: list[dict], n_test: int) -> core.ClaimResult:
    """ρ between MAdds and the seed-mean accuracy of each V2 point; a resample redraws each
    point's seeds and each trial's test examples (Binomial(n_test, acc))."""
    from scipy.stats import spearmanr

    points: dict[tuple, list[dict]] = {}
    for r in width_rows:
        if r["variant"] == "mobilenetv2":
            points.setdefault((r["width"], r["resolution"]), []).append(r)
    if len(points) < 3:
        return core.not_measured(CLAIMS["accuracy_rises_with_madds"], "fewer than 3 V2 points")
    keys = sorted(points)
    madds = np.array([points[k][0]["madds"] for k in keys], np.float64)
    accs = [np.array([r["accuracy"] for r in points[k]]) for k in keys]
    rng = np.random.default_rng(core.SEED)

    def rho(means):
        if np.ptp(means) == 0:
            return 0.0  # all equal: no ranking
        value = spearmanr(madds, means).statistic
        return float(value) if np.isfinite(value) else 0.0  # all equal: no ranking

    est = rho(np.array([a.mean() for a in accs]))
    samples = np.empty(core.RESAMPLES)
    for b in range(core.RESAMPLES):
        means = []
        for a in accs:
            pick = a[rng.integers(0, len(a), len(a))]
            means.append((rng.binomial(n_test, np.clip(pick, 0, 1)) / n_test).mean())
        samples[b] = rho(np.array(means))
    seeds = min(len(a) for a in accs)
    return core.evaluate(CLAIMS["accuracy_rises_with_madds"], est, samples,
                         method=f"bootstrap over {seeds}+ seeds × {n_test} test examples per point",
                         n=len(keys), note=f"{len(keys)} points")  # fmt: skip
