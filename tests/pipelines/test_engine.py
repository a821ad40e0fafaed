"""Engine semantics on the in-process executor: keys, caching, invalidation, resume, atomicity."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from cluster.local import LocalExecutor
from cluster.resources import Resources
from data.store import MARKER, ArtifactStore
from pipelines.engine import (
    Step,
    StepFailed,
    descendants,
    pending_steps,
    run_steps,
    step_key,
    topo_sort,
)
from tests.pipelines.toy import counts, read, toy_steps


def run(tmp_path: Path, **kw):
    store = ArtifactStore(tmp_path / "store")
    steps = toy_steps(tmp_path / "counts", **kw)
    return run_steps(
        "toy",
        steps,
        store=store,
        executor=LocalExecutor(progress=False),
        run_dir=tmp_path / "run",
        log=lambda _: None,
    )


@pytest.fixture
def counter(tmp_path):
    (tmp_path / "counts").mkdir()
    return tmp_path / "counts"


def test_first_run_computes_everything_and_publishes(tmp_path, counter):
    result = run(tmp_path, n=5)
    assert result.computed() == ["numbers", "squares", "total", "label"]
    assert read(result.artifacts["squares"], "squares.json") == [0, 1, 4, 9, 16]
    assert result.metrics == {"total": 30}
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == {"total": 30}
    assert (tmp_path / "run" / "report.md").read_text() == "# total\n\n30\n"
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert [m["status"] for m in manifest] == ["computed"] * 4
    assert all(m["wall_s"] >= 0 and m["node"] for m in manifest)


def test_rerun_reuses_every_step(tmp_path, counter):
    first = run(tmp_path)
    second = run(tmp_path)
    assert second.cached() == ["numbers", "squares", "total", "label"]
    assert counts(counter) == {"numbers": 1, "squares": 1, "total": 1, "label": 1}
    assert {k: a.key for k, a in first.artifacts.items()} == {
        k: a.key for k, a in second.artifacts.items()
    }


def test_pending_steps_names_what_a_run_would_compute(tmp_path, counter):
    store = ArtifactStore(tmp_path / "store")

    def pending(**kw):
        force = kw.pop("force", None)
        return pending_steps("toy", toy_steps(counter, **kw), store=store, force=force)

    assert pending() == ["numbers", "squares", "total", "label"]
    run(tmp_path)
    assert pending() == []
    assert pending(force="squares") == ["squares", "total"]
    assert pending(offset=1) == ["squares", "total"]
    assert pending(text="other") == ["label"]
    assert counts(counter) == {"numbers": 1, "squares": 1, "total": 1, "label": 1}  # read-only


def test_a_fully_cached_ray_run_never_starts_ray(tmp_path, monkeypatch):
    from cluster import runtime
    from pipelines import runner

    kw = dict(store=str(tmp_path / "store"), runs=tmp_path / "runs", progress=False)
    (tmp_path / "c").mkdir()
    sets = {"counter_dir": str(tmp_path / "c")}
    runner.run("tests.pipelines.toy:PIPELINE", None, sets, executor="local", log=print, **kw)

    def no_ray(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(runtime, "connect", no_ray)
    lines = []
    again = runner.run(
        "tests.pipelines.toy:PIPELINE", None, sets, executor="ray", log=lines.append, **kw
    )
    assert again.cached() == ["numbers", "squares", "total", "label"]
    assert "not started, every step is cached" in lines[0]
    with pytest.raises(AssertionError, match="Ray was started"):  # anything to compute: Ray
        runner.run(
            "tests.pipelines.toy:PIPELINE", None, {**sets, "text": "new"}, executor="ray", **kw
        )


def test_changing_one_value_recomputes_only_dependents(tmp_path, counter):
    run(tmp_path, offset=0)
    result = run(tmp_path, offset=1)  # used by `squares` only
    assert result.cached() == ["numbers", "label"]
    assert result.computed() == ["squares", "total"]
    assert result.metrics == {"total": 35}
    assert counts(counter) == {"numbers": 1, "squares": 2, "total": 2, "label": 1}
    # and going back finds the first version still in the store
    back = run(tmp_path, offset=0)
    assert back.computed() == [] and back.metrics == {"total": 30}


def test_step_failure_leaves_nothing_visible_and_rerun_resumes(tmp_path, counter):
    marker = tmp_path / "fail-now"
    marker.touch()
    with pytest.raises(StepFailed, match="injected failure") as info:
        run(tmp_path, fail_marker=str(marker))
    assert info.value.step == "squares"
    store_dir = tmp_path / "store" / "toy" / "squares"
    # no final directory, and no staging directory left behind
    assert [p.name for p in store_dir.iterdir()] == []
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    status = {m["step"]: m["status"] for m in manifest}
    assert status["numbers"] == "computed" and status["squares"] == "failed"
    assert "total" not in status  # never started

    marker.unlink()
    result = run(tmp_path, fail_marker=str(marker))
    assert "numbers" in result.cached()
    assert result.computed()[:2] == ["squares", "total"]
    assert counts(counter)["numbers"] == 1 and counts(counter)["squares"] == 2


def test_force_recomputes_step_and_descendants(tmp_path, counter):
    store = ArtifactStore(tmp_path / "store")
    steps = toy_steps(counter)
    ex = LocalExecutor(progress=False)
    run_steps("toy", steps, store=store, executor=ex, log=lambda _: None)
    result = run_steps("toy", steps, store=store, executor=ex, force="squares", log=lambda _: None)
    assert result.computed() == ["squares", "total"]
    assert result.cached() == ["numbers", "label"]
    with pytest.raises(ValueError, match="unknown step 'nope'"):
        run_steps("toy", steps, store=store, executor=ex, force="nope", log=lambda _: None)


def _epochs_train_fn(tctx, config):
    """Resumes from its last checkpoint, as every training loop here does."""
    state = tctx.load_checkpoint() or {"epoch": 0}
    for epoch in range(state["epoch"], config["epochs"]):
        tctx.report({"epoch": epoch}, checkpoint={"epoch": epoch + 1})


def _train_step(ctx):
    result = ctx.train(_epochs_train_fn, {"epochs": 3})
    ctx.write_json("trained.json", [h["epoch"] for h in result.history])


def test_force_retrains_a_train_step_from_scratch(tmp_path):
    """--force must not resume from the finished run's checkpoint under the same key (it would
    train nothing and republish the old weights)."""
    from pipelines.engine import Step

    store = ArtifactStore(tmp_path / "store")
    steps = [Step("fit", _train_step, kind="train")]
    ex = LocalExecutor(progress=False)
    first = run_steps("toy", steps, store=store, executor=ex, log=lambda _: None)
    assert read(first.artifacts["fit"], "trained.json") == [0, 1, 2]
    again = run_steps("toy", steps, store=store, executor=ex, force="fit", log=lambda _: None)
    assert again.computed() == ["fit"]
    assert read(again.artifacts["fit"], "trained.json") == [0, 1, 2]


def _flaky_trial(config, report, *, counter: str):
    """Counts its calls per x; x = 2 fails while ``<counter>/fail`` exists."""
    calls = Path(counter) / f"x{config['x']}"
    calls.write_text(str(int(calls.read_text()) + 1 if calls.exists() else 1))
    if config["x"] == 2 and (Path(counter) / "fail").exists():
        raise RuntimeError("flaky")
    report({"y": config["x"] ** 2})


def _sweep_step(ctx, *, counter: str):
    import functools

    from cluster.space import Grid

    trials = ctx.sweep(functools.partial(_flaky_trial, counter=counter),
                       {"x": Grid((1, 2, 3))}, metric="y", mode="max")  # fmt: skip
    if any(t["error"] for t in trials):
        raise RuntimeError("a trial failed")
    ctx.write_json("ys.json", [t["metrics"]["y"] for t in trials])


def test_a_sweep_step_rerun_after_a_failure_runs_only_unfinished_trials(tmp_path, counter):
    """DESIGN: Tune experiments resume (Tuner.restore; the local executor's journal); --force
    starts the experiment afresh."""
    from pipelines.engine import Step, StepFailed

    store = ArtifactStore(tmp_path / "store")
    steps = [Step("sweep", _sweep_step, kind="sweep", params={"counter": str(counter)})]
    ex = LocalExecutor(progress=False)
    calls = lambda: {x: int((counter / f"x{x}").read_text()) for x in (1, 2, 3)}  # noqa: E731
    (counter / "fail").touch()
    with pytest.raises(StepFailed):
        run_steps("toy", steps, store=store, executor=ex, log=lambda _: None)
    assert calls() == {1: 1, 2: 1, 3: 1}
    (counter / "fail").unlink()
    done = run_steps("toy", steps, store=store, executor=ex, log=lambda _: None)
    assert read(done.artifacts["sweep"], "ys.json") == [1, 4, 9]
    assert calls() == {1: 1, 2: 2, 3: 1}  # only the failed trial ran again
    run_steps("toy", steps, store=store, executor=ex, force="sweep", log=lambda _: None)
    assert calls() == {1: 2, 2: 3, 3: 2}  # forced: every trial


def test_corrupted_artifact_is_recomputed_not_trusted(tmp_path, counter):
    first = run(tmp_path)
    squares = first.artifacts["squares"].local_dir() / "squares.json"
    squares.write_text(squares.read_text().replace("16", "17"))  # same size, different bytes
    result = run(tmp_path)
    assert "squares" in result.computed()
    assert read(result.artifacts["squares"], "squares.json") == [0, 1, 4, 9, 16]
    (first.artifacts["numbers"].local_dir() / "numbers.json").unlink()
    assert "numbers" in run(tmp_path).computed()


def test_keys_depend_on_code_params_version_and_inputs():
    s = Step("a", fn=print, params={"x": 1})
    assert step_key(s, {}) == step_key(Step("a", fn=print, params={"x": 1}), {})
    assert step_key(s, {}) != step_key(Step("a", fn=len, params={"x": 1}), {})  # other code
    assert step_key(s, {}) != step_key(Step("a", fn=print, params={"x": 2}), {})
    assert step_key(s, {}) != step_key(Step("a", fn=print, params={"x": 1}, version="2"), {})
    assert step_key(s, {"b": "k1"}) != step_key(s, {"b": "k2"})


def test_graph_checks():
    a = Step("a", fn=print)
    b = Step("b", fn=print, inputs=("a",))
    c = Step("c", fn=print, inputs=("b",))
    assert [s.name for s in topo_sort([c, b, a])] == ["a", "b", "c"]
    assert descendants([a, b, c], "b") == {"b", "c"}
    with pytest.raises(ValueError, match="reads 'zz'"):
        topo_sort([Step("x", fn=print, inputs=("zz",))])
    with pytest.raises(ValueError, match="cycle"):
        topo_sort([Step("x", fn=print, inputs=("y",)), Step("y", fn=print, inputs=("x",))])
    with pytest.raises(ValueError, match="kind must be one of"):
        Step("x", fn=print, kind="batch")


def test_store_writer_is_atomic(tmp_path):
    store = ArtifactStore(tmp_path)
    art = store.artifact("p", "s", "k1")
    with pytest.raises(RuntimeError):
        with store.writer(art) as out:
            (out / "a.txt").write_text("partial")
            raise RuntimeError("crash")
    assert not (tmp_path / "p" / "s" / "k1").exists()
    assert list((tmp_path / "p" / "s").iterdir()) == []
    with store.writer(art) as out:
        (out / "a.txt").write_text("done")
        (out / "sub").mkdir()
        (out / "sub" / "b.bin").write_bytes(b"\x00" * 10)
    marker = json.loads((tmp_path / "p" / "s" / "k1" / MARKER).read_text())
    assert marker["files"]["a.txt"]["size"] == 4
    assert marker["files"]["sub/b.bin"]["size"] == 10
    assert store.is_complete(art)
    (tmp_path / "p" / "s" / "k1" / "sub" / "b.bin").write_bytes(b"\x00" * 11)
    assert not store.is_complete(art)


def test_unwritable_store_fails_early(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="not writable"):
        ArtifactStore(blocker / "store").check_writable()


@pytest.mark.ray
def test_ray_runs_independent_steps_concurrently_with_identical_artifacts(
    tmp_path, counter, ray_executor
):
    """`numbers` and `label` share no input: on Ray their (1 s) executions overlap in time."""
    import ray

    # earlier tests' Train/Tune runs release their CPUs asynchronously: start with both free
    t0 = time.time()
    while ray.available_resources().get("CPU", 0) < 2 and time.time() - t0 < 60:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) >= 2, ray.available_resources()
    # two warm worker processes: a cold one takes over a second to start, which would serialise
    # the steps for a reason that has nothing to do with the scheduler
    ray_executor.map(time.sleep, [1.0, 1.0], resources=Resources(cpus=1))
    store = ArtifactStore(tmp_path / "store-ray")
    steps = toy_steps(counter, sleep_s=1.0)
    result = run_steps("toy", steps, store=store, executor=ray_executor, log=lambda _: None)
    m = {e["step"]: e for e in result.manifest}
    assert m["numbers"]["start_unix_s"] < m["label"]["end_unix_s"]
    assert m["label"]["start_unix_s"] < m["numbers"]["end_unix_s"]
    local = run_steps(
        "toy",
        steps,
        store=ArtifactStore(tmp_path / "store-local"),
        executor=LocalExecutor(progress=False),
        log=lambda _: None,
    )
    for name in ("numbers", "squares", "total", "label"):
        assert result.artifacts[name].key == local.artifacts[name].key
        a, b = result.artifacts[name].local_dir(), local.artifacts[name].local_dir()
        files = sorted(p.name for p in a.iterdir())
        assert files == sorted(p.name for p in b.iterdir())
        for f in files:
            if f != "_COMPLETE.json":  # holds a creation time
                assert (a / f).read_bytes() == (b / f).read_bytes()


def test_variants_share_artifacts_by_stage_and_alias(tmp_path, counter):
    """A study's variant step with the same stage, params and inputs reuses the plain artifact."""
    store = ArtifactStore(tmp_path / "store")
    ex = LocalExecutor(progress=False)
    plain = run_steps("toy", toy_steps(counter), store=store, executor=ex, log=lambda _: None)
    base = toy_steps(counter)
    variant = [
        *base,
        # same stage + params + inputs as `squares`, read under the alias `numbers`: shared
        Step(
            "squares-again",
            base[1].fn,
            kind="map",
            inputs=("numbers=numbers",),
            params={"power_offset": 0},
            stage="squares",
        ),
        # a real variant: different params, its own artifact; `total` reads it by alias
        Step(
            "squares-plus1",
            base[1].fn,
            kind="map",
            inputs=("numbers",),
            params={"power_offset": 1},
            stage="squares",
        ),
        Step("total-plus1", base[2].fn, inputs=("squares=squares-plus1",), stage="total"),
    ]
    result = run_steps("toy", variant, store=store, executor=ex, log=lambda _: None)
    assert result.artifacts["squares-again"] == plain.artifacts["squares"]
    assert "squares-again" in result.cached()
    assert result.computed() == ["squares-plus1", "total-plus1"]
    assert read(result.artifacts["total-plus1"], "metrics.json") == {"total": 35}
    assert counts(counter)["squares"] == 2


def test_the_cache_check_reads_no_data_unless_a_file_was_touched(tmp_path, counter, monkeypatch):
    """Issue 18: a cached rerun checks sizes and mtimes; only a touched file is hashed again, and
    `verify` hashes everything (it catches a same-size edit whose mtime was put back)."""
    import os

    import data.store as store_mod

    first = run(tmp_path)
    hashed: list[str] = []
    real = store_mod._sha256
    monkeypatch.setattr(store_mod, "_sha256", lambda p: hashed.append(Path(p).name) or real(p))
    assert run(tmp_path).computed() == []
    assert hashed == []  # nothing read
    squares = first.artifacts["squares"].local_dir() / "squares.json"
    os.utime(squares)  # touched, same bytes: hashed once, still trusted
    assert run(tmp_path).computed() == [] and hashed == ["squares.json"]
    store = ArtifactStore(tmp_path / "store")
    recorded = store.marker(first.artifacts["squares"])["files"]["squares.json"]["mtime_ns"]
    squares.write_text(squares.read_text().replace("16", "17"))  # same size
    os.utime(squares, ns=(recorded, recorded))  # and the recorded mtime
    assert store.is_complete(first.artifacts["squares"])  # the cheap check cannot see it ...
    problems = store.verify(first.artifacts["squares"])  # ... the full one does
    assert len(problems) == 1 and "squares.json" in problems[0]
    assert store.verify(first.artifacts["numbers"]) == []
    assert {a.relpath for a in store.artifacts()} == {a.relpath for a in first.artifacts.values()}


def test_paperline_verify_on_a_store_and_a_run_directory(tmp_path, counter, capsys):
    from pipelines import cli

    first = run(tmp_path)
    assert cli.main(["verify", str(tmp_path / "store")]) == 0
    assert f"verified {len(first.artifacts)} artifacts" in capsys.readouterr().out
    assert cli.main(["verify", str(tmp_path / "run")]) == 2  # toy runs write no config.json
    squares = first.artifacts["squares"].local_dir() / "squares.json"
    squares.write_text(squares.read_text().replace("16", "17"))
    assert cli.main(["verify", str(tmp_path / "store")]) == 1
    out = capsys.readouterr().out
    assert "BAD toy/squares/" in out and "1 problems" in out


def test_step_lines_of_concurrent_steps_never_share_a_line(capfd):
    """Issue 22: ``print`` writes a line and its newline separately, so two steps starting at
    once printed "[rcnn] proposals: running (map)[rcnn] pretrain_crops: running (task)"."""
    import threading

    from pipelines.engine import print_line

    lines = [f"[toy] step{i}: running (task)" for i in range(8)]
    barrier = threading.Barrier(len(lines))

    def emit(line):
        barrier.wait()
        for _ in range(200):
            print_line(line)

    threads = [threading.Thread(target=emit, args=(line,)) for line in lines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = capfd.readouterr().out.splitlines()
    assert len(out) == 8 * 200 and set(out) == set(lines)
