"""The ``report`` step of the generalization pipeline: tables and figures beside Zhang et al. 2017.

Writes ``sweep.parquet`` (one row per trial of every network experiment), ``curves.parquet``,
Figure 1a/1b/1c, the capacity-measure plot, ``report.md`` and the headline ``metrics.json``.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.engine import StepContext

# Table 1 (CIFAR-10, % train / test) and parameter counts, REFERENCE.md §4 / the paper's Table 1
PAPER_TABLE1 = {
    # regulariser names joined in the runs' order (experiments.regulariser_label: wd, crop, dropout)
    ("small_inception", "wd+crop", "true_labels"): (100.0, 89.05),
    ("small_inception", "none", "true_labels"): (100.0, 85.75),
    ("small_inception", "none", "random_labels"): (100.0, 9.78),
    ("small_inception_no_bn", "none", "true_labels"): (100.0, 82.00),
    ("small_inception_no_bn", "none", "random_labels"): (100.0, 10.12),
    ("small_alexnet", "wd+crop", "true_labels"): (99.90, 81.22),
    ("small_alexnet", "none", "true_labels"): (100.0, 76.07),
    ("small_alexnet", "none", "random_labels"): (99.82, 9.86),
    ("mlp_3x512", "none", "true_labels"): (100.0, 52.39),
    ("mlp_3x512", "none", "random_labels"): (100.0, 10.48),
    ("mlp_1x512", "none", "true_labels"): (100.0, 50.51),
    ("mlp_1x512", "none", "random_labels"): (99.34, 10.61),
}
PAPER_PARAMS = {
    "small_inception": 1_649_402,
    "small_inception_no_bn": 1_649_402,
    "small_alexnet": 1_387_786,
    "mlp_3x512": 1_735_178,
    "mlp_1x512": 1_209_866,
}
NETS = ("randomization", "corruption", "regularizers")


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e9:
        return str(int(v))  # step counts, accuracies of exactly 0 or 1
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.{digits}f}"
    return str(v)


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return out + [""]


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else None


def _fitted_mean(rs: list[dict]) -> float | None:
    """Mean steps to fit when every seed fitted, else None: averaging only the seeds that fitted
    would hide the slow convergence the table is there to show."""
    steps = [r["steps_to_fit"] for r in rs]
    return None if not steps or any(s is None for s in steps) else float(np.mean(steps))


def _scaled(value: float | None, factor: float = 1.0, offset: float = 0.0) -> float | None:
    """offset + factor * value, None (printed "–") where there is no value."""
    return None if value is None else offset + factor * value


def _group(rows: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def _plots(ctx: StepContext, rows: list[dict], curves: list[dict], kernels: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rand = [c for c in curves if c["experiment"] == "randomization"]
    if rand:
        models = sorted({c["model"] for c in rand})
        fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
        for ax, model in zip(axes[0], models, strict=True):
            by = _group([c for c in rand if c["model"] == model and c["seed"] == min(
                c2["seed"] for c2 in rand)], "condition")  # fmt: skip
            for (cond,), pts in sorted(by.items()):
                ax.plot([p["step"] for p in pts], [p["loss"] for p in pts], label=cond)
            ax.set(title=f"{model}: training loss", xlabel="step", ylabel="loss")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(ctx.out_dir / "fig1a_loss.png", dpi=110)
        plt.close(fig)
    corr = [r for r in rows if r["experiment"] == "corruption"]
    if corr:
        for name, ylabel, value in (
            ("fig1b_convergence.png", "steps to fit / steps at p=0", "ratio"),
            ("fig1c_test_error.png", "test error", "error"),
        ):
            fig, ax = plt.subplots(figsize=(5, 3.6))
            for (model,), rs in sorted(_group(corr, "model").items()):
                by_p = {p: g for (p,), g in _group(rs, "p").items()}
                base = _mean(r["steps_to_fit"] for r in by_p.get(0.0, []))
                ps = sorted(by_p)
                if value == "ratio":
                    ys = [(_mean(r["steps_to_fit"] for r in by_p[p]) or np.nan) / (base or np.nan)
                          for p in ps]  # fmt: skip
                else:
                    ys = [1 - (_mean(r["test_acc"] for r in by_p[p]) or np.nan) for p in ps]
                ax.plot(ps, ys, "o-", label=model)
            if value == "error":
                for (kernel,), ks in sorted(_group(kernels, "kernel").items()):
                    ax.plot([k["p"] for k in ks], [k["test_error"] for k in ks], "s--",
                            label=f"min-norm {kernel}", alpha=0.7)  # fmt: skip
                ax.axhline(0.9, color="grey", lw=0.8, ls=":")  # chance with 10 classes
            ax.set(xlabel="label corruption p", ylabel=ylabel)
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(ctx.out_dir / name, dpi=110)
            plt.close(fig)
    if corr or kernels:
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
        for (model,), rs in sorted(_group(corr, "model").items()):
            by_p = sorted(_group(rs, "p").items())
            ps = [p for (p,), _ in by_p]
            axes[0].plot(ps, [_mean(r["weight_l2"] for r in g) for _, g in by_p], "o-", label=model)
            axes[1].plot(ps, [_mean(r["weight_l2"] / r["margin_p10"] if r["margin_p10"] and
                                    r["margin_p10"] > 0 else None for r in g) or np.nan
                              for _, g in by_p], "o-", label=model)  # fmt: skip
        for (kernel,), ks in sorted(_group(kernels, "kernel").items()):
            axes[2].plot([k["p"] for k in ks], [k["norm"] for k in ks], "s-", label=kernel)
        for ax, title in zip(axes, ("ℓ2 norm of the weights", "ℓ2 norm / 10th-pct. margin",
                                    "min-norm interpolant ‖f‖ (RKHS)"), strict=True):  # fmt: skip
            ax.set(title=title, xlabel="label corruption p")
            if ax.lines:
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(ctx.out_dir / "capacity.png", dpi=110)
        plt.close(fig)


def _claims_section(ctx, rows, expressivity) -> list[str]:
    """The paper's claims with intervals over seeds and train / test examples (issue 21)."""
    from pipelines import claims as core
    from pipelines.generalization import claims as gen

    results = []
    if rows:  # the nets' data (a run of §5 or Theorem 1 alone has no dataset step)
        meta = json.loads((ctx.input_dir("dataset") / "meta.json").read_text())
        n_train, n_test = meta["num_train"], meta["num_test"]
    if any(r["experiment"] == "randomization" for r in rows):
        results += gen.randomization_claims(rows, n_train, n_test)
    if any(r["experiment"] == "corruption" for r in rows):
        results += gen.corruption_claims(rows, n_test)
    if any(r["experiment"] == "regularizers" for r in rows):
        results += gen.regularizer_claims(rows, n_train)
    if expressivity:
        results += gen.expressivity_claims(expressivity)
    core.write(ctx.out_dir, results, pipeline="generalization")
    return core.markdown_section(results) if results else []


