"""`paperline sweep`: space parsing and type errors, shared steps computed once, resume, Ray Tune."""

from __future__ import annotations

import json
import re
import threading

import pyarrow.parquet as pq
import pytest

from cluster.local import LocalExecutor
from cluster.space import Grid, Uniform, expand
from data.store import ArtifactStore
from pipelines import cli, sweep
from pipelines.config import ConfigError
from pipelines.engine import run_steps
from tests.pipelines.toy import counts, toy_steps

TOY = "tests.pipelines.toy:PIPELINE"


def plan(grids, samples=(), overrides=None, **kw):
    return sweep.make_plan(TOY, None, overrides or {}, list(grids), list(samples), **kw)


# ---- parsing ---------------------------------------------------------------------------------
def test_grid_values_are_typed_and_expand_to_the_cross_product():
    p = plan(["toy.offset=0,1,2", "text=a,b"])
    assert p.space == {"toy.offset": Grid((0, 1, 2)), "text": Grid(("a", "b"))}
    assert p.metric == "total" and p.mode == "max" and p.preset == "small"
    trials = expand(p.space)
    assert len(trials) == 6 and {"toy.offset": 2, "text": "b"} in trials
    assert all(isinstance(t["toy.offset"], int) for t in trials)


def test_sampled_float_and_choice():
    p = plan([], ["scale=loguniform(0.01,1)", "text=choice(x,y)"], num_samples=5)
    assert p.space["scale"] == Uniform(0.01, 1.0, log=True)
    trials = expand(p.space, 5, seed=1)
    assert len(trials) == 5
    assert all(0.01 <= t["scale"] <= 1 and t["text"] in ("x", "y") for t in trials)


def test_split_values_keeps_bracketed_commas():
    assert sweep.split_values("0,0.1,(16,32),[1, 2]") == ["0", "0.1", "(16,32)", "[1, 2]"]
    with pytest.raises(ConfigError, match="empty value"):
        sweep.split_values("1,,2")


