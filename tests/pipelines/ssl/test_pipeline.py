"""The ssl pipeline (REFERENCE §5) on the `ci` preset: output contract, numbers, caching, Ray."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines import registry, runner
from pipelines.config import ConfigError
from pipelines.ssl.report import RESULTS_SCHEMA

METHODS = ["supervised", "uniform", "scalar", "mcdropout", "learned"]


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ssl-ci")
    kw = dict(store=str(tmp / "store"), runs=tmp / "runs", progress=False, log=lambda _: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray worker is pinned; the local executor pins nothing
    try:
        yield kw, runner.run("ssl", "ci", executor="local", **kw)
    finally:
        torch.set_num_threads(threads)


def test_report_on_toy_data_says_so_in_its_first_line(ci_run):
    _, result = ci_run  # issue 20
    first = (result.run_dir / "report.md").read_text().splitlines()[0]
    assert first.startswith("**Not the paper's data**: scikit-learn's 8×8 digits")


def test_ci_output_contract_and_numbers(ci_run):
    _, result = ci_run
    table = pq.read_table(result.run_dir / "results.parquet")
    assert table.schema.equals(RESULTS_SCHEMA)
    rows = {r["method"]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted(METHODS) and table.num_rows == 5  # 1 size x 1 seed x 5 methods
    for r in rows.values():
        assert r["labels"] == 40 and r["labels_per_class"] == 4 and r["seed"] == 0
        assert 0.5 < r["accuracy"] <= 1.0  # digits: 40 labels, 60 steps; chance is 0.1
    for m in ("uniform", "scalar", "mcdropout", "learned"):
        assert 0 < rows[m]["mask_rate"] < 1 and rows[m]["pseudo_label_accuracy"] > 0.8
    assert rows["supervised"]["mask_rate"] == 0
    learned = rows["learned"]
    assert learned["outer_cost_ratio"] > 0 and learned["lambda_rank_spread"] == 0
    # λ moved by Adam steps of about lr = 0.01 each: a spread of at least half a step (a 10×
    # smaller lr, or a scalar λ broadcast to every example, fails), and never more than one lr
    # per outer step from 1 (a 10× larger lr, or an unnormalised gradient step, fails)
    assert learned["lambda_std"] >= 0.005
    runs = torch.load(result.artifacts["train_learned"].local_dir() / "runs.pt", weights_only=True)
    w = runs[0]["last_weight"].numpy()
    w = w[~np.isnan(w)]
    assert np.abs(w - 1).max() <= 0.01 * 1.001 * runs[0]["outer_steps"] and np.abs(w - 1).max() > 0
    claims = {r["claim"]: r for r in json.loads((result.run_dir / "claims.json").read_text())}
    assert set(claims) == {f"{c}@40" for c in ("learned_over_fixmatch", "learned_over_scalar",
                           "learned_over_mcdropout", "fixmatch_over_supervised")}  # fmt: skip
    lo, hi = claims["learned_over_fixmatch@40"]["interval"]
    diff = rows["learned"]["accuracy"] - rows["uniform"]["accuracy"]
    assert claims["learned_over_fixmatch@40"]["estimate"] == pytest.approx(diff)
    assert lo <= diff <= hi and hi - lo > 0.02  # one seed × 497 test images: ±3 points or so
    # λ chosen on validation accuracy among the grid (0.5) and FixMatch's λ = 1 (the uniform run)
    trials = json.loads((result.artifacts["scalar_sweep"].local_dir() / "trials.json").read_text())
    val = {0.5: np.mean([t["val_accuracy"] for t in trials if t["scalar_weight"] == 0.5]),
           1.0: rows["uniform"]["val_accuracy"]}  # fmt: skip
    assert len(trials) == 1 and rows["scalar"]["scalar_weight"] == max(sorted(val), key=val.get)
    assert rows["scalar"]["val_accuracy"] == pytest.approx(val[rows["scalar"]["scalar_weight"]])
    assert math.isnan(rows["uniform"]["outer_cost_ratio"])

    m = result.metrics
    assert m["accuracy_learned"] == pytest.approx(learned["accuracy"])
    assert m["learned_minus_uniform"] == pytest.approx(
        learned["accuracy"] - rows["uniform"]["accuracy"]
    )
    saved = json.loads((result.run_dir / "metrics.json").read_text())
    assert saved["scalar_weight_40"] == rows["scalar"]["scalar_weight"]
    report = (result.run_dir / "report.md").read_text()
    assert "| learned λ (influence) |" in report and "94.93 % at 250 labels" in report
    assert "## Finding" in report and "## Cost of the outer step" in report
    for fig in ("accuracy.png", "lambda_hist.png", "lambda_vs_correct.png"):
        assert (result.run_dir / fig).stat().st_size > 5000


def test_outer_lr_zero_recomputes_only_learned_and_equals_fixmatch(ci_run):
    """Changing a λ knob reruns train_learned and the report only; at lr 0 the pipeline's learned
    row is FixMatch's, bit for bit."""
    kw, _ = ci_run
    torch.set_num_threads(1)
    result = runner.run("ssl", "ci", {"weights.outer_lr": "0"}, executor="local", **kw)
    assert result.computed() == ["train_learned", "report"]
    rows = {r["method"]: r for r in pq.read_table(result.run_dir / "results.parquet").to_pylist()}
    for key in ("accuracy", "val_accuracy", "final_accuracy", "mask_rate", "lambda_mean"):
        assert rows["learned"][key] == rows["uniform"][key]