def write_report(ctx: StepContext, *, experiments: tuple[str, ...], toy_data: str = "") -> None:
    rows, curves = [], []
    for e in NETS:
        if e in experiments:
            d = ctx.input_dir(e)
            rows += pq.read_table(d / "rows.parquet").to_pylist()
            curves += pq.read_table(d / "curves.parquet").to_pylist()
    if rows:  # every sweep step writes the same schemas (experiments.py)
        first = ctx.input_dir(next(e for e in NETS if e in experiments))
        for name, items in (("sweep.parquet", rows), ("curves.parquet", curves)):
            schema = pq.read_schema(first / ("rows.parquet" if name == "sweep.parquet" else name))
            pq.write_table(pa.Table.from_pylist(items, schema=schema), ctx.out_dir / name)
    kernels: list[dict] = []
    if "min_norm" in experiments:
        shutil.copy2(ctx.input_dir("min_norm") / "min_norm.parquet", ctx.out_dir)
        kernels = pq.read_table(ctx.out_dir / "min_norm.parquet").to_pylist()
        if (ctx.input_dir("min_norm") / "svc.json").exists():
            svc = json.loads((ctx.input_dir("min_norm") / "svc.json").read_text())
            shutil.copy2(ctx.input_dir("min_norm") / "svc.json", ctx.out_dir)
            kernels.append({"p": 0.0, "labels_changed_frac": 0.0, "method": "libsvm",
                            "max_residual": None, "train_error": None, "norm": None, **svc})  # fmt: skip
    expressivity: list[dict] = []
    if "expressivity" in experiments:
        shutil.copy2(ctx.input_dir("expressivity") / "expressivity.parquet", ctx.out_dir)
        expressivity = pq.read_table(ctx.out_dir / "expressivity.parquet").to_pylist()
    _plots(ctx, rows, curves, [k for k in kernels if k["kernel"] != "svc_rbf"])
    metrics = _metrics(rows, kernels, expressivity)
    metrics["toy_data"] = bool(toy_data)
    ctx.write_json("metrics.json", metrics)
    md = _markdown(rows, kernels, expressivity, metrics)
    md += "\n".join(["", *_claims_section(ctx, rows, expressivity)])
    if toy_data:  # issue 20: a run on generated or toy data says so in its first line
        md = (
            f"**Not the paper's data**: {toy_data} — the paper's numbers below are reference "
            "points, not targets.\n\n" + md
        )
    (ctx.out_dir / "report.md").write_text(md)


