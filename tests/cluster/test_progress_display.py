"""Issue 22: one progress display for step lines and bars, on a terminal and off one.

The display's clock is the test's own (and its redraw thread off), so what is drawn at which
elapsed time is pinned exactly; a pseudo-terminal stands in for the user's terminal."""

import io
import os

import pytest

from cluster import progress
from cluster.progress import Display, clock


@pytest.fixture
def pty_stdout():
    """A pseudo-terminal of no reported size (as under ``script``) as the display's stdout;
    yields a reader of what reached the terminal (the display is made with ``tty_display``)."""
    master, slave = os.openpty()
    out = os.fdopen(slave, "w", buffering=1, closefd=True)
    os.set_blocking(master, False)

    def read() -> str:
        out.flush()
        chunks = []
        while True:
            try:
                chunk = os.read(master, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode().replace("\r\n", "\n")  # the tty's ONLCR

    read.stream = out
    yield read
    out.close()
    os.close(master)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def tty_display(read, delay_s: float, clock: Clock) -> Display:
    # stderr off the terminal: what the display writes there must stay empty
    return Display(delay_s, stdout=read.stream, stderr=io.StringIO(), now=clock, tick=False)


def test_clock_and_counts_read_like_a_stopwatch():
    assert clock(0) == "00:00"
    assert clock(75.9) == "01:15"
    assert clock(3 * 3600 + 62) == "3:01:02"
    t = Clock()
    b = Display(5, now=t, tick=False).bar(8, "svm", "item")
    b.update(2)
    b.update(0.5)
    assert b.status(t.t + 10) == "svm 2.5/8 item 31% [00:10<00:22]"


def test_off_a_terminal_bars_print_plain_lines_to_stderr(capsys):
    t = Clock()
    d = Display(5, now=t, tick=False)
    b = d.bar(15, "selective search", "item")
    b.update(3)
    for t.t in (1004, 1006, 1020):  # before the delay nothing; then not again within 30 s
        d.refresh()
    b.update(9)
    t.t = 1036.5
    d.refresh()
    b.update(3)
    t.t = 1045
    b.close()
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "selective search: 3/15 item (20%), 00:06 elapsed, ETA 00:24",
        "selective search: 12/15 item (80%), 00:36 elapsed, ETA 00:09",
        "selective search: 15/15 item in 45.0 s (3.00 s/item)",
    ]


def test_short_bars_and_running_indicators_leave_no_final_line(capsys):
    t = Clock()
    d = Display(5, now=t, tick=False)
    quick = d.bar(4, "detect", "item")
    quick.update(4)
    t.t += 3
    quick.close()  # shorter than the delay: its step lines say enough
    task = d.bar(None, "region_features", "", final=False)
    start = t.t
    for elapsed in (12, 60, 140):  # "still running" every 2 minutes, not every 30 s
        t.t = start + elapsed
        d.refresh()
    task.close()
    assert (
        capsys.readouterr().err
        == "region_features: running, 00:12\nregion_features: running, 02:20\n"
    )


def test_on_a_terminal_bars_share_one_status_line_and_step_lines_clear_it(pty_stdout):
    t = Clock()
    d = tty_display(pty_stdout, 5, t)
    sel = d.bar(15, "selective search", "item")
    pre = d.bar(30, "pretrain", "epoch")
    sel.update(12)
    pre.update(10)
    t.t += 2
    d.refresh()  # neither shown yet
    d.print_line("[rcnn] proposals: running (map)")
    assert pty_stdout() == "[rcnn] proposals: running (map)\n"  # no status line to clear
    t.t += 8
    d.refresh()
    status = (
        "selective search 12/15 item 80% [00:10<00:02] │ pretrain 10/30 epoch 33% [00:10<00:20]"
    )
    assert pty_stdout() == "\r\x1b[K" + status
    d.print_line("[rcnn] proposal_report: running (task)")
    # the status cleared, the step line on its own line, the status drawn again below it
    assert pty_stdout() == "\r\x1b[K[rcnn] proposal_report: running (task)\n\r\x1b[K" + status
    sel.update(3)
    t.t += 21.4
    sel.close()
    assert pty_stdout() == (
        "\r\x1b[Kselective search: 15/15 item in 31.4 s (2.09 s/item)\n"
        "\r\x1b[Kpretrain 10/30 epoch 33% [00:31<01:02]"  # the other bar goes on below
    )
    pre.update(20)
    pre.close()
    assert pty_stdout() == "\r\x1b[Kpretrain: 30/30 epoch in 31.4 s (1.05 s/epoch)\n"
    d.refresh()
    assert pty_stdout() == ""  # nothing open, nothing drawn
    d.bar(3, "interrupted", "item")
    t.t += 6
    d.refresh()
    d.finish()  # at exit with a bar still open: the status line is cleared for the prompt
    assert pty_stdout().endswith("interrupted 0/3 item 0% [00:06<?]\r\x1b[K")
    assert d.stderr.getvalue() == ""


