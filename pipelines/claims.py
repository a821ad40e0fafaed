"""Claims are data (DESIGN.md): each pipeline declares the paper's claims it tests, and its report
step evaluates them on the run's results with an uncertainty into ``claims.json``.

A :class:`Claim` is the paper's statement and number, the metric we measure and the comparison
that would confirm it. :func:`evaluate` turns an estimate and its bootstrap distribution into a
:class:`ClaimResult` with a 95% percentile interval and a verdict:

- ``holds``: the whole interval is on the claimed side of the no-effect value;
- ``fails``: the whole interval is on the other side (or the effect is exactly none on every
  resample, e.g. two nets both at chance);
- ``inconclusive``: the interval includes no effect, so the run cannot tell.

For ``≈`` claims ("test accuracy at chance") the claimed side is a band ``threshold ± tolerance``:
``holds`` when the interval lies inside it, ``fails`` when it lies wholly outside.

The resampling helpers are generic (items, seeds, binomial test examples); detection AP over test
images lives with the evaluator, in ``stages/detection/bootstrap.py``. Every verdict sentence a
report prints comes from :func:`sentence`, so no report carries fixed verdict text.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

RESAMPLES = 2000  # percentile bootstrap: enough for a stable 2.5/97.5 percentile
LEVEL = 0.95
SEED = 0  # every interval is reproducible: same results, same interval
VERDICTS = ("holds", "fails", "inconclusive")


@dataclass(frozen=True)
class Claim:
    """One claim of a paper, as a test on a metric.

    ``direction``: ``">"`` the metric must exceed ``threshold`` (the no-effect value: 0 for a
    difference, 1 for a ratio), ``"<"`` stay below it, ``"≈"`` stay within ``threshold ±
    tolerance``. ``paper_value`` is the paper's number in the metric's units (None where the paper
    gives a direction or a plot only); ``scale`` multiplies estimates for display (100 for
    percentage points).
    """

    id: str
    statement: str  # the paper's words (or REFERENCE.md's summary of them)
    source: str  # section / table / figure
    metric: str  # what we measure, in words
    direction: str = ">"
    threshold: float = 0.0
    tolerance: float = 0.0
    paper_value: float | None = None
    unit: str = ""  # "points", "steps", "" ...
    scale: float = 1.0
    digits: int | None = None  # decimals shown (default: 1 for points, 0 for steps, else 3)

    def __post_init__(self):
        if self.direction not in (">", "<", "≈"):
            raise ValueError(f"claim {self.id}: direction must be >, < or ≈, got {self.direction}")


@dataclass
class ClaimResult:
    claim: Claim
    estimate: float
    low: float
    high: float
    verdict: str
    method: str  # how the interval was made, e.g. "bootstrap over 20 test images"
    n: int  # resampled units (images, seeds, ...)
    note: str = ""  # what the reader must know to read this row (key, regime, ...)
    details: dict = field(default_factory=dict)

    def to_json(self, pipeline: str = "", run: str = "") -> dict:
        c = self.claim
        return {
            "pipeline": pipeline,
            "run": run,
            "claim": c.id,
            "statement": c.statement,
            "source": c.source,
            "metric": c.metric,
            "direction": c.direction,
            "threshold": c.threshold,
            "tolerance": c.tolerance,
            "paper_value": c.paper_value,
            "unit": c.unit,
            "scale": c.scale,
            "digits": c.digits,
            "estimate": _finite_or_none(self.estimate),
            "interval": [_finite_or_none(self.low), _finite_or_none(self.high)],
            "level": LEVEL,
            "verdict": self.verdict,
            "method": self.method,
            "n": self.n,
            "note": self.note,
            "details": self.details,
        }


def _finite_or_none(x: float) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


# ----------------------------------------------------------------------------------------------
# verdicts
def verdict(claim: Claim, low: float, high: float) -> str:
    """holds / fails / inconclusive for an interval ``[low, high]`` (see the module docstring)."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return "inconclusive"
    t = claim.threshold
    if claim.direction == "≈":
        lo, hi = t - claim.tolerance, t + claim.tolerance
        if lo <= low and high <= hi:
            return "holds"
        return "fails" if high < lo or low > hi else "inconclusive"
    sign = 1.0 if claim.direction == ">" else -1.0
    a, b = sorted((sign * (low - t), sign * (high - t)))  # the claimed side is > 0 now
    if a > 0:
        return "holds"
    if b < 0 or a == b == 0:  # resolved the other way, or exactly no effect on every resample
        return "fails"
    return "inconclusive"


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile bootstrap interval of ``samples (B,)``; NaN resamples are left out."""
    s = np.asarray(samples, np.float64)
    s = s[np.isfinite(s)]
    if not len(s):
        return float("nan"), float("nan")
    a = (1 - level) / 2
    lo, hi = np.quantile(s, [a, 1 - a])
    return float(lo), float(hi)


def evaluate(
    claim: Claim,
    estimate: float,
    samples: np.ndarray,
    *,
    method: str,
    n: int,
    note: str = "",
    details: dict | None = None,
) -> ClaimResult:
    """A claim's result from its point ``estimate`` and the bootstrap ``samples (B,)``."""
    low, high = percentile_interval(samples)
    return ClaimResult(claim, float(estimate), low, high, verdict(claim, low, high), method, n,
                       note, details or {})  # fmt: skip