def _metrics(rows: list[dict], kernels: list[dict], expressivity: list[dict]) -> dict:
    m: dict = {}
    rand = [r for r in rows if r["experiment"] == "randomization" and r["error"] is None]
    if rand:
        by = _group(rand, "model", "condition")
        for (model, cond), rs in by.items():
            m[f"{cond}_{model}_train_acc"] = _mean(r["train_acc"] for r in rs)
            m[f"{cond}_{model}_test_acc"] = _mean(r["test_acc"] for r in rs)
            base = _mean(r["steps_to_fit"] for r in by.get((model, "true_labels"), []))
            fit = _mean(r["steps_to_fit"] for r in rs)
            if base and fit and all(r["steps_to_fit"] is not None for r in rs):
                m[f"fit_time_ratio_{cond}_{model}"] = fit / base
        rl = [r for r in rand if r["condition"] == "random_labels"]
        if rl:
            m["random_labels_train_acc"] = min(r["train_acc"] for r in rl)
            m["random_labels_test_acc"] = max(r["test_acc"] for r in rl)
    corr = [r for r in rows if r["experiment"] == "corruption" and r["error"] is None]
    for (p,), rs in _group(corr, "p").items():
        m[f"corruption_test_error_p{p:g}"] = 1 - _mean(r["test_acc"] for r in rs)
    for r in kernels:
        m[f"min_norm_{r['kernel']}_test_error_p{r['p']:g}"] = r["test_error"]
        if r["norm"] is not None:
            m[f"min_norm_{r['kernel']}_norm_p{r['p']:g}"] = r["norm"]
    if kernels and "n_train" in kernels[0]:
        m["min_norm_n_train"] = kernels[0]["n_train"]
    m["trials_failed"] = sum(r["error"] is not None for r in rows)
    return m


