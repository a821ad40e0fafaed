"""Same key, same bytes (issue 22, DESIGN "Same key, same bytes"): on a CPU a step's artifact depends
only on its key, whatever the executor, the CPUs a training worker holds or the trial placement of a
sweep; a setting that changes the bytes (torch threads) changes the key.

Before: a sweep trial's training worker was capped to the 1 CPU its placement left and ran 1
thread, a plain run 2, under one key (R-CNN pretrain accuracy 0.830 vs 0.726, mAP 5 points apart).
"""

from __future__ import annotations

import pytest

from pipelines import runner, sweep
from tests.pipelines.repro import artifact_bytes

REPRO = "tests.pipelines.repro:PIPELINE"


def _run(tmp_path, name, overrides=None, executor="local"):
    return runner.run(
        REPRO,
        overrides=overrides or {},
        store=str(tmp_path / name / "store"),
        runs=tmp_path / name / "runs",
        executor=executor,
        progress=False,
        log=lambda _: None,
    )


def test_threads_are_in_the_key_and_cpus_are_not(tmp_path):
    base = _run(tmp_path, "base")
    fewer_cpus = _run(tmp_path, "cpus1", {"fit.cpus": "1"})
    assert fewer_cpus.manifest[0]["key"] == base.manifest[0]["key"]
    assert artifact_bytes(fewer_cpus, "fit") == artifact_bytes(base, "fit")
    one_thread = _run(tmp_path, "threads1", {"fit.threads": "1"})
    assert one_thread.manifest[0]["key"] != base.manifest[0]["key"]
    # the control: threads really change this training's bytes, so the equalities above and
    # below could fail
    assert (
        artifact_bytes(one_thread, "fit")["weights.npy"]
        != artifact_bytes(base, "fit")["weights.npy"]
    )


@pytest.mark.ray
def test_same_key_same_bytes_in_process_on_ray_and_in_a_sweep_trial(tmp_path, ray_session):
    local = _run(tmp_path, "local")
    key = {m["step"]: m["key"] for m in local.manifest}
    want = {s: artifact_bytes(local, s) for s in ("fit", "score")}

    # Ray Train worker holding 1 CPU instead of 2 (the knob a sweep's placement groups force)
    on_ray = _run(tmp_path, "ray", {"fit.cpus": "1"}, executor="ray")
    assert {m["step"]: m["key"] for m in on_ray.manifest} == key
    assert [m["status"] for m in on_ray.manifest] == ["computed", "computed"]
    for step in ("fit", "score"):
        assert artifact_bytes(on_ray, step) == want[step], step

    # a `paperline sweep` trial (a Tune trial whose placement group leaves 1 CPU for training)
    plan = sweep.make_plan(REPRO, None, {}, ["score.label=a"], [])
    result = sweep.run_sweep(
        plan,
        store=str(tmp_path / "sweep" / "store"),
        runs=tmp_path / "sweep" / "runs",
        executor="ray",
        log=lambda _: None,
    )
    (row,) = result.rows
    assert row["error"] == "" and sorted(row["computed_steps"]) == ["fit", "score"]
    trial = runner.run(  # the trial's run again on its store: every step cached, same keys
        REPRO,
        overrides={"score.label": "a"},
        store=str(tmp_path / "sweep" / "store"),
        runs=tmp_path / "sweep" / "again",
        executor="local",
        progress=False,
        log=lambda _: None,
    )
    assert trial.cached() == ["fit", "score"]
    assert {m["step"]: m["key"] for m in trial.manifest} == key
    for step in ("fit", "score"):
        assert artifact_bytes(trial, step) == want[step], step