def test_scalar_lambda_candidates_are_trained_alike():
    """λ = 1 (FixMatch) competes in the scalar-λ choice only as a run trained like the Tune
    trials: the uniform runs join when they used one worker, else the sweep trains λ = 1."""
    from pipelines.ssl.report import _scalar_rows
    from pipelines.ssl.steps import _scalar_grid

    spec = registry.get("ssl")
    assert _scalar_grid(spec.build_config("ci")) == (0.5,)  # 1 worker: reuse the uniform runs
    assert _scalar_grid(spec.build_config("tiny")) == (0.5, 2.0, 1.0)  # 2 workers
    assert _scalar_grid(spec.build_config("ci", {"experiment.num_workers": "2"})) == (0.5, 1.0)

    def run(w, val, workers=1, seed=0):
        return {"labels_per_class": 4, "seed": seed, "scalar_weight": w, "val_accuracy": val,
                "workers": workers, "method": "scalar"}  # fmt: skip

    trials = [run(0.5, 0.80), run(0.5, 0.70, seed=1), run(1.0, 0.70), run(1.0, 0.72, seed=1)]
    uniform_ddp = [{**run(1.0, 0.99, workers=2), "method": "uniform"}]
    chosen, table = _scalar_rows(trials, uniform_ddp)
    assert table[4]["best"] == 0.5 and table[4]["val_by_weight"] == pytest.approx({0.5: 0.75,
                                                                                  1.0: 0.71})  # fmt: skip
    assert [r["workers"] for r in chosen] == [1, 1]
    # one worker, λ = 1 not swept: the uniform runs are that candidate
    uniform = [{**run(1.0, 0.90), "method": "uniform"}, {**run(1.0, 0.80, seed=1), "method": "u"}]
    chosen, table = _scalar_rows(trials[:2], uniform)
    assert table[4]["best"] == 1.0 and table[4]["val_by_weight"][1.0] == pytest.approx(0.85)
    assert {r["method"] for r in chosen} == {"scalar"}


def test_paper_preset_and_config_checks(tmp_path):
    spec = registry.get("ssl")
    with pytest.raises(ConfigError, match="data.root is not set"):  # no toy fallback (issue 20)
        spec.steps(spec.build_config("paper"))
    cfg = spec.build_config("paper", {"data.root": str(tmp_path)})
    assert cfg.fixmatch.model == "wrn_28_2" and cfg.fixmatch.steps == 2**20
    assert cfg.experiment.labels_per_class == (25, 100, 400) and cfg.weights.inner_steps == 512
    assert (cfg.weights.outer_lr, cfg.fixmatch.threshold, cfg.fixmatch.ema_decay) == (
        0.01,
        0.95,
        0.999,
    )
    names = [s.name for s in spec.steps(cfg)]
    assert names == ["dataset", "train_supervised", "train_uniform", "train_mcdropout",
                     "train_learned", "scalar_sweep", "report"]  # fmt: skip
    with pytest.raises((ConfigError, ValueError), match="experiment.methods"):
        spec.build_config("ci", {"experiment.methods": "uniform,bogus"})
    with pytest.raises((ConfigError, ValueError), match="fixmatch.threshold"):
        spec.build_config("ci", {"fixmatch.threshold": "1.5"})


