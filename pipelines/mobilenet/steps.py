"""The mobilenet step list: ``steps(cfg)`` turns the config into steps (names, adaptors, params
that enter the keys, resources)."""

from __future__ import annotations

from dataclasses import asdict

from cluster.resources import Resources
from pipelines.engine import Step
from pipelines.mobilenet.config import (
    MobileNetConfig,
    require_data,
    width_points,
)
from pipelines.mobilenet.data import make_dataset
from pipelines.mobilenet.experiments import (
    measure_complexity,
    run_sweep,
    train_reference,
)
from pipelines.mobilenet.report import write_report


def steps(cfg: MobileNetConfig) -> list[Step]:
    d, c, t, s, a = cfg.data, cfg.complexity, cfg.train, cfg.sweep, cfg.ablations
    require_data(d)  # before any step runs: `paperline run` exits 2 naming data.root
    optim, model = asdict(cfg.optim), asdict(cfg.model)  # every value enters the step keys
    trial = Resources(cpus=cfg.trial_cpus, gpus="auto")
    return [
        Step(
            "dataset",
            make_dataset,
            params=dict(
                root=d.root,
                num_train=d.num_train,
                num_test=d.num_test,
                seed=d.seed,
                **({"source": d.source} if d.source != "cifar10" else {}),
            ),
            # 2: with a root, num_train/num_test select the first N images (were ignored)
            version="2" if d.root else "1",
            description="generate the CIFAR-10-format set, or check the one at data.root",
        ),
        Step(
            "complexity",
            measure_complexity,
            params=asdict(c),
            resources=Resources(cpus=c.latency_threads),
            publish=("complexity.parquet",),
            description="params, MAdds (flop_counter / 2), batch-1 CPU latency; 1000 classes",
        ),
        Step(
            "train",
            train_reference,
            kind="train",
            inputs=("dataset",),
            params=dict(optim=optim, model=model, **asdict(t)),
            resources=trial,
            description="the reference MobileNetV2 under Ray Train",
        ),
        Step(
            "width_sweep",
            run_sweep,
            kind="sweep",
            inputs=("dataset",),
            params=dict(
                points=width_points(s),
                seeds=s.seeds,
                optim=optim,
                model=model,
                epochs=s.epochs,
                scheduler=s.scheduler,
            ),
            resources=trial,
            trials=len(width_points(s)) * len(s.seeds),
            description="accuracy over width × resolution × seed, plus MobileNetV1 (Fig. 5)",
        ),
        Step(
            "ablations",
            run_sweep,
            kind="sweep",
            inputs=("dataset",),
            params=dict(
                points=tuple(f"{v}:{a.width}@{a.resolution}" for v in a.variants),
                seeds=a.seeds,
                optim=optim,
                model=model,
                epochs=a.epochs,
                scheduler="none",
            ),
            resources=trial,
            trials=len(a.variants) * len(a.seeds),
            description="linear vs ReLU6 bottleneck; shortcut placement (Fig. 6)",
        ),
        Step(
            "report",
            write_report,
            inputs=("dataset", "complexity", "train", "width_sweep", "ablations"),
            # 2: first line names generated data; grey IDX input (issue 20); 3: claims (issue 21)
            version="3",
            params=dict(
                stem_stride=cfg.model.stem_stride,
                optimizer=cfg.optim.optimizer,
                width_epochs=s.epochs or cfg.optim.epochs,
                ablation_epochs=a.epochs or cfg.optim.epochs,
                scheduler=s.scheduler,
            ),
            publish=(
                "report.md",
                "claims.json",
                "sweep.parquet",
                "figure5_accuracy_vs_madds.png",
                "figure6_ablations.png",
            ),
            description="sweep.parquet, Figure 5 / 6 shapes, tables beside the paper's numbers",
        ),
    ]