def _markdown(rows: list[dict], kernels: list[dict], expressivity: list[dict], m: dict) -> str:
    md = ["# Rethinking generalization (Zhang et al. 2017) — reproduction report", ""]
    rand = [r for r in rows if r["experiment"] == "randomization"]
    if rand:
        md += ["## Randomization tests (§2, Figure 1a)", "",
               "Paper: every model fits every condition to 100% training accuracy with the same "
               "schedule; random labels slow fitting by a small constant factor; random pixels and "
               "Gaussian inputs start converging faster than random labels.", ""]  # fmt: skip
        body = []
        for (model, cond), rs in sorted(_group(rand, "model", "condition").items()):
            ratio = m.get(f"fit_time_ratio_{cond}_{model}")
            body.append([model, cond, _mean(r["steps_to_fit"] for r in rs), ratio,
                         _mean(r["train_acc"] for r in rs), _mean(r["test_acc"] for r in rs)])  # fmt: skip
        md += _table(["model", "condition", "steps to fit", "× true labels", "train acc",
                      "test acc"], body)  # fmt: skip
        md += ["![Figure 1a](fig1a_loss.png)", ""]
    corr = [r for r in rows if r["experiment"] == "corruption"]
    if corr:
        md += ["## Label corruption (Figure 1b, 1c)", "",
               "Paper: convergence slows as p grows; test error rises towards 90% (chance) at "
               "p = 1 while training error stays 0.", ""]  # fmt: skip
        body = []
        for (model, p), rs in sorted(_group(corr, "model", "p").items()):
            base = _fitted_mean([r for r in corr if r["model"] == model and r["p"] == 0])
            fit = _fitted_mean(rs)
            fitted = sum(r["steps_to_fit"] is not None for r in rs)
            body.append([model, p, f"{fitted}/{len(rs)}", fit, fit / base if fit and base else None,
                         _mean(r["train_acc"] for r in rs),
                         _scaled(_mean(r["test_acc"] for r in rs), -1.0, 1.0),
                         _mean(r["weight_l2"] for r in rs)])  # fmt: skip
        md += _table(["model", "p", "seeds fitted", "steps to fit (all fitted)", "× p=0",
                      "train acc", "test error", "‖w‖₂"], body)  # fmt: skip
        md += ["![Figure 1b](fig1b_convergence.png) ![Figure 1c](fig1c_test_error.png)", ""]
    regs = [r for r in rows if r["experiment"] == "regularizers"]
    if regs:
        md += ["## Regularisers (Table 1 shape)", "",
               "Paper (CIFAR-10, % train / test): regularisers are neither necessary nor "
               "sufficient; every model fits random labels with or without them.", ""]  # fmt: skip
        body = []
        for (model, reg, cond), rs in sorted(
            _group(regs, "model", "regularisers", "condition").items()
        ):
            paper = PAPER_TABLE1.get((model, reg, cond))
            body.append([model, _fmt(rs[0]["num_params"]), f"{PAPER_PARAMS.get(model, '–')}", reg, cond,
                         _scaled(_mean(r["train_acc"] for r in rs), 100.0),
                         _scaled(_mean(r["test_acc"] for r in rs), 100.0),
                         f"{paper[0]} / {paper[1]}" if paper else "–"])  # fmt: skip
        md += _table(["model", "params", "params (paper)", "regularisers", "labels", "train %",
                      "test %", "paper train / test %"], body)  # fmt: skip
    if expressivity:
        md += ["## Theorem 1: finite-sample expressivity (§4)", "",
               "c(x) = Σ_j w_j max(⟨a,x⟩ − b_j, 0) with 2n + d weights fits any n targets. The "
               "fit is exact in real arithmetic; in float64 the error grows with the condition of "
               "the lower-triangular A, whose smallest diagonal is half the smallest gap between "
               "neighbouring projections ⟨a, z_i⟩ (close neighbours with different targets need "
               "large, cancelling output weights).", ""]  # fmt: skip
        md += _table(["inputs", "n", "d", "targets", "weights (2n+d)", "max |c(x_i)−y_i|",
                      "÷ float64 bound", "min A_ii", "max |w|", "cond(A)", "duplicates dropped"],
                     [[r["setting"], r["n"], r["d"], r["targets"], r["weights_used"],
                       r["max_abs_error"], r.get("rounding_ratio"), r["min_diagonal"],
                       r["max_abs_weight"], r["condition_number"], r["duplicates_dropped"]]
                      for r in expressivity])  # fmt: skip
        md += ["", "“÷ float64 bound”: the error over 2n·ε·Σ_j |w_j| h_ij + ε|y_i|, what "
               "forward substitution and the n-term sum may leave in float64; ≤ 1 is an exact fit "
               "to machine precision (a bias moved by 1e-3 of a gap gives 1e4–1e6).", ""]  # fmt: skip
    if kernels:
        md += ["## Minimum-norm kernel interpolation (§5)", "",
               "Paper: exact solves of Kα = y reach 1.2% test error on MNIST (raw pixels) and "
               "0.6% with Gabor features; the norm does not by itself predict generalisation. "
               "Below, the norm sqrt(αᵀKα) of each interpolant against label corruption p (read "
               "the numbers: nothing here assumes it grows); `pinv` marks a rank-deficient K, "
               "solved in the least-squares sense. cond(K) above ~1e8 means the exact solve fits "
               "noise at the data's rounding level (e.g. the linear kernel on 8×8 digits upscaled "
               "and rounded to 28×28: rank 64 before rounding), not structure.", ""]  # fmt: skip
        md += _table(["kernel", "n", "p", "labels changed", "solve", "cond(K)", "max |Kα−y|",
                      "train error", "test error", "norm", "seconds"],
                     [[r["kernel"], r.get("n_train"), r["p"], r["labels_changed_frac"],
                       r["method"], r.get("condition_number"), r["max_residual"],
                       r["train_error"], r["test_error"], r["norm"], r.get("seconds")]
                      for r in kernels])  # fmt: skip
        if any(r["kernel"] == "svc_rbf" for r in kernels):
            md += ["`svc_rbf`: scikit-learn's SVC (RBF, gamma \"scale\") on the same clean "
                   "training images — not an interpolant, the published Fashion-MNIST baseline "
                   "(0.897 accuracy on all 60,000). `seconds` of a kernel row: building and "
                   "factorising K (once for every p) plus that p's solve.", ""]  # fmt: skip
    if rows or kernels:
        md += ["![capacity measures](capacity.png)", ""]
    md += ["## Headline metrics", "", "```", json.dumps(m, indent=1, sort_keys=True), "```", ""]
    return "\n".join(md)
