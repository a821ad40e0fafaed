"""The generalization step list: ``steps(cfg)`` turns the config into steps (names, adaptors, params
that enter the keys, resources)."""

from __future__ import annotations

import dataclasses

from cluster.resources import Resources
from pipelines.engine import Step
from pipelines.generalization.config import (
    EXPERIMENTS,
    GeneralizationConfig,
    require_data,
)
from pipelines.generalization.data import make_dataset, make_randomized
from pipelines.generalization.experiments import (
    run_expressivity,
    run_min_norm,
    sweep_corruption,
    sweep_randomization,
    sweep_regularizers,
)


def _models(section_models: tuple[str, ...], cfg: GeneralizationConfig) -> tuple[str, ...]:
    return section_models or cfg.train.models


def _toy(cfg: GeneralizationConfig) -> str:
    """What of this run is not the paper's data, for the report's first line ("" = nothing)."""
    want = set(cfg.experiments)
    toy = []
    if want & {"randomization", "corruption", "regularizers"} and cfg.data.source == "synthetic":
        toy.append("§2 trains on a generated CIFAR-10-format set")
    if "min_norm" in want and cfg.min_norm.source == "digits":
        toy.append("§5 interpolates scikit-learn's 8×8 digits (not MNIST)")
    return "; ".join(toy)


def steps(cfg: GeneralizationConfig) -> list[Step]:
    d, t = cfg.data, cfg.train
    require_data(cfg)  # exit 2 naming data.root / min_norm.root before anything runs
    want = set(cfg.experiments)
    train_params = {
        f.name: getattr(t, f.name)
        for f in dataclasses.fields(t)
        if f.name not in ("models", "seeds", "cpus_per_trial", "gpu")
    }
    trial = Resources(cpus=t.cpus_per_trial, gpus="auto" if t.gpu else 0)
    nets = [e for e in ("randomization", "corruption", "regularizers") if e in want]
    out: list[Step] = []
    if nets:
        variants = []
        if "randomization" in want:
            variants += list(cfg.randomization.conditions)
        if "regularizers" in want:
            variants += list(cfg.regularizers.labels)
        if "corruption" in want:
            variants += [f"corrupt:{p:g}" for p in cfg.corruption.ps]
        out += [
            Step(
                "dataset",
                make_dataset,
                params=dict(
                    source=d.source,
                    root=d.root if d.source != "synthetic" else "",
                    num_train=d.num_train,
                    num_test=d.num_test,
                    seed=d.seed,
                ),
                description="read CIFAR-10/MNIST (or generate the CIFAR-format set); 32x32 NHWC",
            ),
            Step(
                "randomize",
                make_randomized,
                inputs=("dataset",),
                params=dict(
                    variants=tuple(dict.fromkeys(variants)),
                    seeds=t.seeds,
                    seed=cfg.randomization.seed,
                ),
                description="§2 corruptions drawn once per seed, saved as arrays",
            ),
        ]
        common = dict(train=train_params, seeds=t.seeds)
        if "randomization" in want:
            out.append(
                Step(
                    "randomization",
                    sweep_randomization,
                    kind="sweep",
                    inputs=("dataset", "randomize"),
                    params=dict(
                        common,
                        models=_models(cfg.randomization.models, cfg),
                        conditions=cfg.randomization.conditions,
                    ),
                    resources=trial,
                    trials=len(_models(cfg.randomization.models, cfg))
                    * len(cfg.randomization.conditions)
                    * len(t.seeds),
                    description="Tune: conditions x models x seeds until 100% train accuracy",
                )
            )
        if "corruption" in want:
            out.append(
                Step(
                    "corruption",
                    sweep_corruption,
                    kind="sweep",
                    inputs=("dataset", "randomize"),
                    params=dict(
                        common, models=_models(cfg.corruption.models, cfg), ps=cfg.corruption.ps
                    ),
                    resources=trial,
                    trials=len(_models(cfg.corruption.models, cfg))
                    * len(cfg.corruption.ps)
                    * len(t.seeds),
                    description="Tune: label corruption p x models (Figure 1b/1c)",
                )
            )
        if "regularizers" in want:
            r = cfg.regularizers
            out.append(
                Step(
                    "regularizers",
                    sweep_regularizers,
                    kind="sweep",
                    inputs=("dataset", "randomize"),
                    params=dict(
                        common,
                        models=_models(r.models, cfg),
                        weight_decays=r.weight_decays,
                        random_crops=r.random_crops,
                        dropouts=r.dropouts,
                        labels=r.labels,
                    ),
                    resources=trial,
                    trials=len(_models(r.models, cfg))
                    * len(r.weight_decays)
                    * len(r.random_crops)
                    * len(r.dropouts)
                    * len(r.labels)
                    * len(t.seeds),
                    description="Tune: weight decay x random crop x dropout (Table 1)",
                )
            )
    if "expressivity" in want:
        e = cfg.expressivity
        out.append(
            Step(
                "expressivity",
                run_expressivity,
                params=dict(ns=e.ns, ds=e.ds, digits_n=e.digits_n, seed=e.seed),
                description="Theorem 1: 2n+d weights fit n points exactly",
            )
        )
    if "min_norm" in want:
        m = cfg.min_norm
        out.append(
            Step(
                "min_norm",
                run_min_norm,
                params=dict(
                    source=m.source,
                    root=m.root if m.source == "mnist" else "",
                    num_train=m.num_train,
                    num_test=m.num_test,
                    kernels=m.kernels,
                    ps=m.ps,
                    seed=m.seed,
                    **({"svc_C": m.svc_C} if m.svc_C else {}),
                ),
                # 2: one kernel and factorisation for every p; n and seconds per row; 3: cond(K)
                version="3",
                resources=Resources(cpus=1, memory_mb=0),
                description="§5: exact kernel interpolation, test error and norm vs label noise p",
            )
        )
    from pipelines.generalization.report import write_report

    out.append(
        Step(
            "report",
            write_report,
            # the dataset only when a net trained on it (§5 and Theorem 1 read their own data)
            inputs=(
                *(["dataset"] if nets else []),
                *(s.name for s in out if s.name not in ("dataset", "randomize")),
            ),  # fmt: skip
            params=dict(experiments=tuple(e for e in EXPERIMENTS if e in want), toy_data=_toy(cfg)),
            # 2: first line names generated / toy data; n and seconds of §5 (issue 20); 3: claims
            # with intervals, cond(K) of §5 (issue 21)
            version="3",
            publish=(
                "report.md",
                "claims.json",
                "sweep.parquet",
                "curves.parquet",
                "min_norm.parquet",
                "expressivity.parquet",
                "fig1a_loss.png",
                "fig1b_convergence.png",
                "fig1c_test_error.png",
                "capacity.png",
            ),
            description="sweep.parquet, curves.parquet, figures and report.md",
        )
    )
    return out
