"""``report.md`` of a sweep: the trials table, the best trial and the metric against each swept key."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def log_x(values) -> bool:
    """A log axis for positive values spanning two decades or more (C = 0.0001 … 1)."""
    xs = np.asarray(values, dtype=float)
    return bool(len(xs) and (xs > 0).all() and xs.max() / xs.min() >= 100)


def honest_ylim(values) -> tuple[float, float]:
    """A y-range that does not blow up small differences: 0-1 for fractions (accuracy, mAP),
    else the data padded to at least 10% of its magnitude (issue 22: 0.001 looked dramatic)."""
    ys = np.asarray(values, dtype=float)
    lo, hi = float(ys.min()), float(ys.max())
    if lo >= 0 and hi <= 1:
        return 0.0, 1.02
    span = max(hi - lo, 0.1 * max(abs(lo), abs(hi)), 1e-12)
    mid = (lo + hi) / 2
    return mid - 0.6 * span, mid + 0.6 * span


def plot_metric_vs(path: Path, key: str, rows: list[dict], metric: str) -> dict:
    """Every trial as a point, and the mean over the other swept keys as a line; log x where the
    values span decades. Returns the axes' scale and limits (for tests)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["metric"] is not None]
    values = [r[key] for r in ok]
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    if numeric:
        xs = np.array(values, dtype=float)
        ax.scatter(xs, [r["metric"] for r in ok], s=14, alpha=0.6, label="trials")
        levels = np.unique(xs)
        means = [
            np.mean([r["metric"] for r, x in zip(ok, xs, strict=True) if x == lv]) for lv in levels
        ]
        ax.plot(levels, means, "-o", lw=1.5, label="mean")
        if log_x(xs):
            ax.set_xscale("log")
        ax.legend(fontsize=8)
    else:
        labels = sorted({repr(v) for v in values})
        pos = {lab: i for i, lab in enumerate(labels)}
        ax.scatter([pos[repr(v)] for v in values], [r["metric"] for r in ok], s=14, alpha=0.6)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ys = [r["metric"] for r in ok]
    ax.set_ylim(*honest_ylim(ys))
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.set_title(f"spread of {metric}: {max(ys) - min(ys):.3g}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    out = {"xscale": ax.get_xscale(), "ylim": ax.get_ylim()}
    plt.close(fig)
    return out


def write_report(directory: Path, name: str, plan, rows: list[dict], summary: dict) -> None:
    keys = list(plan.space)
    lines = [
        f"# Sweep of `{name}` (preset `{plan.preset}`)",
        "",
        f"{summary['trials']} trials over {', '.join(f'`{k}`' for k in keys)}; objective "
        f"`{plan.metric}` ({plan.mode}). Fixed overrides: "
        + (", ".join(f"`{k}={v}`" for k, v in plan.overrides.items()) or "none")
        + ".",
        "",
        f"Wall time {summary['wall_s']:.1f} s for {summary['trial_wall_s_sum']:.1f} s of trial "
        "time: trials share every step whose inputs and params are equal (computed once, by the "
        "first trial that needs it).",
        "",
    ]
    best = summary["best"]
    if best:
        lines += [
            f"**Best**: `{plan.metric}` = {best['value']:.4g} at "
            + ", ".join(f"`{k}={_fmt(v)}`" for k, v in best["config"].items()),
            "",
        ]
    lines += [
        "| " + " | ".join([*keys, plan.metric, "wall s", "computed steps", "error"]) + " |",
        "|" + "---|" * (len(keys) + 4),
    ]
    for r in rows:
        cells = [_fmt(r[k]) for k in keys] + [
            _fmt(r["metric"]),
            _fmt(r["trial_wall_s"]),
            ", ".join(r["computed_steps"]) or "(all cached)",
            (r["error"][:80] + "…") if len(r["error"]) > 80 else r["error"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for key in keys:
        png = f"sweep_{key.replace('.', '_')}.png"
        if any(r["metric"] is not None for r in rows):
            plot_metric_vs(directory / png, key, rows, plan.metric)
            lines += [f"![{plan.metric} against {key}]({png})", ""]
    (directory / "report.md").write_text("\n".join(lines))