def not_measured(claim: Claim, why: str) -> ClaimResult:
    """A claim this run could not measure (a step not run, a condition missing): inconclusive."""
    nan = float("nan")
    return ClaimResult(claim, nan, nan, nan, "inconclusive", "not measured", 0, why)


# ----------------------------------------------------------------------------------------------
# resampling
def bootstrap(
    statistic: Callable[[np.ndarray], float],
    n: int,
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> np.ndarray:
    """``statistic(idx)`` on ``resamples`` draws of ``n`` indices with replacement -> ``(B,)``.

    The statistic receives the index array, so paired data (two models on the same images or
    seeds) resample together.
    """
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    return np.array([statistic(i) for i in idx], np.float64)


def bootstrap_mean(values: Sequence[float], **kw) -> np.ndarray:
    """Bootstrap distribution of the mean of ``values (n,)``."""
    v = np.asarray(values, np.float64)
    return bootstrap(lambda i: v[i].mean(), len(v), **kw)


def accuracy_samples(
    acc_by_seed: Sequence[float], n_test: int, *, resamples: int = RESAMPLES, seed: int = SEED
) -> np.ndarray:
    """Bootstrap of a mean test accuracy over seeds *and* test examples ``(B,)``.

    Seeds are resampled with replacement; each drawn seed's accuracy is then redrawn as
    Binomial(n_test, acc) / n_test, the bootstrap over ``n_test`` test examples when only the
    accuracy (not each prediction) is stored. Two models' draws are independent, which ignores
    the pairing of their test examples and so errs towards wider intervals (towards
    "inconclusive", never towards a false "holds").
    """
    acc = np.asarray(acc_by_seed, np.float64)
    rng = np.random.default_rng(seed)
    pick = acc[rng.integers(0, len(acc), size=(resamples, len(acc)))]
    if n_test > 0:
        pick = rng.binomial(n_test, np.clip(pick, 0, 1)) / n_test
    return pick.mean(1)


def paired_seed_samples(
    a_by_seed: Mapping, b_by_seed: Mapping, fn: Callable[[np.ndarray, np.ndarray], float] = None,
    *, resamples: int = RESAMPLES, seed: int = SEED,
) -> tuple[float, np.ndarray, int]:  # fmt: skip
    """``fn(a, b)`` (default: mean(a) − mean(b)) over the seeds both have, resampling seeds
    together. Returns (estimate, samples (B,), number of seeds)."""
    seeds = sorted(set(a_by_seed) & set(b_by_seed))
    a = np.array([a_by_seed[s] for s in seeds], np.float64)
    b = np.array([b_by_seed[s] for s in seeds], np.float64)
    fn = fn or (lambda x, y: float(np.mean(x) - np.mean(y)))
    if not seeds:
        return float("nan"), np.array([np.nan]), 0
    samples = bootstrap(lambda i: fn(a[i], b[i]), len(seeds), resamples=resamples, seed=seed)
    return fn(a, b), samples, len(seeds)


def seed_claim(
    claim: Claim, estimate: float, samples: np.ndarray, n: int, *, note: str = "", details=None
) -> ClaimResult:
    """A claim measured once per seed and bootstrapped over seeds: with fewer than 2 seeds there
    is no spread to resample, so no interval and no verdict but "inconclusive"."""
    if n < 2:
        nan = float("nan")
        why = f"{n} seed: no spread to resample, run more seeds" + (f"; {note}" if note else "")
        return ClaimResult(claim, float(estimate), nan, nan, "inconclusive",
                           f"bootstrap over {n} seed", n, why, details or {})  # fmt: skip
    return evaluate(claim, estimate, samples, method=f"bootstrap over {n} seeds", n=n,
                    note=note, details=details)  # fmt: skip


def accuracy_difference(
    claim: Claim, a_by_seed: Sequence[float], b_by_seed: Sequence[float], n_test: int, *,
    note: str = "", details=None,
) -> ClaimResult:  # fmt: skip
    """mean(a) − mean(b) of test accuracies, bootstrapped over seeds and ``n_test`` test examples
    (see :func:`accuracy_samples`); each side resampled independently."""
    a, b = np.asarray(a_by_seed, np.float64), np.asarray(b_by_seed, np.float64)
    if not len(a) or not len(b):
        return not_measured(claim, "a side of the comparison has no run")
    samples = accuracy_samples(a, n_test, seed=SEED) - accuracy_samples(b, n_test, seed=SEED + 1)
    n = min(len(a), len(b))
    return evaluate(claim, float(a.mean() - b.mean()), samples,
                    method=f"bootstrap over {n} seed{'s' if n > 1 else ''} × {n_test} test examples",
                    n=n, note=note, details=details)  # fmt: skip


def accuracy_level(
    claim: Claim, acc_by_seed: Sequence[float], n_test: int, *, note: str = "", details=None,
    examples: str = "test examples",
) -> ClaimResult:  # fmt: skip
    """A mean accuracy against a level (e.g. chance), over seeds and the ``n_test`` examples it
    was measured on (``examples`` names them: test, or training for a fit)."""
    a = np.asarray(acc_by_seed, np.float64)
    if not len(a):
        return not_measured(claim, "no run of this condition")
    return evaluate(claim, float(a.mean()), accuracy_samples(a, n_test),
                    method=f"bootstrap over {len(a)} seed{'s' if len(a) > 1 else ''} × {n_test} "
                    f"{examples}", n=len(a), note=note, details=details)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# text: every verdict sentence is made here
def _fmt(x: float | None, claim: Claim, signed: bool) -> str:
    if x is None or not np.isfinite(x):
        return "–"
    v = x * claim.scale
    digits = claim.digits
    if digits is None:
        if claim.unit == "steps" and abs(v) >= 1e6:  # the paper's ImageNet step counts
            return f"{v / 1e6:+.1f}M" if signed else f"{v / 1e6:.1f}M"
        if claim.unit not in ("points", "steps", "%") and 0 < abs(v) < 1e-3:
            return f"{v:+.1e}" if signed else f"{v:.1e}"  # e.g. Theorem 1's 1e-9 errors
        digits = {"points": 1, "steps": 0}.get(claim.unit, 1 if claim.scale == 100 else 3)
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def _signed(claim: Claim) -> bool:
    return claim.direction != "≈" and claim.threshold == 0


def ours(r: ClaimResult) -> str:
    """ "+1.6 [−2.1, +5.0]": the estimate and its interval in the claim's display units."""
    s = _signed(r.claim)
    if r.method == "not measured":
        return "not measured"
    return f"{_fmt(r.estimate, r.claim, s)} [{_fmt(r.low, r.claim, s)}, {_fmt(r.high, r.claim, s)}]"


def paper(c: Claim) -> str:
    if c.paper_value is None:
        return {
            "<": f"< {_fmt(c.threshold, c, False)}",
            ">": f"> {_fmt(c.threshold, c, False)}",
        }.get(c.direction, f"≈ {_fmt(c.threshold, c, False)}")
    return _fmt(c.paper_value, c, _signed(c))


def sentence(r: ClaimResult) -> str:
    """One generated sentence: the paper's claim, our number with its interval, the verdict."""
    c = r.claim
    unit = f" {c.unit}" if c.unit else ""
    if r.method == "not measured":
        return f"*{c.statement}* ({c.source}): not measured in this run — {r.note}."
    t = _fmt(c.threshold, c, False)
    side = {">": f"above {t}", "<": f"below {t}",
            "≈": f"within {t} ± {_fmt(c.tolerance, c, False)}"}[c.direction]  # fmt: skip
    why = {
        "holds": f"the whole interval is {side}",
        "fails": f"the whole interval is outside the claimed side ({side})",
        "inconclusive": f"the interval includes no effect (claimed: {side}); "
        f"{r.method.split(' over ')[-1] if ' over ' in r.method else f'{r.n} units'} "
        "do not resolve it",
    }[r.verdict]
    text = (
        f"*{c.statement}* ({c.source}; paper: {paper(c)}{unit}) — {c.metric}: "
        f"{ours(r)}{unit} ({'' if r.method.startswith('exact') else '95% '}{r.method}): "
        f"**{r.verdict}**, {why}."
    )
    return text + (f" {r.note.rstrip('.')}." if r.note else "")


def table(rows: Iterable[dict], *, with_run: bool = False, with_pipeline: bool = False) -> str:
    """Markdown table of claims.json rows: claim, paper, ours ± interval, verdict (, run)."""
    head = (["pipeline"] if with_pipeline else []) + ["claim", "paper", "ours [95% interval]",
                                                      "verdict"] + (["run"] if with_run else [])  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        r = result_from_json(row)
        unit = f" {r.claim.unit}" if r.claim.unit else ""
        cells = ([row.get("pipeline", "")] if with_pipeline else []) + [
            f"{r.claim.statement} ({r.claim.source})",
            paper(r.claim) + (unit if r.claim.paper_value is not None else ""),
            f"not measured: {r.note}" if r.method == "not measured" else
            ours(r) + unit + f"; {r.method}" + (f"; {r.note}" if r.note else ""),
            f"**{r.verdict}**",
        ] + ([row.get("run", "")] if with_run else [])  # fmt: skip
        lines.append("| " + " | ".join(str(x).replace("|", "\\|") for x in cells) + " |")
    return "\n".join(lines)


def result_from_json(row: dict) -> ClaimResult:
    c = Claim(**{k: row[k] for k in ("statement", "source", "metric", "direction", "threshold",
                                     "tolerance", "paper_value", "unit", "scale")}, id=row["claim"],
              digits=row.get("digits"))  # fmt: skip
    low, high = (float("nan") if v is None else v for v in row["interval"])
    est = float("nan") if row["estimate"] is None else row["estimate"]
    return ClaimResult(c, est, low, high, row["verdict"], row["method"], row["n"], row["note"],
                       row.get("details", {}))  # fmt: skip


# ----------------------------------------------------------------------------------------------
# writers
def write(
    out_dir: Path, results: Sequence[ClaimResult], *, pipeline: str, run: str = ""
) -> list[dict]:
    """``claims.json`` (a list of rows, see :meth:`ClaimResult.to_json`) in ``out_dir``."""
    rows = [r.to_json(pipeline, run) for r in results]
    ids = [r["claim"] for r in rows]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"{pipeline}: duplicate claim ids {dup}")
    (Path(out_dir) / "claims.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    return rows


def markdown_section(results: Sequence[ClaimResult], title: str = "## Claims") -> list[str]:
    """The report's claims section: the table, then one generated sentence per claim."""
    rows = [r.to_json() for r in results]
    counts = {v: sum(r.verdict == v for r in results) for v in VERDICTS}
    summary = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
    return [
        title,
        "",
        f"{len(results)} claims of the paper tested on this run ({summary}); intervals are 95% "
        f"percentile bootstraps ({RESAMPLES} resamples, seed {SEED}).",
        "",
        table(rows),
        "",
        *[f"- {sentence(r)}" for r in results],
        "",
    ]


def load_run(run_dir: Path) -> list[dict]:
    """The claims.json rows of a run directory, each with its pipeline and run filled in."""
    run_dir = Path(run_dir)
    path = run_dir / "claims.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no claims.json in this run directory")
    rows = json.loads(path.read_text())
    pipeline = run_dir.parent.name
    cfg = run_dir / "config.json"
    if cfg.exists():
        pipeline = json.loads(cfg.read_text()).get("pipeline", pipeline)
    for row in rows:
        row["pipeline"] = row.get("pipeline") or pipeline
        row["run"] = str(run_dir)
    return rows
