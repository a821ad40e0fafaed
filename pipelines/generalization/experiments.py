"""Rethinking generalization's experiment steps: the Tune sweeps (randomization, corruption,
regularizers) with the schemas of their rows and curves, Theorem 1's expressivity grid and §5's
min-norm interpolation. Every function here takes explicit arguments."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.space import Grid
from pipelines.engine import StepContext
from pipelines.generalization.data import clean_set


def regulariser_label(weight_decay: float, random_crop: bool, dropout: float) -> str:
    """A run's regularisers as the report names them: "none", or e.g. "wd+crop" (the paper's
    Table 1 keys in ``report.PAPER_TABLE1`` use the same names and order)."""
    on = (("wd", weight_decay > 0), ("crop", random_crop), ("dropout", dropout > 0))
    return "+".join(name for name, used in on if used) or "none"


def _trial_mb(ctx: StepContext, grids: dict, train: dict, meta: dict) -> int:
    """A trial's memory request: the clean arrays as stored, the trial's corrupted copy and both
    as float32 tensors (6 copies of the uint8 set), and the largest model of the grid training
    a batch of centre crops."""
    from pipelines.memory import input_bytes, trainer_mb
    from stages.training.fit_labels import FitConfig
    from stages.training.memory import meta_model

    fit = FitConfig(**{k: v for k, v in train.items() if k in FitConfig.__dataclass_fields__})
    shape = (meta["in_channels"], fit.crop_px, fit.crop_px)
    nets = [
        (
            meta_model(
                name, in_shape=shape, num_classes=meta["num_classes"], width=train.get("width", 1.0)
            ),
            (fit.batch_size, *shape),
        )  # fmt: skip
        for name in grids["model"]
    ]
    return trainer_mb(nets, data_bytes=input_bytes(ctx, "dataset"), data_copies=6)


def _sweep(ctx: StepContext, experiment: str, grids: dict, train: dict, seeds: tuple) -> None:
    """Run ``run_trial`` over ``grids`` × seeds under Tune; write rows.parquet and curves.parquet."""
    from stages.training.fit_labels import run_trial

    _, meta = clean_set(ctx)
    space = {
        **train,
        # references each trial resolves on its node, not the driver's paths (issue 18)
        "clean_dir": ctx.input_file("dataset"),
        "variants_dir": ctx.input_file("randomize"),
        "num_classes": meta["num_classes"],
        "in_channels": meta["in_channels"],
        "weight_decay": 0.0,
        "random_crop": False,
        "dropout": 0.0,
        **{k: Grid(tuple(v)) for k, v in grids.items()},
        "seed": Grid(tuple(seeds)),
    }
    # concurrent sweep steps take turns inside the Ray executor (Tune's registry is global)
    mb = _trial_mb(ctx, grids, train, meta)
    results = ctx.sweep(run_trial, space, metric="train_acc", mode="max", memory_mb=mb)
    rows, curves = [], []
    for r in results:
        c, m = r["config"], r["metrics"]
        condition, _, p = c["variant"].partition(":")
        p = float(p) if p else float(condition == "random_labels")
        regs = regulariser_label(c["weight_decay"], c["random_crop"], c["dropout"])
        key = dict(experiment=experiment, model=c["model"], condition=condition, p=p,
                   regularisers=regs, seed=int(c["seed"]))  # fmt: skip
        final = bool(m.get("final")) and not r["error"]
        rows.append(
            {
                **key,
                "weight_decay": float(c["weight_decay"]),
                "random_crop": bool(c["random_crop"]),
                "dropout": float(c["dropout"]),
                "steps_to_fit": int(m["steps_to_fit"])
                if final and m["steps_to_fit"] >= 0
                else None,
                "train_acc": float(m["train_acc"]) if final else None,
                "test_acc": float(m["test_acc"]) if final else None,
                **{k: (float(m[k]) if final else None) for k in _SUMMARY},
                "num_params": int(m["num_params"]) if final else None,
                "error": r["error"],
            }
        )
        for h in r["history"]:
            if h.get("final") == 0:
                curves.append({**key, **{k: float(h[k]) for k in _CURVE}})
    pq.write_table(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), ctx.out_dir / "rows.parquet")
    pq.write_table(
        pa.Table.from_pylist(curves, schema=CURVE_SCHEMA), ctx.out_dir / "curves.parquet"
    )


_SUMMARY = ("weight_l2", "margin_p10", "margin_median", "final_loss", "steps", "epochs", "wall_s")
_CURVE = ("step", "epoch", "lr", "loss", "batch_acc", "train_acc")
_KEY_FIELDS = [
    pa.field("experiment", pa.string()),
    pa.field("model", pa.string()),
    pa.field("condition", pa.string()),
    pa.field("p", pa.float64()),
    pa.field("regularisers", pa.string()),
    pa.field("seed", pa.int64()),
]
ROW_SCHEMA = pa.schema(
    _KEY_FIELDS
    + [pa.field("weight_decay", pa.float64()), pa.field("random_crop", pa.bool_()),
       pa.field("dropout", pa.float64()), pa.field("steps_to_fit", pa.int64()),
       pa.field("train_acc", pa.float64()), pa.field("test_acc", pa.float64())]
    + [pa.field(k, pa.float64()) for k in _SUMMARY]
    + [pa.field("num_params", pa.int64()), pa.field("error", pa.string())]
)  # fmt: skip
CURVE_SCHEMA = pa.schema(_KEY_FIELDS + [pa.field(k, pa.float64()) for k in _CURVE])


def sweep_randomization(ctx, *, train, seeds, models, conditions) -> None:
    _sweep(ctx, "randomization", {"model": models, "variant": conditions}, train, seeds)


def sweep_corruption(ctx, *, train, seeds, models, ps) -> None:
    variants = tuple(f"corrupt:{p:g}" for p in ps)
    _sweep(ctx, "corruption", {"model": models, "variant": variants}, train, seeds)


def sweep_regularizers(
    ctx, *, train, seeds, models, weight_decays, random_crops, dropouts, labels
) -> None:
    grids = {"model": models, "weight_decay": weight_decays, "random_crop": random_crops,
             "dropout": dropouts, "variant": labels}  # fmt: skip
    _sweep(ctx, "regularizers", grids, train, seeds)


def _digits_flat(n: int) -> tuple[np.ndarray, np.ndarray]:
    from data.digits import load_digits

    x, y = load_digits(28)
    return x[:n].reshape(min(n, len(x)), -1) / 255.0, y[:n]


def run_expressivity(ctx: StepContext, *, ns: tuple, ds: tuple, digits_n: int, seed: int) -> None:
    from stages.generalization.expressivity import expressivity_grid

    real = _digits_flat(digits_n)[0] if digits_n else None
    rows = expressivity_grid(ns, ds, seed, real_inputs=real)
    pq.write_table(pa.Table.from_pylist(rows), ctx.out_dir / "expressivity.parquet")
    ctx.write_json(
        "metrics.json",
        {
            "expressivity_max_abs_error": max(r["max_abs_error"] for r in rows),
            "expressivity_weights_match": all(
                r["weights_used"] == r["weights_theorem"] for r in rows
            ),
        },
    )


def run_min_norm(
    ctx: StepContext, *, source: str, root: str, num_train: int, num_test: int,
    kernels: tuple, ps: tuple, seed: int, svc_C: float = 0.0,
) -> None:  # fmt: skip
    from threadpoolctl import threadpool_limits

    from stages.generalization.min_norm import corruption_curve, svc_baseline

    if source == "digits":
        x, y = _digits_flat(10**9)
        order = np.random.default_rng(seed).permutation(len(x))
        if num_train + num_test > len(x):
            raise ValueError(
                f"min_norm: the digits hold {len(x)} images, asked {num_train}+{num_test}"
            )
        tr, te = order[:num_train], order[num_train : num_train + num_test]
        xtr, ytr, xte, yte = x[tr], y[tr], x[te], y[te]
    else:
        if not root:
            raise ValueError(
                "min_norm.root: set it to the MNIST IDX directory (or min_norm.source=digits)"
            )
        from data.mnist import read_mnist

        (xtr, ytr), (xte, yte) = read_mnist(root, "train"), read_mnist(root, "test")
        xtr, ytr = xtr[:num_train].reshape(-1, 784) / 255.0, ytr[:num_train].astype(np.int64)
        xte, yte = xte[:num_test].reshape(-1, 784) / 255.0, yte[:num_test].astype(np.int64)
    with threadpool_limits(ctx.resources.threads()):  # BLAS pinned to the step's CPUs
        rows = corruption_curve(
            xtr, ytr, xte, yte, kernels=kernels, ps=ps, num_classes=10, seed=seed
        )
        if svc_C:  # the published baseline on the same clean training subset (issue 20)
            ctx.write_json("svc.json", svc_baseline(xtr, ytr, xte, yte, C=svc_C))
    pq.write_table(pa.Table.from_pylist(rows), ctx.out_dir / "min_norm.parquet")
