"""Ren, Yeh & Schwing's claims (learned per-example weights beat FixMatch and the simpler
weightings the reviewers asked for) as data, evaluated over seeds and test examples per labelled
set size."""

from __future__ import annotations

from pipelines import claims as core
from pipelines.claims import Claim

# (claim id stem, the paper's or reviewers' statement, method a, method b)
COMPARISONS = (
    ("learned_over_fixmatch", "Learned per-example weights beat FixMatch (uniform λ)", "learned",
     "uniform", "§5 tables"),
    ("learned_over_scalar", "Learned per-example weights beat one tuned scalar λ", "learned",
     "scalar", "§3 (per-example vs one weight)"),
    ("learned_over_mcdropout", "Learned weights beat an uncertainty (MC-dropout) weighting",
     "learned", "mcdropout", "reviews (baseline asked for)"),
    ("fixmatch_over_supervised", "FixMatch's unlabeled term beats labelled data only", "uniform",
     "supervised", "FixMatch, §5 baseline"),
)  # fmt: skip


def claim(stem: str, labels: int) -> Claim:
    statement, a, b, source = next((s, a, b, src) for c, s, a, b, src in COMPARISONS if c == stem)
    return Claim(f"{stem}@{labels}", f"{statement} ({labels} labels)", source,
                 f"acc({a}) − acc({b})", ">", 0.0, unit="points", scale=100)  # fmt: skip


def evaluate_claims(rows: list[dict], num_classes: int, n_test: int) -> list[core.ClaimResult]:
    """``rows``: results.parquet's rows (method, labels_per_class, seed, accuracy)."""
    sizes = sorted({r["labels_per_class"] for r in rows})
    out = []
    for n in sizes:
        labels = n * num_classes

        def acc(method, n=n):
            return [r["accuracy"] for r in rows
                    if r["method"] == method and r["labels_per_class"] == n]  # fmt: skip

        for stem, _, a, b, _ in COMPARISONS:
            c = claim(stem, labels)
            if not acc(a) or not acc(b):
                out.append(core.not_measured(c, f"method {a if not acc(a) else b} not run"))
                continue
            out.append(core.accuracy_difference(c, acc(a), acc(b), n_test))
    return out
