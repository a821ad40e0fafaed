"""Claims core: verdicts on hand-made intervals, the bootstrap against scipy's, the writers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines import claims
from pipelines.claims import Claim

DIFF = Claim("d", "A beats B", "Table 2", "mAP(A) − mAP(B)", ">", 0.0, paper_value=0.04,
             unit="points", scale=100)  # fmt: skip


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [
        (0.01, 0.05, "holds"),  # entirely above 0
        (-0.01, 0.05, "inconclusive"),  # straddles 0
        (0.0, 0.05, "inconclusive"),  # touches no effect
        (-0.05, -0.01, "fails"),  # entirely on the wrong side
        (0.0, 0.0, "fails"),  # exactly no effect on every resample
        (float("nan"), 0.1, "inconclusive"),
    ],
)
def test_verdict_of_a_difference(low, high, expected):
    assert claims.verdict(DIFF, low, high) == expected


def test_verdict_below_and_approximately():
    below = Claim("b", "x < 1", "s", "ratio", "<", 1.0)
    assert claims.verdict(below, 0.5, 0.9) == "holds"
    assert claims.verdict(below, 0.9, 1.1) == "inconclusive"
    assert claims.verdict(below, 1.1, 1.5) == "fails"
    chance = Claim("c", "at chance", "s", "acc", "≈", 0.1, tolerance=0.03)
    assert claims.verdict(chance, 0.08, 0.12) == "holds"
    assert claims.verdict(chance, 0.11, 0.14) == "inconclusive"  # leaves the band on one side
    assert claims.verdict(chance, 0.2, 0.3) == "fails"
    assert claims.verdict(chance, 0.0, 0.06) == "fails"
    with pytest.raises(ValueError, match="direction"):
        Claim("x", "s", "s", "m", ">=")


def test_bootstrap_of_a_mean_matches_scipy_percentile_interval():
    from scipy import stats

    x = np.random.default_rng(1).normal(2.0, 1.0, 40)
    ours = claims.percentile_interval(claims.bootstrap_mean(x, resamples=4000, seed=3))
    ref = stats.bootstrap((x,), np.mean, n_resamples=4000, method="percentile", rng=5)
    lo, hi = ref.confidence_interval
    se = x.std(ddof=1) / np.sqrt(len(x))
    # two independent 4000-draw bootstraps agree to a few hundredths of a standard error...
    assert abs(ours[0] - lo) < 0.1 * se and abs(ours[1] - hi) < 0.1 * se
    # ...and to the normal interval ± 1.96 se within 10%
    assert abs((ours[1] - ours[0]) - 2 * 1.96 * se) < 0.2 * 1.96 * se


def test_bootstrap_is_reproducible_and_paired():
    a = {0: 0.9, 1: 0.8, 2: 0.7}
    b = {0: 0.85, 1: 0.75, 2: 0.65, 3: 0.1}  # seed 3 has no partner: left out
    est, samples, n = claims.paired_seed_samples(a, b)
    assert n == 3 and est == pytest.approx(0.05)
    # paired: every resample's difference is exactly 0.05 although the seeds differ by 0.2
    np.testing.assert_allclose(samples, 0.05)
    again = claims.paired_seed_samples(a, b)[1]
    np.testing.assert_array_equal(samples, again)


def test_accuracy_samples_add_the_test_set_noise():
    one_seed = claims.accuracy_samples([0.5], n_test=100)
    lo, hi = claims.percentile_interval(one_seed)
    # Binomial(100, 0.5)/100: sd 0.05, so the 95% interval is ≈ 0.40–0.60
    assert 0.38 <= lo <= 0.42 and 0.58 <= hi <= 0.62
    assert np.all(claims.accuracy_samples([0.5], n_test=0) == 0.5)


def test_evaluate_write_and_sentence(tmp_path):
    r = claims.evaluate(DIFF, 0.03, np.linspace(-0.01, 0.07, 101), method="bootstrap over 20 "
                        "test images", n=20)  # fmt: skip
    assert r.verdict == "inconclusive"
    assert (r.low, r.high) == pytest.approx((-0.008, 0.068))
    rows = claims.write(tmp_path, [r], pipeline="rcnn", run="runs/x")
    on_disk = json.loads((tmp_path / "claims.json").read_text())
    assert on_disk == rows and on_disk[0]["interval"] == pytest.approx([-0.008, 0.068])
    assert on_disk[0]["verdict"] == "inconclusive" and on_disk[0]["pipeline"] == "rcnn"
    text = claims.sentence(r)
    assert "+3.0 [-0.8, +6.8] points" in text and "**inconclusive**" in text
    assert "20 test images do not resolve it" in text
    md = claims.table(on_disk)
    assert md.splitlines()[2].startswith("| A beats B (Table 2) | +4.0 points | +3.0 [-0.8, +6.8]")
    with pytest.raises(ValueError, match="duplicate"):
        claims.write(tmp_path, [r, r], pipeline="rcnn")


def test_not_measured_is_inconclusive_with_a_reason():
    r = claims.not_measured(DIFF, "bbox.enabled=false")
    row = r.to_json("rcnn")
    assert row["verdict"] == "inconclusive" and row["interval"] == [None, None]
    assert "not measured in this run — bbox.enabled=false" in claims.sentence(r)


def _fake_run(root, pipeline, name, results):
    d = root / pipeline / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"pipeline": pipeline}))
    claims.write(d, results, pipeline=pipeline)
    return d


def test_cli_claims_table_and_json_across_runs(tmp_path, capsys):
    from pipelines import cli

    holds = claims.evaluate(DIFF, 0.05, np.full(10, 0.05), method="bootstrap over 2 seeds", n=2)
    chance = Claim("chance", "random labels: test at chance", "§2", "test acc", "≈", 0.1,
                   tolerance=0.03, scale=100)  # fmt: skip
    fails = claims.evaluate(chance, 0.3, np.full(10, 0.3), method="bootstrap over 1 seed", n=1)
    a = _fake_run(tmp_path, "rcnn", "tiny-1", [holds])
    _fake_run(tmp_path, "generalization", "ci-2", [fails])
    assert cli.main(["claims", "--out", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    got = {(r["pipeline"], r["claim"], r["verdict"]) for r in rows}
    assert got == {("rcnn", "d", "holds"), ("generalization", "chance", "fails")}
    assert [r["interval"] for r in rows if r["claim"] == "d"] == [[0.05, 0.05]]
    assert cli.main(["claims", str(a)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| pipeline | claim | paper | ours [95% interval] | verdict | run |"
    assert out[2].startswith("| rcnn | A beats B (Table 2) | +4.0 points | +5.0 [+5.0, +5.0]")
    assert out[2].endswith(f"| **holds** | {a} |")
    assert cli.main(["claims", str(tmp_path / "nope")]) == 2
    assert "no claims.json" in capsys.readouterr().err
