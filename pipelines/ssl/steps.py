"""The SSL step list: ``steps(cfg)`` turns the config into steps (names, adaptors, params that
enter the keys, resources)."""

from __future__ import annotations

import dataclasses
import functools

from cluster.resources import Resources
from pipelines.engine import Step
from pipelines.ssl.config import SSLConfig, require_data
from pipelines.ssl.data import make_dataset
from pipelines.ssl.report import write_report
from pipelines.ssl.train import sweep_scalar, train_method


def _scalar_grid(cfg: SSLConfig) -> tuple[float, ...]:
    """The scalar-λ sweep's values. λ = 1 is FixMatch itself, so with one training worker the
    report reuses the uniform runs as that candidate; with several, the uniform runs train
    differently from the single-process Tune trials (half batches, per-worker BatchNorm
    statistics), so the sweep trains λ = 1 itself and every candidate is trained alike."""
    grid = cfg.baselines.scalar_grid
    if cfg.experiment.num_workers > 1 and 1.0 not in grid:
        grid = (*grid, 1.0)
    return grid


def _settings(cfg: SSLConfig, method: str) -> dict:
    """The run settings of one method; knobs it does not use stay at their defaults, so changing
    them leaves its artifact cached."""
    from stages.ssl.train import TrainSettings

    f, w, b = cfg.fixmatch, cfg.weights, cfg.baselines
    s = TrainSettings(
        method=method,
        model=f.model,
        model_kwargs=(("widths", f.widths),) if f.widths else (),
        steps=f.steps,
        batch_size=f.batch_size,
        mu=f.mu,
        lr=f.lr,
        weight_decay=f.weight_decay,
        threshold=f.threshold,
        unlabeled_coef=f.unlabeled_coef,
        ema_decay=f.ema_decay,
        flip=f.flip,
        translate_frac=f.translate_frac,
        ra_ops=f.ra_ops,
        ra_bins=f.ra_bins,
        cutout_frac=f.cutout_frac,
        eval_every=f.eval_every,
        last_k=f.last_k,
    )
    if method == "learned":
        s = dataclasses.replace(
            s,
            inner_steps=w.inner_steps,
            outer_lr=w.outer_lr,
            damping=w.damping,
            val_batch=w.val_batch,
            lambda_snapshots=w.lambda_snapshots,
        )
    if method == "mcdropout":
        s = dataclasses.replace(s, mc_samples=b.mc_samples, mc_dropout=b.mc_dropout)
    return dataclasses.asdict(s)


def steps(cfg: SSLConfig) -> list[Step]:
    d, e = cfg.data, cfg.experiment
    require_data(d)  # exit 2 naming data.root before anything runs
    data_params = dict(source=d.source, root="", digits_size_px=0, digits_test=0, num_train=0,
                       num_test=0, seed=0)  # fmt: skip
    if d.source == "digits":
        data_params.update(digits_size_px=d.digits_size_px, digits_test=d.digits_test, seed=d.seed)
    elif d.source == "synthetic":
        data_params.update(num_train=d.num_train, num_test=d.num_test, seed=d.seed)
    elif d.source == "mnist":  # the first num_train / num_test of each IDX split
        data_params.update(root=d.root, num_train=d.num_train, num_test=d.num_test)
    else:
        data_params.update(root=d.root)
    resources = Resources(cpus=e.cpus_per_worker, gpus="auto")
    runs = [{"labels_per_class": n, "seed": s} for n in e.labels_per_class for s in e.seeds]
    out = [
        Step("dataset", make_dataset, kind="task", params=data_params,
             description="read or generate the image set; uint8 arrays in data.npz"),
    ]  # fmt: skip
    trained = [m for m in e.methods if m != "scalar"]
    for method in trained:
        out.append(
            Step(
                f"train_{method}",
                # execution knobs, outside the key: a resumed run ends as an uninterrupted one
                functools.partial(
                    train_method,
                    checkpoint_every=e.checkpoint_every,
                    max_failures=e.max_failures,
                    parallel_runs=e.parallel_runs,
                ),
                kind="train",
                inputs=("dataset",),
                params=dict(
                    settings=_settings(cfg, method),
                    runs=runs,
                    val_per_class=e.val_per_class,
                    num_workers=e.num_workers,
                ),
                resources=resources,
                description=f"{method}: every labelled size × seed under Ray Train",
            )
        )
    if "scalar" in e.methods:
        out.append(
            Step(
                "scalar_sweep",
                sweep_scalar,
                kind="sweep",
                inputs=("dataset",),
                params=dict(
                    settings=_settings(cfg, "scalar"),
                    labels_per_class=e.labels_per_class,
                    seeds=e.seeds,
                    grid=_scalar_grid(cfg),
                    val_per_class=e.val_per_class,
                ),
                resources=Resources(cpus=e.cpus_per_worker, gpus="auto"),
                trials=len(_scalar_grid(cfg)) * len(e.labels_per_class) * len(e.seeds),
                description="one scalar λ for all unlabeled examples, tuned on validation (Tune)",
            )
        )
    out.append(
        Step(
            "report",
            write_report,
            kind="task",
            # 4: first line names toy / generated data (issue 20); 5: claims (issue 21)
            version="5",
            inputs=(
                "dataset",
                *(f"{m}=train_{m}" for m in trained),
                *(("scalar=scalar_sweep",) if "scalar" in e.methods else ()),
            ),
            params=dict(
                methods=e.methods,
                source=d.source,
                model=cfg.fixmatch.model,
                steps=cfg.fixmatch.steps,
                last_k=cfg.fixmatch.last_k,
                inner_steps=cfg.weights.inner_steps,
            ),
            publish=(
                "report.md",
                "claims.json",
                "results.parquet",
                "lambda_hist.png",
                "accuracy.png",
                "lambda_vs_correct.png",
            ),
            description="table over methods × labels × seeds, λ analysis, outer-step cost",
        )  # fmt: skip
    )
    return out