@pytest.mark.parametrize(
    "grids, samples, message",
    [
        (["toy.offset=1,x"], [], "toy.offset: expected an integer, got 'x'"),
        (["toy.n=3,0"], [], "toy.n must be >= 1, got 0"),
        (["toy.nope=1"], [], "unknown key 'toy.nope' (did you mean toy.n or toy.offset"),
        (["toy.offset"], [], "--grid expects KEY=VALUES"),
        (["text=a,a"], [], "repeated values"),
        ([], ["toy.offset=uniform(0,3)"], "needs two bounds of a float field"),
        ([], ["scale=loguniform(0,1)"], "need 0 < lo < hi"),
        ([], ["scale=normal(0,1)"], "expected uniform(lo,hi)"),
        ([], [], "nothing to sweep"),
    ],
)
def test_bad_spaces_fail_before_anything_runs(grids, samples, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        plan(grids, samples)


def test_swept_key_cannot_also_be_fixed():
    with pytest.raises(ConfigError, match="both swept and fixed"):
        plan(["text=a,b"], overrides={"text": "c"})


def test_cli_rejects_bad_values_with_exit_2_before_ray(capsys, monkeypatch, tmp_path):
    from cluster import runtime

    def no_ray(*a, **k):
        raise AssertionError("Ray must not start for a bad sweep")

    monkeypatch.setattr(runtime, "connect", no_ray)
    code = cli.main(["sweep", TOY, "--grid", "toy.offset=1,2.5", "--store", str(tmp_path / "s")])
    assert code == 2
    assert "toy.offset: expected an integer, got '2.5'" in capsys.readouterr().err


# ---- sharing work --------------------------------------------------------------------------
def test_concurrent_runs_compute_a_shared_step_once(tmp_path):
    """Two runs of the same steps at once (as two trials): the slow first step is computed by one,
    the other waits on the artifact lock and reuses it."""
    store = ArtifactStore(tmp_path / "store")
    counter = tmp_path / "counts"
    counter.mkdir()
    results = {}

    def go(offset: int):
        steps = toy_steps(counter, offset=offset, sleep_s=1.0)
        results[offset] = run_steps(
            "toy", steps, store=store, executor=LocalExecutor(progress=False), log=lambda _: None
        )

    threads = [threading.Thread(target=go, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counts(counter) == {"numbers": 1, "squares": 2, "total": 2, "label": 1}
    status = {k: {m["step"]: m for m in r.manifest} for k, r in results.items()}
    assert sorted(status[k]["numbers"]["status"] for k in (0, 1)) == ["cached", "computed"]
    waited = [status[k]["numbers"] for k in (0, 1) if status[k]["numbers"]["status"] == "cached"]
    assert waited[0]["waited_s"] > 0.5  # it really waited for the other run's computation
    assert not list((tmp_path / "store").rglob("*.lock"))  # locks are released


def test_stale_lock_of_a_dead_process_is_broken(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    art = store.artifact("toy", "numbers", "k1")
    lock = tmp_path / "store" / "toy" / "numbers" / "k1.lock"
    lock.parent.mkdir(parents=True)
    import socket

    lock.write_text(f"{socket.gethostname()}:999999999:dead")  # no such pid
    with store.lock(art) as waited:
        assert waited < 5
        assert lock.read_text().split(":")[1] != "999999999"
    assert not lock.exists()


def test_an_empty_lock_file_is_broken_once_old_and_a_fresh_one_waited_on(tmp_path):
    """A holder that died between creating its lock and writing its token (or a power loss)
    leaves an empty file with no owner to ask: once older than LOCK_STALE_S it is broken, not
    waited on forever; a fresh one is respected (its holder may be about to write)."""
    import os
    import threading

    from data import store as store_mod

    store = ArtifactStore(tmp_path / "store")
    art = store.artifact("toy", "numbers", "k1")
    lock = tmp_path / "store" / "toy" / "numbers" / "k1.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    old = lock.stat().st_mtime - store_mod.LOCK_STALE_S - 60
    os.utime(lock, (old, old))
    got = threading.Event()

    def take():
        with store.lock(art):
            got.set()

    t = threading.Thread(target=take, daemon=True)
    t.start()
    assert got.wait(5), "an old empty lock file was waited on"
    t.join(5)
    assert not lock.exists()
    lock.write_text("")  # fresh: held
    assert not store._try_lock(str(lock), "me")
    assert lock.read_text() == ""
    lock.unlink()
    assert store._try_lock(str(lock), "me") and lock.read_text() == "me"  # created with its token
    assert not list(lock.parent.glob("*.new"))


def test_locks_work_where_hard_links_do_not(tmp_path, monkeypatch):
    """Some FUSE mounts refuse os.link: locking falls back to an exclusive create."""
    import errno
    import os

    def no_links(src, dst):
        raise OSError(errno.EPERM, "hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    store = ArtifactStore(tmp_path / "store")
    lock = tmp_path / "store" / "toy" / "numbers" / "k1.lock"
    assert store._try_lock(str(lock), "first") and lock.read_text() == "first"
    assert not store._try_lock(str(lock), "second") and lock.read_text() == "first"
    assert not list(lock.parent.glob("*.new"))
    with store.lock(store.artifact("toy", "numbers", "k2")):
        assert (lock.parent / "k2.lock").exists()
    assert not (lock.parent / "k2.lock").exists()


def _toy_sweep(tmp_path, grids, *, executor="local", resume=False, overrides=None, **kw):
    counter = tmp_path / "counts"
    counter.mkdir(exist_ok=True)
    p = plan(grids, overrides={"counter_dir": str(counter), **(overrides or {})})
    return sweep.run_sweep(
        p,
        store=str(tmp_path / "store"),
        runs=tmp_path / "runs",
        executor=executor,
        resume=resume,
        log=lambda _: None,
        **kw,
    )


def test_local_sweep_outputs_and_shared_steps(tmp_path):
    result = _toy_sweep(tmp_path, ["toy.offset=0,1,2", "text=a,b"])
    # numbers once for all six trials; squares/total once per offset; label once per text
    assert counts(tmp_path / "counts") == {"numbers": 1, "squares": 3, "total": 3, "label": 2}
    table = pq.read_table(result.directory / "trials.parquet").to_pylist()
    assert len(table) == 6
    by = {(r["toy.offset"], r["text"]): r for r in table}
    # total = sum(i^2 + offset for i < 5) = 30 + 5 * offset
    assert [by[(o, "a")]["metric"] for o in (0, 1, 2)] == [30.0, 35.0, 40.0]
    assert sum("numbers" in r["computed_steps"] for r in table) == 1
    assert sorted(by[(1, "b")]["computed_steps"] + by[(1, "b")]["cached_steps"]) == sorted(
        ["numbers", "squares", "total", "label"]
    )
    best = json.loads((result.directory / "best.json").read_text())
    assert best["best"]["value"] == 40.0 and best["best"]["config"]["toy.offset"] == 2
    assert best["trials"] == 6 and best["failed"] == 0
    report = (result.directory / "report.md").read_text()
    assert "| 2 | b | 40 |" in report
    assert (result.directory / "sweep_toy_offset.png").stat().st_size > 1000
    # each trial is a normal run directory with its own config
    cfg = json.loads(open(f"{result.rows[0]['run_dir']}/config.json").read())
    assert cfg["overrides"]["toy.offset"] == result.rows[0]["toy.offset"]


def test_interrupted_local_sweep_resumes_only_unfinished_trials(tmp_path, monkeypatch):
    real = sweep.run_trial
    calls = []

    def interrupting(config, report, **kw):
        calls.append(config["toy.offset"])
        if len(calls) == 3:
            raise KeyboardInterrupt  # the sweep process is stopped during its third trial
        return real(config, report, **kw)

    monkeypatch.setattr(sweep, "run_trial", interrupting)
    with pytest.raises(KeyboardInterrupt):
        _toy_sweep(tmp_path, ["toy.offset=0,1,2,3"])
    assert calls == [0, 1, 2]
    calls.clear()
    result = _toy_sweep(tmp_path, ["toy.offset=0,1,2,3"], resume=True)
    assert calls == [2, 3]  # the two finished trials are kept, not run again
    assert [r["metric"] for r in result.rows] == [30.0, 35.0, 40.0, 45.0]


# ---- Ray Tune --------------------------------------------------------------------------------
@pytest.mark.ray
def test_ray_sweep_shares_steps_and_resumes_errored_trials(tmp_path, ray_session):
    marker = tmp_path / "fail"
    (tmp_path / "fail-c").write_text("x")  # the trial with text=c fails in its `label` step
    grids = ["text=a,b,c"]
    over = {"fail_marker": str(marker), "sleep_s": 0.5}
    first = _toy_sweep(tmp_path, grids, executor="ray", overrides=over, max_concurrent=3)
    assert [r["error"] != "" for r in first.rows] == [False, False, True]
    assert "injected failure for text='c'" in first.rows[2]["error"]
    # three concurrent trials, one shared chain: numbers/squares/total computed exactly once
    assert counts(tmp_path / "counts") == {"numbers": 1, "squares": 1, "total": 1, "label": 3}

    (tmp_path / "fail-c").unlink()
    again = _toy_sweep(tmp_path, grids, executor="ray", overrides=over, resume=True)
    assert [r["error"] for r in again.rows] == ["", "", ""]
    assert counts(tmp_path / "counts")["label"] == 4  # only the errored trial ran again
    for old, new in zip(first.rows[:2], again.rows[:2], strict=True):
        assert new["trial_wall_s"] == old["trial_wall_s"]  # finished trials kept, not re-run
    assert again.rows[2]["computed_steps"] == ["label"]
    assert again.best["value"] == 30.0
