"""Issue 22: one progress display, Ray's own output off unless -v."""

from pathlib import Path

from cluster import runtime
from cluster.executor import train_position, train_total
from cluster.local import LocalExecutor


def test_train_position_reads_the_report_and_the_config_total():
    # a job of several runs (SSL: a method's labels × seeds) counts runs, mid-run fractions too
    runs = {"runs": [{"seed": 0}, {"seed": 1}, {"seed": 2}], "settings": {"steps": 400}}
    assert train_total(runs) == ("run", 3)
    assert train_position({"runs_done": 1, "run_step": 100, "run_index": 1}, runs) == (1.25, 3)
    assert train_position({"runs_done": 2, "accuracy": 0.9, "steps": 400}, runs) == (2.0, 3)
    assert train_position({"iteration": 40, "loss": 1.0}, {"iterations": 200}) == (40, 200)
    assert train_position({"epoch": 3}, {}) == (3, None)
    assert train_position({"loss": 1.0}, {"iterations": 200}) is None


def test_quiet_by_default_and_verbose_brings_ray_data_output_back(monkeypatch):
    from ray.data import DataContext

    monkeypatch.delenv("PAPERLINE_VERBOSE", raising=False)
    assert not runtime.is_verbose()
    ctx = DataContext.get_current()
    try:
        runtime.quiet_data()
        assert not ctx.enable_progress_bars and not ctx.print_on_execution_start
        monkeypatch.setenv("PAPERLINE_VERBOSE", "1")
        assert runtime.is_verbose()
        runtime.quiet_data(runtime.is_verbose())
        assert ctx.enable_progress_bars
    finally:
        runtime.quiet_data()


def test_local_train_reports_still_reach_the_history(tmp_path):
    def train_fn(ctx, config):
        for it in range(1, config["iterations"] + 1):
            ctx.report({"iteration": it})

    result = LocalExecutor(progress=True).train(
        train_fn, {"iterations": 3}, storage_path=str(tmp_path), name="t-0"
    )
    assert [h["iteration"] for h in result.history] == [1, 2, 3]


def test_train_total_comes_from_the_config_before_any_report():
    assert train_total({"iterations": 400, "epochs": 2}) == ("iteration", 400)
    assert train_total({"epochs": 30}) == ("epoch", 30)
    assert train_total({"lr": 0.1}) == ("report", None)


def test_the_no_cpu_warning_is_dropped_only_when_quiet():
    import logging

    record = logging.LogRecord(
        "ray.data.dataset", logging.WARNING, "", 0, "The Dataset job will hang unless", (), None
    )
    log = logging.getLogger("ray.data.dataset")
    try:
        runtime.quiet_data(verbose=False)
        assert not log.filter(record)
        runtime.quiet_data(verbose=True)
        assert log.filter(record)
    finally:
        runtime.quiet_data()


def test_ray_noise_filter_drops_only_the_known_harmless_lines(tmp_path):
    """Ray writes to fds 1 and 2 past Python's logging (issue 22): the CLI drops the lines known
    not to concern a healthy run, keeps every other byte of each stream in order, and lets a
    progress bar's partial line through before its newline. (Each fd has its own filter thread,
    so only the order within a stream is kept: the test reads the two streams apart.)"""
    import select
    import subprocess
    import sys
    import time

    script = """
import os, time
from cluster import runtime
runtime.filter_ray_noise()
w = lambda b: os.write(2, b)
w(b"[2026-12-03 14:48:51,576 E 1 1] core_worker.cc:2465: Actor with class name: 'MapWorker' "
  b"has constructor arguments in the object store and max_restarts > 0. If the arguments\\n")
w(b"[2026-12-03 14:48:51,577 E 1 1] core_worker.cc:99: a real error\\n")
os.write(1, b"\\x1b[33m(raylet)\\x1b[0m WARNING: 10 PYTHON worker processes have been started on "
         b"node: abc with address: 127.0.0.1, which is 5x the maximum expected startup\\n")
print("the run's own stdout", flush=True)
w(b"\\rstep:  50%|#####     | 1/2")
time.sleep(1.5)
w(b"\\rstep: 100%|##########| 2/2\\n[pipe")
w(b"line] computed in 1.0 s\\n")
import sys; sys.stderr.write("python's own stderr\\n"); sys.stderr.flush()
w(b"no newline at exit")
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    err, seen_at = b"", {}
    start = time.monotonic()
    while True:  # read stderr as it arrives, noting when the bar's two states came
        ready, _, _ = select.select([proc.stderr], [], [], 30)
        chunk = proc.stderr.read1(1 << 16) if ready else b""
        if not chunk:
            break
        err += chunk
        for mark in (b"1/2", b"2/2"):
            if mark in err and mark not in seen_at:
                seen_at[mark] = time.monotonic() - start
    out = proc.stdout.read().decode()
    assert proc.wait(timeout=30) == 0, err.decode()
    assert out == "the run's own stdout\n"  # the raylet warning dropped, the rest kept
    assert err.decode() == (
        "[2026-12-03 14:48:51,577 E 1 1] core_worker.cc:99: a real error\n"
        "\rstep:  50%|#####     | 1/2\rstep: 100%|##########| 2/2\n"
        "[pipeline] computed in 1.0 s\npython's own stderr\nno newline at exit"
    )
    # the partial bar line arrived before the newline that the child wrote 1.5 s later
    assert seen_at[b"2/2"] - seen_at[b"1/2"] > 1.0, seen_at