def test_a_terminal_of_no_size_gets_the_default_width(pty_stdout):
    t = Clock()
    d = tty_display(pty_stdout, 0, t)
    d.bar(None, "x" * 300, "")
    d.refresh()
    drawn = pty_stdout()
    assert drawn.startswith("\r\x1b[K") and drawn.endswith("…")
    assert len(drawn) - len("\r\x1b[K") == progress.DEFAULT_COLUMNS - 1


def test_the_terminal_is_remembered_past_the_noise_filter(monkeypatch):
    """``filter_ray_noise`` puts fds 1 and 2 on pipes; the display must still know they end on
    a terminal (without this, every bar drew as if on a pipe)."""
    master, slave = os.openpty()
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    try:
        assert not progress.is_terminal(stream)
        monkeypatch.setitem(progress._original_fds, write_end, slave)
        assert progress.is_terminal(stream)
        assert progress.columns(stream) == progress.DEFAULT_COLUMNS  # a pty of no size
    finally:
        stream.close()
        for fd in (read_end, master, slave):
            os.close(fd)


def test_engine_shows_a_running_task_and_a_map_bar_off_a_terminal(tmp_path, capsys, monkeypatch):
    import time

    from cluster.local import LocalExecutor
    from data.store import ArtifactStore
    from pipelines.engine import Step, run_steps

    monkeypatch.setattr(progress.DISPLAY, "delay_s", 0.2)
    monkeypatch.setattr(progress, "LINE_INTERVAL_S", 0.3)

    def slow_task(ctx):
        time.sleep(0.9)
        return {"metrics": {}}

    def slow_map(ctx):
        ctx.map(time.sleep, [0.2] * 3, desc="sleeping")
        return {"metrics": {}}

    steps = [Step("waits", slow_task), Step("maps", slow_map, kind="map", inputs=("waits",))]
    run_steps("p", steps, store=ArtifactStore(tmp_path), executor=LocalExecutor(progress=True))
    out, err = capsys.readouterr()
    assert "[p] waits: running (task)" in out and "[p] maps: computed in" in out
    assert "waits: running, 00:00" in err  # the task's indicator, every interval
    assert [x for x in err.splitlines() if x.startswith("sleeping: 3/3 item in")]
    assert "waits:" not in err.split("sleeping")[-1]  # the indicator closed with its step


def test_off_a_terminal_queued_bars_stay_quiet_until_they_move(capsys):
    """Eight Train jobs on 2 CPUs: the waiting ones must not print "0/5 run" every interval."""
    t = Clock()
    d = Display(5, now=t, tick=False)
    waiting = d.bar(5, "train_learned runs5", "run")
    moving = d.bar(4, "train_supervised runs5", "run")
    for _ in range(3):
        t.t += 30
        moving.update(1)
        d.refresh()
    assert capsys.readouterr().err.splitlines() == [
        f"train_supervised runs5: {k}/4 run ({25 * k}%), {clock(30 * k)} elapsed, "
        f"ETA {clock(30 * (4 - k))}"
        for k in (1, 2, 3)
    ]
    waiting.update(0.5)
    t.t += 30
    d.refresh()
    assert (
        capsys.readouterr().err
        == "train_learned runs5: 0.5/5 run (10%), 02:00 elapsed, ETA 18:00\n"
    )


def test_on_a_terminal_bars_under_way_come_first(pty_stdout):
    t = Clock()
    d = tty_display(pty_stdout, 0, t)
    d.bar(5, "queued", "run")
    d.bar(4, "moving", "run").update(1)
    t.t += 1
    d.refresh()
    assert pty_stdout() == "\r\x1b[Kmoving 1/4 run 25% [00:01<00:03] │ queued 0/5 run 0% [00:01<?]"


def test_bar_labels_drop_the_step_key():
    from cluster.progress import bar_desc

    assert bar_desc("train_learned-2f597ad24cbbca1d-runs5") == "train_learned runs5"
    assert bar_desc("finetune-c77306604c66ef28") == "finetune"
    assert bar_desc("width_sweep-3fb8d7f869c75bbe") == "width_sweep"
    assert bar_desc("detect-nobb") == "detect nobb"  # no key: the name as it is
