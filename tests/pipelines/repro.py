"""A two-step pipeline for the reproducibility contract (issue 22): ``fit`` trains R-CNN's small CNN
for a few SGD steps under ``ctx.train`` (a Ray Train worker on Ray) and ``score`` evaluates it in a
task. Its training is thread-sensitive on a CPU (1 vs 2 torch threads give different weights), so
a test can tell whether an execution knob leaked into the bytes.

``tests.pipelines.repro:PIPELINE``; module-level functions so that Ray workers can import them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from cluster.resources import Resources
from pipelines.config import check
from pipelines.engine import Step, StepContext
from pipelines.registry import PipelineSpec

SIZE_PX = 64
BATCH = 64


def _data(seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * BATCH, 3, SIZE_PX, SIZE_PX, generator=g)  # (N, C, H, W)
    y = torch.randint(0, 5, (4 * BATCH,), generator=g)
    return x, y


def train_fn(ctx, config: dict) -> None:
    import torch

    from stages.models.registry import create

    x, y = _data(config["seed"])
    torch.manual_seed(config["seed"])
    net = ctx.prepare_model(create("rcnn_small", num_classes=5, input_size=SIZE_PX))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for i in range(config["steps"]):
        b = slice((i * BATCH) % len(x), (i * BATCH) % len(x) + BATCH)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x[b]), y[b]).backward()
        opt.step()
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    ctx.report({"steps": config["steps"]}, checkpoint={"model": state})


def fit(ctx: StepContext, *, steps: int, seed: int) -> None:
    result = ctx.train(train_fn, {"steps": steps, "seed": seed})
    state = result.checkpoint["model"]
    weights = np.concatenate([state[k].numpy().ravel() for k in sorted(state)])
    np.save(ctx.out_dir / "weights.npy", weights)


def score(ctx: StepContext, *, seed: int) -> None:
    weights = np.load(ctx.input_dir("fit") / "weights.npy")
    x, _ = _data(seed + 1)
    projection = x.reshape(len(x), -1).numpy()[:, :64] @ weights[: 64 * 8].reshape(64, 8)
    np.save(ctx.out_dir / "scores.npy", projection)
    ctx.write_json("metrics.json", {"score": float(np.abs(projection).mean())})


@dataclass(frozen=True)
class FitSection:
    steps: int = 4
    seed: int = 0
    threads: int = 2  # torch threads: in the key
    cpus: float = 2  # the worker's CPU request: scheduling only

    def __post_init__(self):
        check(self.threads >= 1 and self.cpus >= 1, "fit.threads and fit.cpus must be >= 1")


@dataclass(frozen=True)
class ScoreSection:
    label: str = "a"  # read by no step: a sweep over it runs equal trials


@dataclass(frozen=True)
class ReproConfig:
    fit: FitSection = FitSection()
    score: ScoreSection = ScoreSection()


def repro_steps(cfg: ReproConfig) -> list[Step]:
    return [
        Step(
            "fit",
            fit,
            kind="train",
            params={"steps": cfg.fit.steps, "seed": cfg.fit.seed},
            resources=Resources(cpus=cfg.fit.cpus, torch_threads=cfg.fit.threads),
        ),
        Step("score", score, inputs=("fit",), params={"seed": cfg.fit.seed}),
    ]


PIPELINE = PipelineSpec(
    name="repro",
    summary="thread-sensitive training, for the same-key-same-bytes test",
    config=ReproConfig,
    presets={"small": {}},
    default_preset="small",
    steps=repro_steps,
    metric="score",
)


def artifact_bytes(result, step: str) -> dict[str, bytes]:
    """Every file of a step's artifact (completion marker aside), by relative path."""
    root = result.artifacts[step].local_dir()
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith("_")
    }


def dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True)