@pytest.mark.ray
def test_ci_through_ray_with_two_train_workers(ci_run, ray_session):
    """train_learned under Ray Train with 2 DDP workers (λ all-reduced: identical on both), the
    scalar sweep under Tune (single-process trials, λ = 1 among them)."""
    kw, local = ci_run
    overrides = {"experiment.num_workers": "2", "experiment.methods": "scalar,learned"}
    result = runner.run("ssl", "ci", overrides, executor="ray", force="scalar_sweep", **kw)
    assert result.cached() == ["dataset"]
    assert result.computed() == ["train_learned", "scalar_sweep", "report"]
    rows = {r["method"]: r for r in pq.read_table(result.run_dir / "results.parquet").to_pylist()}
    assert rows["learned"]["workers"] == 2 and rows["learned"]["lambda_rank_spread"] == 0.0
    # 2 workers: λ = 1 is trained by the sweep itself, beside the grid's 0.5 (_scalar_grid)
    trials = json.loads((result.artifacts["scalar_sweep"].local_dir() / "trials.json").read_text())
    val = {w: np.mean([t["val_accuracy"] for t in trials if t["scalar_weight"] == w])
           for w in (0.5, 1.0)}  # fmt: skip
    assert sorted(t["scalar_weight"] for t in trials) == [0.5, 1.0]
    assert rows["scalar"]["workers"] == 1
    assert rows["scalar"]["scalar_weight"] == max(sorted(val), key=val.get)
    for m in ("scalar", "learned"):
        assert 0.5 < rows[m]["accuracy"] <= 1.0
        assert abs(rows[m]["accuracy"] - local.metrics[f"accuracy_{m}"]) < 0.2


@pytest.mark.ray
def test_a_methods_runs_as_parallel_train_jobs_give_the_in_process_rows(ci_run, ray_session):
    """Issue 19: with room for two 1-worker Train runs, `train_supervised` splits its two runs
    into two jobs started side by side; the rows equal the in-process single job's bit for bit."""
    from cluster.ray_executor import RayExecutor
    from data.store import ArtifactStore

    kw, _ = ci_run  # its store, and torch at 1 thread in-process as in each Ray worker
    overrides = {"experiment.methods": "supervised", "experiment.seeds": "0,1"}
    local = runner.run("ssl", "ci", overrides, executor="local", **kw)
    art = local.artifacts["train_supervised"]
    before = torch.load(art.local_dir() / "runs.pt", weights_only=False)
    assert len(before) == 2
    assert RayExecutor(progress=False).train_capacity(1) == 2  # the 2-CPU test Ray
    result = runner.run("ssl", "ci", overrides, executor="ray", force="train_supervised", **kw)
    assert result.computed() == ["train_supervised", "report"]
    after = torch.load(result.artifacts["train_supervised"].local_dir() / "runs.pt",
                       weights_only=False)  # fmt: skip
    assert len(after) == len(before)
    for a, b in zip(after, before, strict=True):
        _assert_same_row(a, b)
    # two Train runs, named after the runs each held
    store = ArtifactStore(kw["store"])
    names = sorted(p.name for p in (store.local_root / "_work" / "ssl").iterdir()
                   if p.name.startswith(f"train_supervised-{art.key}"))  # fmt: skip
    assert names == [f"train_supervised-{art.key}-runs0-0", f"train_supervised-{art.key}-runs1-1"]


def _assert_same_row(a: dict, b: dict) -> None:
    """Every value equal bit for bit (nan = nan), wall-clock timings (``*_s``, ``*_ms``) aside."""
    import re

    timing = re.compile(r"(_s|_ms)$")
    assert sorted(a) == sorted(b)
    for k in a:
        if timing.search(k):
            continue
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y) or (x.isnan() == y.isnan()).all() and torch.equal(
                x.nan_to_num(), y.nan_to_num()), k  # fmt: skip
        elif isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y, err_msg=k)
        elif isinstance(x, float) and math.isnan(x):
            assert math.isnan(y), k
        elif isinstance(x, list) and x and isinstance(x[0], dict):
            for u, v in zip(x, y, strict=True):
                _assert_same_row(u, v)
        else:
            assert x == y, k
