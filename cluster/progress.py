"""The one progress display (issue 22): the engine's step lines and every progress bar write
through one lock, so concurrent steps never draw over each other.

On a terminal the running bars share one status line at the bottom, redrawn twice a second
(``selective search 12/15 item 80% [00:25<00:06] │ pretrain 20/30 epoch ...``); a step line
clears it, prints, and redraws it, and a bar that ran past ``BAR_DELAY_S`` leaves one final line
when it closes (``selective search: 15/15 item in 31.4 s (2.09 s/item)``). Anywhere else (a
pipe, a file, a notebook) nothing is redrawn: a bar prints a plain line to stderr once it has run
``BAR_DELAY_S`` and every ``LINE_INTERVAL_S`` after, and its final line at close.

Whether a stream is a terminal is remembered before ``cluster.runtime.filter_ray_noise`` puts
fds 1 and 2 on pipes (after that every ``isatty()`` says no, which is how the tqdm bars this
replaces ended up drawn once every 30 s, at one shared position, or not at all).
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading
import time

# A bar appears once its step has run this long: short steps keep to their start/end lines.
BAR_DELAY_S = 5.0
# Off a terminal, a running bar's line repeats this often.
LINE_INTERVAL_S = 30.0
# On a terminal, the status line is redrawn this often.
REDRAW_S = 0.5
DEFAULT_COLUMNS = 100

# fd -> a descriptor of what the fd was before the noise filter replaced it (terminal or not)
_original_fds: dict[int, int] = {}


def remember_terminal(fd: int, original: int) -> None:
    """``fd`` now writes to a filter; ``original`` is a duplicate of what it wrote to before."""
    _original_fds[fd] = original


def _fd_of(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # pytest's capture, StringIO, closed streams
        return None


def is_terminal(stream) -> bool:
    fd = _fd_of(stream)
    if fd is None:
        return False
    try:
        return os.isatty(_original_fds.get(fd, fd))
    except OSError:
        return False


def columns(stream) -> int:
    """The terminal's width; ``DEFAULT_COLUMNS`` where it reports none (``script`` without a
    size reports 0)."""
    fd = _fd_of(stream)
    try:
        width = os.get_terminal_size(_original_fds.get(fd, fd)).columns if fd is not None else 0
    except OSError:
        width = 0
    return width if width > 0 else DEFAULT_COLUMNS


def bar_desc(name: str) -> str:
    """A Train run's or Tune experiment's bar label from its name, ``<step>-<16-hex key>[-part]``:
    the step and the part (``train_learned-2f597ad24cbbca1d-runs5`` → ``train_learned runs5``)."""
    return re.sub(r"-[0-9a-f]{16}(?=-|$)", "", name).replace("-", " ")


def clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return (
        f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
        if hours
        else f"{rest // 60:02d}:{rest % 60:02d}"
    )


def _count(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) and not float(x).is_integer() else f"{int(x)}"


class Bar:
    """A long unit of work's progress: ``update(n)``, ``n``, ``total`` (settable), ``close()``.
    With ``total=None`` and ``unit=""`` it only shows that the work is running, and how long."""

    def __init__(self, display: Display, total: float | None, desc: str, unit: str, final: bool):
        self.display, self.total, self.desc, self.unit, self.final = (
            display,
            total,
            desc,
            unit,
            final,
        )
        self.n: float = 0
        self.start = display.now()
        self.last_line = float("-inf")  # off a terminal: when this bar's line was last printed
        self.n_at_line: float = 0  # and at what count

    def update(self, n: float = 1) -> None:
        with self.display.lock:
            self.n += n

    def close(self) -> None:
        self.display.close(self)

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def elapsed(self, now: float) -> float:
        return now - self.start

    def status(self, now: float) -> str:
        """The short form, for the shared status line."""
        elapsed = self.elapsed(now)
        if not self.unit:
            return f"{self.desc} {clock(elapsed)}"
        head = f"{self.desc} {_count(self.n)}"
        if self.total:
            head += f"/{_count(self.total)} {self.unit} {100 * self.n / self.total:.0f}%"
            return f"{head} [{clock(elapsed)}<{self._eta(elapsed)}]"
        return f"{head} {self.unit} [{clock(elapsed)}]"

    def line(self, now: float) -> str:
        """The long form, a line of its own off a terminal."""
        elapsed = self.elapsed(now)
        if not self.unit:
            return f"{self.desc}: running, {clock(elapsed)}"
        text = f"{self.desc}: {_count(self.n)}"
        if self.total:
            text += f"/{_count(self.total)} {self.unit} ({100 * self.n / self.total:.0f}%)"
            return f"{text}, {clock(elapsed)} elapsed, ETA {self._eta(elapsed)}"
        return f"{text} {self.unit}, {clock(elapsed)} elapsed"

    def summary(self, now: float) -> str:
        """The final line: how much, how long, at what rate."""
        elapsed = self.elapsed(now)
        done = f"{_count(self.n)}/{_count(self.total)}" if self.total else _count(self.n)
        text = f"{self.desc}: {done} {self.unit} in {elapsed:.1f} s"
        if self.n > 0 and elapsed > 0:
            rate = self.n / elapsed
            text += (
                f" ({rate:.2f} {self.unit}/s)" if rate >= 1 else f" ({1 / rate:.2f} s/{self.unit})"
            )
        return text

    def _eta(self, elapsed: float) -> str:
        if not self.total or self.n <= 0:
            return "?"
        return clock(elapsed * (self.total - self.n) / self.n)


class Display:
    """Owns stdout's step lines and the bars; ``refresh`` is called by a daemon thread while any
    bar is open."""

    def __init__(
        self, delay_s: float = BAR_DELAY_S, *, stdout=None, stderr=None, now=None, tick=True
    ):
        self._stdout, self._stderr = stdout, stderr  # None: sys's, looked up at each write
        self.now = now or time.monotonic  # tests pass their own clock, and tick=False
        self.tick = tick
        self.lock = threading.RLock()
        self.delay_s = delay_s
        self.bars: list[Bar] = []
        self.drawn = False  # a status line is on the terminal now
        self._ticker: threading.Thread | None = None

    # where things go -------------------------------------------------------------------
    @property
    def stdout(self):
        return self._stdout or sys.stdout

    @property
    def stderr(self):
        return self._stderr or sys.stderr

    def _status_stream(self):
        """The terminal the status line goes to (stdout preferred: the step lines' stream, so
        one filter thread keeps their order), or None off a terminal."""
        for stream in (self.stdout, self.stderr):
            if is_terminal(stream):
                return stream
        return None

    @staticmethod
    def _write(stream, text: str) -> None:
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):  # a closed reader (`| head`): progress is never an error
            pass

    # the engine's lines ----------------------------------------------------------------
    def print_line(self, line: str) -> None:
        """A step line on stdout: text and newline in one write, never inside a bar."""
        with self.lock:
            stream = self._status_stream()
            if stream is self.stdout and self.drawn:
                self._write(stream, "\r\x1b[K" + line + "\n")
                self.drawn = False
                self._draw(stream, self.now())
            else:
                self._write(self.stdout, line + "\n")

    # bars ------------------------------------------------------------------------------
    def bar(self, total, desc: str, unit: str, *, final: bool = True) -> Bar:
        b = Bar(self, total, desc, unit, final)
        with self.lock:
            self.bars.append(b)
            if self.tick and (self._ticker is None or not self._ticker.is_alive()):
                self._ticker = threading.Thread(
                    target=self._tick, name="paperline-progress", daemon=True
                )
                self._ticker.start()
        return b

    def _tick(self) -> None:
        while True:
            time.sleep(REDRAW_S)
            with self.lock:
                if not self.bars:
                    self._ticker = None
                    return
                self.refresh()

    def _shown(self, now: float) -> list[Bar]:
        return [b for b in self.bars if b.elapsed(now) >= self.delay_s]

    def refresh(self) -> None:
        with self.lock:
            now = self.now()
            stream = self._status_stream()
            if stream is not None:
                self._draw(stream, now)
                return
            for b in self._shown(now):
                # a line when due and something moved: queued or stalled work (8 Train jobs on
                # 2 CPUs) would repeat "0/5 run" every interval; a running indicator has no count
                # and a running indicator (no count) every 4 intervals: "still running" lines
                moved = b.n != b.n_at_line if b.unit else True
                every = LINE_INTERVAL_S if b.unit else 4 * LINE_INTERVAL_S
                if now - b.last_line >= every and moved:
                    b.last_line, b.n_at_line = now, b.n
                    self._write(self.stderr, b.line(now) + "\n")

    def _draw(self, stream, now: float) -> None:
        shown = self._shown(now)
        if not shown and not self.drawn:
            return
        # bars under way first: what is left of a narrow terminal goes to those that move
        shown.sort(key=lambda b: b.n <= 0)
        text = " │ ".join(b.status(now) for b in shown)
        width = columns(stream) - 1
        if len(text) > width:
            text = text[: max(width - 1, 0)] + "…"
        self._write(stream, "\r\x1b[K" + text)
        self.drawn = bool(text)

    def close(self, b: Bar) -> None:
        with self.lock:
            now = self.now()
            if b not in self.bars:
                return
            self.bars.remove(b)
            stream = self._status_stream()
            if b.final and b.elapsed(now) >= self.delay_s:
                line = b.summary(now)
                if stream is not None:
                    self._write(stream, "\r\x1b[K" + line + "\n")
                    self.drawn = False
                else:
                    self._write(self.stderr, line + "\n")
            if stream is not None:
                self._draw(stream, now)

    def finish(self) -> None:
        """At exit (an interrupted run leaves bars open): clear the status line, so the shell's
        prompt does not start after it."""
        with self.lock:
            stream = self._status_stream()
            if stream is not None and self.drawn:
                self._write(stream, "\r\x1b[K")
                self.drawn = False


class _Off:
    """The bar of a display that is off: counts, draws nothing."""

    def __init__(self, total):
        self.total, self.n = total, 0

    def update(self, n: float = 1) -> None:
        self.n += n

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


DISPLAY = Display()
atexit.register(DISPLAY.finish)


def progress_bar(total, desc: str, unit: str, *, enabled: bool = True, final: bool = True):
    """The one progress display of a long unit of work (map items, inference rows, training
    iterations, sweep trials, or a single task's running time with ``unit=""``)."""
    return DISPLAY.bar(total, desc, unit, final=final) if enabled else _Off(total)


def print_line(line: str) -> None:
    DISPLAY.print_line(line)
