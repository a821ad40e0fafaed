"""A toy pipeline for engine tests: numbers → squares (map) → total, with a counter of computations.

Module-level functions so that Ray can import them on workers.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.resources import Resources
from pipelines.config import check
from pipelines.engine import Step, StepContext
from pipelines.registry import PipelineSpec


def _count(counter_dir: str, step: str) -> None:
    """Append one line per computation, so tests can count them across processes."""
    with open(Path(counter_dir) / f"{step}.count", "a") as f:
        f.write("x\n")


def counts(counter_dir: str | Path) -> dict[str, int]:
    return {p.stem: len(p.read_text().splitlines()) for p in Path(counter_dir).glob("*.count")}


def make_numbers(ctx: StepContext, *, n: int, counter_dir: str, sleep_s: float = 0.0) -> None:
    _count(counter_dir, "numbers")
    time.sleep(sleep_s)
    ctx.write_json("numbers.json", list(range(n)))


def _square(x: int) -> int:
    return x * x


def square_all(
    ctx: StepContext, *, power_offset: int, counter_dir: str, fail_marker: str, pause_file: str = ""
) -> None:
    _count(counter_dir, "squares")
    numbers = ctx.inputs["numbers"].read_json("numbers.json")
    (ctx.out_dir / "partial.txt").write_text("half-written")
    if fail_marker and os.path.exists(fail_marker):
        raise RuntimeError("injected failure in the middle of the step")
    # held mid-step while the file exists (or `<pause_file>-<offset>`: one sweep trial alone)
    while pause_file and (
        os.path.exists(pause_file) or os.path.exists(f"{pause_file}-{power_offset}")
    ):
        time.sleep(0.05)
    squares = ctx.map(_square, numbers)
    ctx.write_json("squares.json", [s + power_offset for s in squares])


def total(ctx: StepContext, *, counter_dir: str) -> None:
    _count(counter_dir, "total")
    squares = ctx.inputs["squares"].read_json("squares.json")
    ctx.write_json("metrics.json", {"total": sum(squares)})
    (ctx.out_dir / "report.md").write_text(f"# total\n\n{sum(squares)}\n")


def label(
    ctx: StepContext, *, text: str, counter_dir: str, sleep_s: float = 0.0, fail_marker: str = ""
) -> None:
    """Independent of the chain above (runs concurrently with it on Ray). Fails for one text when
    ``<fail_marker>-<text>`` exists (a sweep trial that fails alone)."""
    _count(counter_dir, "label")
    if fail_marker and os.path.exists(f"{fail_marker}-{text}"):
        raise RuntimeError(f"injected failure for text={text!r}")
    time.sleep(sleep_s)
    ctx.write_json("label.json", {"text": text})


def toy_steps(
    counter_dir: str | Path,
    *,
    n: int = 5,
    offset: int = 0,
    text: str = "hi",
    fail_marker: str = "",
    sleep_s: float = 0.0,
    pause_file: str = "",
) -> list[Step]:
    c = str(counter_dir)
    return [
        Step(
            "numbers",
            functools.partial(make_numbers, counter_dir=c, sleep_s=sleep_s),
            kind="task",
            params={"n": n},
        ),
        Step(
            "squares",
            functools.partial(
                square_all, counter_dir=c, fail_marker=fail_marker, pause_file=pause_file
            ),
            kind="map",
            inputs=("numbers",),
            params={"power_offset": offset},
            resources=Resources(cpus=1),
        ),
        Step(
            "total",
            functools.partial(total, counter_dir=c),
            inputs=("squares",),
            publish=("report.md",),
        ),
        Step(
            "label",
            functools.partial(label, counter_dir=c, sleep_s=sleep_s, fail_marker=fail_marker),
            params={"text": text},
        ),
    ]


def read(artifact, name: str):
    return json.loads((artifact.local_dir() / name).read_text())


# ---- the toy as a registered-style pipeline (``tests.pipelines.toy:PIPELINE``), for sweeps -------
@dataclass(frozen=True)
class ToySection:
    n: int = 5
    offset: int = 0

    def __post_init__(self):
        check(self.n >= 1, f"toy.n must be >= 1, got {self.n}")


@dataclass(frozen=True)
class ToyConfig:
    toy: ToySection = ToySection()
    text: str = "hi"
    scale: float = 1.0  # a float field, for sampled sweeps (not used by any step)
    # plumbing, not science: where computations are counted / the failure switch (not in keys)
    counter_dir: str = ""
    fail_marker: str = ""
    sleep_s: float = 0.0
    pause_file: str = ""


def _toy_pipeline_steps(cfg: ToyConfig) -> list[Step]:
    return toy_steps(
        cfg.counter_dir,
        n=cfg.toy.n,
        offset=cfg.toy.offset,
        text=cfg.text,
        fail_marker=cfg.fail_marker,
        sleep_s=cfg.sleep_s,
        pause_file=cfg.pause_file,
    )


PIPELINE = PipelineSpec(
    name="toy",
    summary="numbers -> squares -> total",
    config=ToyConfig,
    presets={"small": {}, "big": {"toy.n": 8}},
    default_preset="small",
    steps=_toy_pipeline_steps,
    metric="total",
)
