"""R-CNN detector steps after the features: per-class SVMs with hard negative mining, bbox
regression, detection (scoring, NMS) and VOC evaluation. Config lives in ``config.py``; every
function here takes explicit arguments."""

from __future__ import annotations

import functools
import os
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.engine import StepContext
from pipelines.rcnn.common import (
    _classes,
    _objects_by_image,
    _splits,
    load_model,
    map_with_memory,
    read_images,
)
from pipelines.rcnn.features import Pool5Head, _identity, feature_shards, layer_source

# ----------------------------------------------------------------------------------------------
# Shared by svm and bbox_regression: what a task holds (the mean-norm sample's rows come from
# stages.detection.features.norm_sample_plan)
_SOLVER_IMPORT = threading.Lock()


def _import_solvers() -> None:
    """The first import of the scikit-learn solvers, one thread at a time. svm and
    bbox_regression solve in the step's own process, and the engine runs them concurrently in
    the driver's threads: importing scikit-learn from both at once failed on its circular
    imports ("cannot import name 'clone' from partially initialized module 'sklearn.base'")."""
    with _SOLVER_IMPORT:
        import stages.detection.bbox_regression  # noqa: F401
        import stages.detection.svm  # noqa: F401


def _pairs_table(cols: dict[str, np.ndarray]) -> pa.Table:
    """The pairs as the feature cache lays matrices out: 2-D columns as fixed-size binary rows
    (≈ 6× faster to read than Parquet fixed-size lists, stages/detection/features.py), bit for
    bit; 1-D columns as they are."""
    from stages.detection.features import matrix_array, matrix_field

    fields, arrays = [], []
    for k, v in cols.items():
        if v.ndim == 2:
            fields.append(matrix_field(k, v))
            arrays.append(matrix_array(v))
        else:
            fields.append(pa.field(k, pa.from_numpy_dtype(v.dtype), nullable=False))
            arrays.append(pa.array(v))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _write_by_class(ref, cols: dict[str, np.ndarray], counts: np.ndarray) -> dict:
    """Write ``cols`` (rows sorted by their first column, the class; ``counts (C,)`` rows per
    class) through ``ref`` (an `OutputRef`), one row group per class present, uncompressed like
    the cache; returns the file's marker entry."""
    table = _pairs_table(cols)

    def write(dest):
        with pq.ParquetWriter(dest, table.schema, compression="none") as w:
            start = 0
            for n in counts[counts > 0]:
                w.write_table(table.slice(start, int(n)), row_group_size=int(n))
                start += int(n)
            if not len(table):
                w.write_table(table)

    return ref.write(write)


def _read_class(out, parts: list[dict], c: int, columns) -> dict[str, np.ndarray]:
    """Class ``c``'s rows of the files `_write_by_class` wrote under ``out`` (each part: its
    ``name`` and per-class ``counts``), in the parts' order: only that class's row groups are
    read. Matrix columns come back as arrays, bit for bit."""
    from stages.detection.features import matrix_from

    pieces = []
    for p in parts:
        if not p["counts"][c]:
            continue
        with (out / p["name"]).open_input() as f:
            pf = pq.ParquetFile(f)
            groups = [
                g for g in range(pf.num_row_groups)
                if pf.metadata.row_group(g).column(0).statistics.min == c
            ]  # fmt: skip
            pieces.append(pf.read_row_groups(groups, columns=list(columns)))
    if not pieces:
        return {}
    table = pa.concat_tables(pieces)
    return {
        k: matrix_from(table[k], table.schema.field(k))
        if pa.types.is_fixed_size_binary(table[k].type)
        else table[k].to_numpy()
        for k in columns
    }


def _shard_rows(features_dir, split: str) -> list[int]:
    """Rows of each shard of ``split``, in `feature_shards`' order (sorted names; every layer's
    shard of a batch has the same rows), from the features step's manifest: no shard is read."""
    manifest = pq.read_table(features_dir / "shards.parquet").to_pylist()
    return [m["rows"] for m in sorted(manifest, key=lambda m: m["shard"]) if m["split"] == split]


def _row_bytes(features_dir, layer: str, transform) -> tuple[int, int]:
    """``(bytes a task holds per shard row, bytes of weights it holds)``: the stored feature, the
    fc6/fc7 a `Pool5Head` computes from it, and the scaled copy; its weights besides."""
    if isinstance(transform, Pool5Head):
        dims = [transform.w6.shape[1], transform.w6.shape[0]]
        dims += [transform.w7.shape[0]] * 2 if transform.layer == "fc7" else [dims[-1]]
        weights = sum(a.nbytes for a in (transform.w6, transform.b6, transform.w7, transform.b7))
        return 4 * sum(dims), weights
    shard = next(iter(sorted((features_dir / layer).glob("*.parquet"))), None)
    if shard is None:
        return 0, 0
    meta = pq.read_schema(shard).field("feature").metadata or {}
    return 4 * 2 * int(meta.get(b"dim", 0)), 0


def _map(ctx: StepContext, fn, items: list, memory_mb: int, desc: str) -> list:
    """``ctx.map`` with a memory request from this map's own estimate (20 concurrent class or
    shard tasks could exhaust a node): `map_with_memory`."""
    return map_with_memory(ctx, fn, items, memory_mb, desc)


def _memory_mb(rows: int, row_bytes: int, fixed_bytes: int = 0) -> int:
    """MiB for a task holding ``rows`` rows of ``row_bytes`` (twice: numpy temporaries, pickled
    results) and ``fixed_bytes`` of weights, plus 256 MiB for the worker's own interpreter."""
    return 256 + -(-(2 * rows * row_bytes + fixed_bytes) // (1 << 20))


# ----------------------------------------------------------------------------------------------
# svm: one linear SVM per class with hard negative mining (§2.3, App. B) in two passes over the
# training shards whatever the number of classes: (1) every class's positives, the norm sample and
# the first image; (2) mining rounds, each a map over a block of shards against the models of the
# previous round (stages/detection/svm.py "Rounds"), the per-class solvers in the step
SVM_COLUMNS = ["image_ids", "box_index", "is_gt", "gt_class", "max_iou", "features"]
IMAGE_BITS, BOX_BITS = 12, 20  # negative keys: (shard, image within shard, box) in one int64
NEGATIVE_COLUMNS = ("image", "key", "features")  # a mining round's files, per class
FIRST_IMAGE = "first_image.parquet"  # R-CNN's first round, from the first pass


def _images(ids: np.ndarray) -> list[np.ndarray]:
    """Row indices of each image of a shard, images in order of appearance."""
    return [np.flatnonzero(ids == image_id) for image_id in dict.fromkeys(ids)]


def _negatives_of_image(
    s: dict, take, rows: np.ndarray, key_base: int, *, num_classes: int, neg_iou: float,
    gt_negatives: bool, models, active: list[int],
) -> list[tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    """One image's hard negatives for each class of ``active`` under ``models`` (their
    `MiningModels`): ``(keys (n,), X (n, D))`` per class; ``take(rows)`` gives the features of
    shard rows."""
    from stages.detection.svm import negative_mask, select_hard_negatives

    out = []
    for k, c in enumerate(active):
        neg = negative_mask(s["max_iou"][rows, c], s["is_gt"][rows], neg_iou, gt_negatives)
        r = rows[neg]
        x = take(r)
        picked = select_hard_negatives(models, k, x)
        r, x = r[picked], x[picked]
        out.append((key_base + s["box_index"][r].astype(np.int64), x))
    return out


def _svm_first_pass(item: tuple, *, transform, num_classes: int, neg_iou: float,
                    gt_negatives: bool, out) -> dict:  # fmt: skip
    """Pass 1 over one training shard: the rows of the mean-norm sample, the ground-truth rows of
    every class (positives) and, for the first shard, the first image's rows (R-CNN's first
    round: all its negatives). Only these rows go through ``transform``; they are written
    unscaled (the scale is known only after this pass) through ``out`` for the class solvers to
    read (`ClassSolvers`): ``positives/part-NNNNN.parquet`` (one row group per class, shard
    order) and ``first_image.parquet`` (its rows once, with which classes each is a negative of).
    Returns the norms, the counts and the files' names and marker entries: nothing that grows
    with the features."""
    from stages.detection.features import feature_norms, read_feature_shard
    from stages.detection.svm import negative_mask

    index, path, sample_rows = item
    s = read_feature_shard(path, SVM_COLUMNS)
    images = _images(s["image_ids"])
    first = images[0] if index == 0 and images else np.zeros(0, np.int64)
    gt_rows = np.flatnonzero(s["is_gt"] & (s["gt_class"] >= 0))
    gt_rows = gt_rows[np.argsort(s["gt_class"][gt_rows], kind="stable")]  # by class, shard order
    needed = np.unique(np.concatenate([gt_rows, sample_rows, first]).astype(np.int64))
    T = transform(s["features"][needed])  # (len(needed), D)

    def take(rows):
        return T[np.searchsorted(needed, rows)]

    gt_class = s["gt_class"][gt_rows].astype(np.int32)
    counts = np.bincount(gt_class, minlength=num_classes)
    name = f"positives/part-{index:05d}.parquet"
    cols = {"cls": gt_class, "features": take(gt_rows)}
    result = {
        "sample_norms": feature_norms(take(sample_rows)),  # N floats, not N × D
        "num_images": len(images),
        "dim": int(T.shape[1]),
        "positives": {
            "name": name,
            "file": _write_by_class(out / name, cols, counts),
            "counts": counts,
        },  # fmt: skip
        "first_image": None,
    }
    if len(first):  # its rows once, and which are each class's negatives (not a copy per class)
        negatives = np.stack([
            negative_mask(s["max_iou"][first, c], s["is_gt"][first], neg_iou, gt_negatives)
            for c in range(num_classes)
        ], axis=1).astype(np.int32)  # fmt: skip
        table = _pairs_table({
            "key": s["box_index"][first].astype(np.int64), "features": take(first),
            "negative_of": negatives,
        })  # fmt: skip
        result["first_image"] = {
            "name": FIRST_IMAGE, "file": (out / FIRST_IMAGE).write(
                lambda dest: pq.write_table(table, dest, compression="none")
            ),
        }  # fmt: skip
    return result


def _svm_mining_pass(item: tuple, *, transform, scale: float, models, active: list[int],
                     num_classes: int, neg_iou: float, gt_negatives: bool, out) -> dict:  # fmt: skip
    """Pass 2, one shard of a round: its images from ``first_image`` on, transformed and scaled
    once for every class, each class's hard negatives under ``models``, written to ``out /
    negatives / part-NNNNN.parquet`` (one row group per class: the image's number in the shard,
    the key, the scaled features; images in order). Returns the file's name, marker entry,
    per-class counts and the images mined: what comes back by value, and what the object store
    holds, does not grow with the negatives (issue 19)."""
    from stages.detection.features import read_feature_shard

    index, path, first_image = item
    s = read_feature_shard(path, SVM_COLUMNS)
    X = transform(s["features"]) * scale
    images = _images(s["image_ids"])
    if len(images) > 1 << IMAGE_BITS:
        raise ValueError(f"{path}: {len(images)} images in one shard; keys allow {1 << IMAGE_BITS}")
    per_class: list[list] = [[] for _ in active]  # per class: (image, keys, X) per image
    for j, rows in enumerate(images[first_image:], start=first_image):
        base = ((index << IMAGE_BITS) + j) << BOX_BITS
        found = _negatives_of_image(
            s,
            X.__getitem__,
            rows,
            base,
            num_classes=num_classes,
            neg_iou=neg_iou,
            gt_negatives=gt_negatives,
            models=models,
            active=active,
        )
        for k, (keys, x) in enumerate(found):
            per_class[k].append((np.full(len(keys), j, np.int32), keys, x))
    per_class_rows = [sum(len(i) for i, _, _ in p) for p in per_class]
    cols = {
        "cls": np.repeat(np.array(active, np.int32), per_class_rows),
        "image": np.concatenate([i for p in per_class for i, _, _ in p]),
        "key": np.concatenate([k for p in per_class for _, k, _ in p]),
        "features": np.concatenate([x for p in per_class for _, _, x in p]).astype(np.float32),
    }
    counts = np.bincount(cols["cls"], minlength=num_classes)
    name = f"negatives/part-{index:05d}.parquet"
    return {"name": name, "file": _write_by_class(out / name, cols, counts), "counts": counts,
            "images": list(range(first_image, len(images)))}  # fmt: skip


def _add_round(miners: dict, out, parts: list[dict], dim: int) -> None:
    """Add one round's hard negatives, as `_svm_mining_pass` wrote them, to every class's miner,
    image by image in the round's order (an image without negatives still counts; the last one
    ends the round); one class's rows read at a time, so a solver holds one class's negatives
    of the round besides the caches. The classes are independent, so this is the order of mining
    image by image."""
    images = np.array([(n << IMAGE_BITS) + j for n, p in enumerate(parts) for j in p["images"]])
    for c, miner in miners.items():
        rows = _read_class(out, parts, c, NEGATIVE_COLUMNS) or {
            "image": np.zeros(0, np.int32), "key": np.zeros(0, np.int64),
            "features": np.zeros((0, dim), np.float32),
        }  # fmt: skip
        part = np.repeat(np.arange(len(parts)), [int(p["counts"][c]) for p in parts])
        at = (part << IMAGE_BITS) + rows["image"]  # ascending: parts in order, images in order
        lo, hi = np.searchsorted(at, images, "left"), np.searchsorted(at, images, "right")
        for i in range(len(images)):
            miner.add_negatives(rows["key"][lo[i] : hi[i]], rows["features"][lo[i] : hi[i]],
                                end_of_round=i == len(images) - 1)  # fmt: skip


class ClassSolvers:
    """Some classes' hard-negative miners (`HardNegativeSVM`), each holding its cache of hard
    negatives from the first round to the last, in one long-lived unit (`Executor.actors`). On
    Ray that is an actor: the caches live off the driver, spread over the cluster, and the
    classes retrain in parallel (issue 19: at 20 classes the step held every class's cache
    and ran every liblinear solve itself, one after the other). Every call reads what it needs
    through ``out`` from its own node and returns only each class's model."""

    def __init__(self, classes: list[int], *, out, positive_parts: list[dict], scale: float,
                 svm: dict):  # fmt: skip
        _import_solvers()
        from stages.detection.svm import HardNegativeSVM

        self.out, self.miners = out, {}
        for c in classes:
            positives = _read_class(out, positive_parts, c, ("features",))["features"] * scale
            self.miners[c] = HardNegativeSVM(**svm).start_mining(positives)

    def models(self) -> dict[int, tuple]:
        """Each class's ``(coef float32, intercept, takes_all)``: what `MiningModels` needs."""
        return {
            c: (m.coef_.astype(np.float32), float(m.intercept_), bool(m.takes_all))
            for c, m in self.miners.items()
        }

    def first_round(self, scale: float) -> dict[int, tuple]:
        """R-CNN's first image: every class adds all its negatives and trains."""
        from stages.detection.features import matrix_from

        with (self.out / FIRST_IMAGE).open_input() as f:
            t = pq.read_table(f)
        keys = t["key"].to_numpy()
        X = matrix_from(t["features"], t.schema.field("features"))
        negative_of = matrix_from(t["negative_of"], t.schema.field("negative_of")).astype(bool)
        for c, miner in self.miners.items():
            neg = negative_of[:, c]
            miner.add_negatives(keys[neg], X[neg] * scale, end_of_round=True)
        return self.models()

    def add_round(self, parts: list[dict], dim: int) -> dict[int, tuple]:
        """One mining round's hard negatives (`_add_round`); the models after it."""
        _add_round(self.miners, self.out, parts, dim)
        return self.models()

    def finish(self) -> dict[int, dict]:
        """The final training of each class (`HardNegativeSVM.finish_mining`) and its result,
        each class's cache freed before the next class's training."""
        results = {}
        for c in list(self.miners):
            svm = self.miners.pop(c).finish_mining()
            results[c] = {
                "coef": svm.coef_.astype(np.float32), "intercept": float(svm.intercept_),
                "cache": int(svm.n_negatives_cache_), "retrains": len(svm.history_),
            }  # fmt: skip
        return results


def solver_memory_mb(n_classes: int, positives: int, dim: int, cache_rows: int) -> int:
    """MiB for a `ClassSolvers` of ``n_classes`` classes with at most ``positives`` positives
    each: every class's positives and cache of ``cache_rows`` float32 rows of ``dim``, and one
    class's liblinear solve at a time on top (``LinearSVC`` copies the rows to float64 and
    liblinear to 16-byte sparse nodes: ≈ 7× the float32 rows), plus 256 MiB for the
    interpreter. ``cache_rows`` is an estimate (how many negatives a class keeps is known only
    by mining them): `mine_svms` takes ``4 × retrain_after``."""
    row = 4 * dim
    held = n_classes * (positives + cache_rows) * row
    return 256 + -(-(held + 7 * (positives + cache_rows) * row) // (1 << 20))


def in_process_actors(factory: type, kwargs: list[dict], memory_mb: int):
    """`mine_svms`' default ``actors_fn``: the solvers as objects of this process."""
    from cluster.local import InProcessActors

    return InProcessActors(factory, kwargs)


def mine_svms(
    shards: list,
    rows_per_shard: list[int],
    *,
    num_classes: int,
    map_fn,
    transform=_identity,
    neg_iou: float = 0.3,
    C: float = 0.001,
    pos_weight: float = 2.0,
    bias_value: float = 10.0,
    mode: str = "hnm",
    gt_negatives: bool = False,
    norm_sample_rows: int = 40_000,
    seed: int = 0,
    round_shards: int = 1,
    retrain_after: int = 2000,
    row_bytes: int = 0,
    fixed_bytes: int = 0,
    out,
    actors_fn=in_process_actors,
    num_solvers=1,
) -> tuple[list[dict], float]:
    """Every class's SVM from two passes over ``shards`` (sorted, training split) whatever the
    number of classes, as ``rcnn_train.m`` mines "all classes at once (avoids loading feature
    cache more than once)". Returns one result per class (as `_train_class_svm`) and the scale.

    Pass 1 gathers the positives of every class, the mean-norm sample (`norm_sample_plan`) and the
    first image's negatives, which make the first round: each class adds them all and trains, as
    after R-CNN's first image. Pass 2 mines the remaining images in order in rounds of
    ``round_shards`` shards: one map task per shard scores the shard's rows against every class's
    model from the end of the previous round and writes each class's hard negatives; each class's
    `HardNegativeSVM` adds them image by image and may retrain only at the end of the round.
    Retraining thus waits for the round's end where the code retrains right after the image that
    crossed ``retrain_after`` (stages/detection/svm.py "Rounds"); with one image per shard and
    ``round_shards=1`` the SVMs are those of per-class, per-image mining exactly.
    ``map_fn(fn, items, memory_mb, desc)`` runs the tasks (``ctx.map`` with a memory request).

    What grows with the features never reaches the step. The tasks write it under ``out`` (an
    `OutputRef`: the step's artifact, from the task's node) and return counts: pass 1 the
    positives and the first image, a mining task its shard's hard negatives (returned by value
    they filled the object store with a shard's negatives of every class at once: at VOC2007's
    scale in the early rounds, gigabytes per task). The classes' miners and their caches live
    in ``num_solvers`` `ClassSolvers` (classes dealt round-robin), which read those files;
    ``actors_fn(factory, kwargs, memory_mb)`` starts them (``ctx.actors``: Ray actors; by
    default objects of this process). The step holds each class's model between rounds, and
    deletes the scratch files once read. ``num_solvers``: a number, or a function of one
    one-class solver's memory request (MiB) giving how many fit (``ctx.train_capacity``); never
    more than the classes. It changes where the work runs, not its result: every class's SVM is
    the same bit for bit.
    """
    from stages.detection.features import norm_sample_plan, norm_scale

    _import_solvers()
    from stages.detection.svm import HardNegativeSVM, MiningModels

    if round_shards < 1:
        raise ValueError(f"svm.round_shards must be >= 1, got {round_shards}")
    if not shards or len(shards) != len(rows_per_shard):
        raise ValueError(f"need >= 1 training shard and its row count, got {len(shards)} shards "
                         f"and {len(rows_per_shard)} counts")  # fmt: skip
    kw = dict(num_classes=num_classes, neg_iou=neg_iou, gt_negatives=gt_negatives)
    picks = norm_sample_plan(rows_per_shard, norm_sample_rows, seed)
    items = [(i, p, picks[i]) for i, p in enumerate(shards)]
    mem = _memory_mb(max(rows_per_shard), row_bytes, fixed_bytes)
    first = map_fn(functools.partial(_svm_first_pass, transform=transform, out=out, **kw), items,
                   mem, "svm: positives and norm sample")  # fmt: skip
    scale = norm_scale(np.concatenate([f["sample_norms"] for f in first]))
    dim = first[0]["dim"]
    positive_parts = [f["positives"] for f in first]
    n_pos = np.sum([p["counts"] for p in positive_parts], axis=0)
    active = [c for c in range(num_classes) if n_pos[c]]  # none: e.g. data.max_images left no
    # object of this class in training: no SVM, so no detections of it
    svm = dict(C=C, pos_weight=pos_weight, bias_value=bias_value, mode=mode,
               retrain_after=retrain_after)  # fmt: skip
    add_threshold = HardNegativeSVM(**svm).add_threshold
    cache_rows = sum(rows_per_shard) if mode == "all" else 4 * retrain_after
    if callable(num_solvers):
        num_solvers = num_solvers(solver_memory_mb(1, int(n_pos.max(initial=0)), dim, cache_rows))
    n = max(1, min(int(num_solvers), len(active)))
    groups = [g for g in (active[i::n] for i in range(n)) if g]
    solver_mb = solver_memory_mb(max(map(len, groups), default=0), int(n_pos.max(initial=0)),
                                 dim, cache_rows)  # fmt: skip
    solver_kwargs = [dict(classes=g, out=out, positive_parts=positive_parts, scale=scale, svm=svm)
                     for g in groups]  # fmt: skip
    trained: dict[int, dict] = {}
    with actors_fn(ClassSolvers, solver_kwargs, solver_mb) as solvers:

        def models_of(results: list[dict]) -> MiningModels:
            by_class = {c: m for r in results for c, m in r.items()}
            return MiningModels(
                coef=np.stack([by_class[c][0] for c in active]),
                intercept=np.array([by_class[c][1] for c in active], np.float64),
                take_all=np.array([by_class[c][2] for c in active]),
                add_threshold=add_threshold,
            )

        if groups and first[0]["first_image"] is not None:  # round 0: R-CNN's first image
            models = models_of(solvers.call("first_round", [(scale,)] * len(groups)))
        elif groups:
            models = models_of(solvers.call("models", [()] * len(groups)))
        for f in first:  # read by the solvers: scratch, never in the artifact
            for part in (f["positives"], f["first_image"]):
                if part is not None:
                    (out / part["name"]).delete()
        work = [(0, shards[0], 1)] if first and first[0]["num_images"] > 1 else []
        work += [(i, shards[i], 0) for i in range(1, len(shards))]
        for start in range(0, len(work) if groups else 0, round_shards):
            block = work[start : start + round_shards]
            fn = functools.partial(_svm_mining_pass, transform=transform, scale=scale,
                                   models=models, active=active, out=out, **kw)  # fmt: skip
            parts = map_fn(fn, block, mem, f"svm: mining round {start // round_shards + 1}")
            models = models_of(solvers.call("add_round", [(parts, dim)] * len(groups)))
            for p in parts:  # scratch: the SVMs keep what they cached, the artifact none of it
                (out / p["name"]).delete()
        if groups:
            trained = {
                c: r for g in solvers.call("finish", [()] * len(groups)) for c, r in g.items()
            }
    results = []
    for c in range(num_classes):
        if c not in trained:
            results.append({"coef": np.zeros(dim, np.float32), "intercept": 0.0, "positives": 0,
                            "cache": 0, "retrains": 0, "trained": False})  # fmt: skip
            continue
        results.append({**trained[c], "positives": int(n_pos[c]), "trained": True})
    return results, scale


def _train_class_svm(
    class_index: int,
    *,
    shards: list[str],
    scale: float,
    neg_iou: float,
    C: float,
    pos_weight: float,
    bias_value: float,
    mode: str,
    gt_negatives: bool = False,
    transform=_identity,
    retrain_after: int = 2000,
) -> dict:
    """One class's SVM by its own pass over the shards, image by image: the reference that
    `mine_svms` is tested against (tests/pipelines/rcnn/test_one_pass_svm.py), not the step."""
    from stages.detection.features import iter_feature_shards
    from stages.detection.svm import HardNegativeSVM, negative_mask, positive_mask

    cols = ["image_ids", "box_index", "is_gt", "gt_class", "max_iou", "features"]
    positives = [
        transform(s["features"][positive_mask(s["gt_class"], s["is_gt"], class_index)]) * scale
        for s in iter_feature_shards(shards, cols)
    ]
    positives = np.concatenate(positives)
    if not len(positives):  # e.g. data.max_images left no object of this class in training:
        # no SVM, so no detections of the class (its AP is 0 where the test set has some)
        dim = positives.shape[1]
        return {"coef": np.zeros(dim, np.float32), "intercept": 0.0, "positives": 0, "cache": 0,
                "retrains": 0, "trained": False}  # fmt: skip

    def negatives():  # streamed shard by shard: memory stays bounded by the mining cache
        image_number = 0
        for s in iter_feature_shards(shards, cols):
            neg = negative_mask(s["max_iou"][:, class_index], s["is_gt"], neg_iou, gt_negatives)
            ids = s["image_ids"]
            for image_id in dict.fromkeys(ids):
                rows = np.nonzero((ids == image_id) & neg)[0]
                keys = image_number * (1 << 20) + s["box_index"][rows].astype(np.int64)
                yield keys, transform(s["features"][rows]) * scale
                image_number += 1

    svm = HardNegativeSVM(
        C=C, pos_weight=pos_weight, bias_value=bias_value, mode=mode, retrain_after=retrain_after
    )
    svm.fit_stream(positives, negatives())
    return {
        "coef": svm.coef_.astype(np.float32),
        "intercept": float(svm.intercept_),
        "positives": len(positives),
        "cache": int(svm.n_negatives_cache_),
        "retrains": len(svm.history_),
        "trained": True,
    }


def train_svms(
    ctx: StepContext,
    *,
    layer: str,
    scorer: str = "svm",
    # SVM training settings (not used, and not in the key, for scorer=softmax)
    neg_iou: float = 0.3,
    C: float = 0.001,
    pos_weight: float = 2.0,
    bias_value: float = 10.0,
    mode: str = "hnm",
    gt_negatives: bool = False,
    norm_sample_rows: int = 40_000,
    seed: int = 0,
    round_shards: int = 1,
) -> None:
    if scorer == "softmax":  # §3.2 / App. B: the fine-tuned softmax instead of SVMs (50.9 vs 54.2)
        if layer != "fc7":
            raise ValueError(
                "svm.scorer=softmax scores with fc8 on fc7 features: set svm.layer=fc7"
            )
        net = load_model(ctx.input_dir("finetune") / "model.pt")
        np.savez(
            ctx.out_dir / "svm.npz",
            coef=net.fc8.weight.detach().numpy(),
            intercept=net.fc8.bias.detach().numpy(),
            scale=np.float32(1.0),
            softmax=1,
        )
        return
    features_dir, dataset_dir = ctx.input_dir("features"), ctx.input_dir("dataset")
    classes = _classes(dataset_dir)
    train_split, _ = _splits(dataset_dir)
    shards, transform = layer_source(ctx, layer, train_split)
    row_bytes, fixed_bytes = _row_bytes(features_dir, layer, transform)
    results, scale = mine_svms(
        shards,
        _shard_rows(features_dir, train_split),
        num_classes=len(classes),
        map_fn=lambda fn, items, mb, desc: _map(ctx, fn, items, mb, desc),
        transform=transform,
        neg_iou=neg_iou,
        C=C,
        pos_weight=pos_weight,
        bias_value=bias_value,
        mode=mode,
        gt_negatives=gt_negatives,
        norm_sample_rows=norm_sample_rows,
        seed=seed,
        round_shards=round_shards,
        row_bytes=row_bytes,
        fixed_bytes=fixed_bytes,
        out=ctx.output(""),
        actors_fn=lambda factory, kwargs, mb: ctx.actors(factory, kwargs, memory_mb=mb),
        num_solvers=lambda mb: ctx.train_capacity(1, memory_mb=mb),
    )
    np.savez(
        ctx.out_dir / "svm.npz",
        coef=np.stack([r["coef"] for r in results]),
        intercept=np.array([r["intercept"] for r in results], np.float32),
        scale=np.float32(scale),
        trained=np.array([r["trained"] for r in results]),
    )
    ctx.write_json(
        "svm_stats.json",
        {
            c: {k: r[k] for k in ("positives", "cache", "retrains", "trained")}
            for c, r in zip(classes, results, strict=True)
        },
    )


# ----------------------------------------------------------------------------------------------
# bbox_regression: per class ridge from scaled pool5 to (tx, ty, tw, th) (App. C), every class's
# training rows and the norm sample gathered by one pass over the pool5 shards
def _box_rows(s: dict, gt: dict[str, dict], min_iou: float) -> tuple[np.ndarray, ...]:
    """``(rows, class, target gt box, IoU)`` of a shard's App. C training pairs, rows ascending.

    Overlapping a class's gt by > min_iou is necessary, not sufficient: App. C assigns a proposal
    to the one gt box it overlaps most, of any class, and only that box's class regressor trains on
    it (a rider's box near both the person and the horse goes to one). Ground-truth rows train too
    (IoU 1 with themselves, target tx = ty = tw = th = 0), as in rcnn_train_bbox_regressor.m, which
    keeps every row of the roidb with overlap >= 0.6."""
    from stages.detection.boxes import box_iou_voc

    ids = s["image_ids"]
    candidate = s["max_iou"].max(1) > min_iou if s["max_iou"].size else np.zeros(len(ids), bool)
    parts = []
    for image_id in dict.fromkeys(ids[candidate]):
        rows = np.flatnonzero((ids == image_id) & candidate)
        obj = gt[image_id]
        iou = box_iou_voc(s["boxes"][rows], obj["boxes"])  # (n, G)
        j = iou.argmax(1)
        cls = np.asarray(obj["cls"])[j]
        ok = s["max_iou"][rows, cls] > min_iou  # the stored overlap decides, as per class before
        parts.append((rows[ok], cls[ok], obj["boxes"][j[ok]], iou[ok, j[ok]]))
    if not parts:
        return (
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
            np.zeros((0, 4), np.float32),
            np.zeros(0),
        )
    return tuple(np.concatenate(p) for p in zip(*parts, strict=True))


PAIR_COLUMNS = ("features", "proposals", "targets", "ious")


def _bbox_pass(item: tuple, *, gt: dict[str, dict], min_iou: float, out, num_classes: int) -> dict:
    """One pool5 shard: every class's App. C training pairs, written to ``out / pairs /
    part-NNNNN.parquet`` (rows grouped by class, one row group per class, original order within
    it), and the norm sample. Returns the sample rows' norms, the file's marker entry and
    per-class counts: what comes back by value does not grow with the shard's pairs (issue 19)."""
    from stages.detection.features import feature_norms, read_feature_shard

    index, path, sample_rows = item
    s = read_feature_shard(path, ["image_ids", "is_gt", "boxes", "max_iou", "features"])
    rows, cls, targets, ious = _box_rows(s, gt, min_iou)
    order = np.argsort(cls, kind="stable")
    cols = {"cls": cls[order].astype(np.int32), "features": s["features"][rows[order]],
            "proposals": s["boxes"][rows[order]], "targets": targets[order], "ious": ious[order]}  # fmt: skip
    name = f"pairs/part-{index:05d}.parquet"
    counts = np.bincount(cols["cls"], minlength=num_classes)
    return {"sample_norms": feature_norms(s["features"][sample_rows]), "name": name, "counts": counts,
            "file": _write_by_class(out / name, cols, counts)}  # fmt: skip


def _class_pairs(out, parts: list[dict], c: int) -> dict[str, np.ndarray]:
    """Class ``c``'s pairs from the files `_bbox_pass` wrote, in shard order."""
    return _read_class(out, parts, c, PAIR_COLUMNS)


def fit_box_regressors(
    shards: list,
    rows_per_shard: list[int],
    *,
    num_classes: int,
    gt: dict[str, dict],
    map_fn,
    out,
    alpha: float,
    min_iou: float,
    norm_sample_rows: int,
    seed: int,
    row_bytes: int = 0,
) -> tuple[list[dict], float, dict[str, dict]]:
    """Every class's `BoxRegressor` from one pass over the pool5 ``shards`` (sorted, training
    split) that writes all classes' pairs to ``out`` (an `OutputRef`: the step's artifact, from
    the node that computed them) and returns the mean-norm sample; fitted in the step, one class
    after another, each reading only its own rows: the step holds one class's pairs at a time
    (at VOC2007's scale all classes' pool5 pairs are ≈ 17 GB). Returns one ``{"coef",
    "intercept", "n"}`` per class, the scale, and the marker entries of the files written."""
    _import_solvers()
    from stages.detection.bbox_regression import BoxRegressor
    from stages.detection.features import norm_sample_plan, norm_scale

    picks = norm_sample_plan(rows_per_shard, norm_sample_rows, seed)
    items = [(i, p, picks[i]) for i, p in enumerate(shards)]
    mem = _memory_mb(max(rows_per_shard), row_bytes)
    fn = functools.partial(_bbox_pass, gt=gt, min_iou=min_iou, out=out, num_classes=num_classes)
    parts = map_fn(fn, items, mem, "bbox regression: one pass")
    scale = norm_scale(np.concatenate([p["sample_norms"] for p in parts]))
    results = []
    for c in range(num_classes):
        if not any(p["counts"][c] for p in parts):
            results.append({"coef": None, "intercept": None, "n": 0})
            continue
        pairs = _class_pairs(out, parts, c)
        reg = BoxRegressor(alpha=alpha, min_iou=min_iou).fit(
            pairs["features"] * scale, pairs["proposals"], pairs["targets"], pairs["ious"]
        )
        del pairs
        coef, intercept = reg.coef_.astype(np.float32), reg.intercept_.astype(np.float32)
        results.append({"coef": coef, "intercept": intercept, "n": reg.n_train_})
    return results, scale, {p["name"]: p["file"] for p in parts}


def _train_class_regressor(
    class_index: int,
    *,
    shards: list[str],
    scale: float,
    gt: dict[str, dict],
    alpha: float,
    min_iou: float,
) -> dict:
    """One class's regressor by its own pass over the shards, row by row: the reference that
    `fit_box_regressors` is tested against, not the step."""
    from stages.detection.bbox_regression import BoxRegressor
    from stages.detection.boxes import box_iou_voc
    from stages.detection.features import iter_feature_shards

    feats, props, targets, ious = [], [], [], []
    cols = ["image_ids", "is_gt", "boxes", "max_iou", "features"]
    for s in iter_feature_shards(shards, cols):
        keep = s["max_iou"][:, class_index] > min_iou  # App. C pairing: see `_box_rows`
        for r in np.nonzero(keep)[0]:
            obj = gt[s["image_ids"][r]]
            iou = box_iou_voc(s["boxes"][r : r + 1], obj["boxes"])[0]
            j = int(iou.argmax())
            if obj["cls"][j] != class_index:
                continue
            feats.append(s["features"][r] * scale)
            props.append(s["boxes"][r])
            targets.append(obj["boxes"][j])
            ious.append(iou[j])
    if not feats:
        return {"coef": None, "intercept": None, "n": 0}
    reg = BoxRegressor(alpha=alpha, min_iou=min_iou).fit(
        np.stack(feats), np.stack(props), np.stack(targets), np.asarray(ious)
    )
    return {
        "coef": reg.coef_.astype(np.float32),
        "intercept": reg.intercept_.astype(np.float32),
        "n": reg.n_train_,
    }


def train_box_regressors(
    ctx: StepContext, *, alpha: float, min_iou: float, norm_sample_rows: int, seed: int
) -> None:
    features_dir, dataset_dir = ctx.input_dir("features"), ctx.input_dir("dataset")
    classes = _classes(dataset_dir)
    train_split, _ = _splits(dataset_dir)
    shards = feature_shards(features_dir, "pool5", train_split, ctx.input_file("features"))
    results, scale, files = fit_box_regressors(
        shards,
        _shard_rows(features_dir, train_split),
        num_classes=len(classes),
        gt=_objects_by_image(dataset_dir, train_split, classes),
        map_fn=lambda fn, items, mb, desc: _map(ctx, fn, items, mb, desc),
        out=ctx.output(""),
        alpha=alpha,
        min_iou=min_iou,
        norm_sample_rows=norm_sample_rows,
        seed=seed,
        row_bytes=_row_bytes(features_dir, "pool5", _identity)[0],
    )
    dim = next((r["coef"].shape[1] for r in results if r["coef"] is not None), 0)
    coef = np.stack(
        [r["coef"] if r["coef"] is not None else np.zeros((4, dim), np.float32) for r in results]
    )
    intercept = np.stack(
        [r["intercept"] if r["intercept"] is not None else np.zeros(4, np.float32) for r in results]
    )
    np.savez(
        ctx.out_dir / "bbox_regression.npz",
        coef=coef,
        intercept=intercept,
        scale=np.float32(scale),
        trained=np.array([r["n"] > 0 for r in results]),
    )
    ctx.add_files(files)  # the training pairs, as written by the map tasks
    ctx.write_json("bbox_stats.json", {c: r["n"] for c, r in zip(classes, results, strict=True)})


# ----------------------------------------------------------------------------------------------
# detect: score every proposal (one matrix product per shard), top 100 per class, bbox regression,
# clip, per-class greedy NMS at 0.3 (§2.2)
DETECTIONS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("class", pa.string()),
        ("score", pa.float32()),
        ("x1", pa.float32()),
        ("y1", pa.float32()),
        ("x2", pa.float32()),
        ("y2", pa.float32()),
    ]
)


@functools.lru_cache(maxsize=8)
def _npz_at(path: str, mtime_ns: int, size: int) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _weights(source) -> dict[str, np.ndarray]:
    """``source`` as it is when a dict, else an ``.npz`` reference (`ArtifactFile`, path) read
    once per process and file version: a detect task loads its step's SVM and box-regression
    weights from the store on its own node instead of receiving them by value, so the object
    store holds none of them, whatever the number of classes (issue 19). Not to be mutated."""
    if isinstance(source, dict):
        return source
    path = os.fspath(source)
    st = os.stat(path)
    return _npz_at(path, st.st_mtime_ns, st.st_size)


def _detect_shard(
    pair: tuple[str, str],
    *,
    classes: list[str],
    svm,
    bbox,
    sizes: dict[str, tuple[int, int]],
    top_k: int,
    nms_iou: float,
    transform=_identity,
    min_scores: np.ndarray | None = None,
    scores_only: bool = False,
) -> pa.Table | list[np.ndarray]:
    """Detections of one feature shard; with ``scores_only``, the scores of each class's
    per-image top-k candidates (``list`` over classes), from which ``detect`` sets the set-wide
    per-class thresholds ``min_scores (C,)`` of rcnn_test.m. ``svm`` and ``bbox`` (None: no
    regression): the weights, or references to their ``.npz`` files (`_weights`)."""
    from stages.detection.bbox_regression import decode_boxes
    from stages.detection.boxes import clip_boxes_voc
    from stages.detection.features import read_feature_shard
    from stages.detection.nms import nms_per_class, top_k_per_class

    svm, bbox = _weights(svm), None if bbox is None else _weights(bbox)
    feat_path, pool5_path = pair
    s = read_feature_shard(feat_path, ["image_ids", "is_gt", "boxes", "features"])
    keep = ~s["is_gt"]  # leak guard: ground-truth rows are never scored at test time
    ids, boxes = s["image_ids"][keep], s["boxes"][keep]
    feats = transform(s["features"][keep]) * svm["scale"]
    scores = feats @ svm["coef"].T + svm["intercept"]  # (N, C)
    if int(svm.get("softmax", 0)):  # fine-tuned net's own classifier: P(class), drop background
        z = scores - scores.max(1, keepdims=True)
        scores = (np.exp(z) / np.exp(z).sum(1, keepdims=True))[:, 1:]
    if scores_only:
        per_class = [[] for _ in classes]
        for image_id in dict.fromkeys(ids):
            rows = np.nonzero(ids == image_id)[0]
            flat = scores[rows].ravel()
            labels = np.tile(np.arange(len(classes)), len(rows))
            cand = top_k_per_class(flat, labels, top_k)
            for k in range(len(classes)):
                per_class[k].append(flat[cand][labels[cand] == k])
        return [np.concatenate(p) if p else np.zeros(0) for p in per_class]
    pool5 = None
    if bbox is not None:
        p5 = read_feature_shard(pool5_path, ["is_gt", "features"])
        pool5 = p5["features"][~p5["is_gt"]] * bbox["scale"]
    out = []
    for image_id in dict.fromkeys(ids):
        rows = np.nonzero(ids == image_id)[0]
        n, c = len(rows), len(classes)
        labels = np.repeat(np.arange(c)[None, :], n, 0).ravel()
        flat_scores = scores[rows].ravel()
        cand = top_k_per_class(flat_scores, labels, top_k)
        if "trained" in svm:  # a class without training positives has no SVM: no detections
            cand = cand[svm["trained"][labels[cand]]]
        if min_scores is not None:  # rcnn_test.m drops boxes below the set-wide threshold
            cand = cand[flat_scores[cand] >= min_scores[labels[cand]]]
        box_rows, cls = rows[cand // c], labels[cand]
        det = boxes[box_rows].astype(np.float64)
        if pool5 is not None:
            for k in np.unique(cls):
                if bbox["trained"][k]:
                    m = cls == k
                    deltas = pool5[box_rows[m]] @ bbox["coef"][k].T + bbox["intercept"][k]
                    det[m] = decode_boxes(det[m], deltas)
        width, height = sizes[image_id]
        det = clip_boxes_voc(det, width, height)
        ok = (det[:, 2] >= det[:, 0]) & (det[:, 3] >= det[:, 1])
        det, cls, sc = det[ok], cls[ok], flat_scores[cand][ok]
        kept = nms_per_class(det, sc, cls, nms_iou)
        out.append(
            pa.table(
                {
                    "image_id": [image_id] * len(kept),
                    "class": [classes[k] for k in cls[kept]],
                    "score": sc[kept].astype(np.float32),
                    **{
                        name: det[kept, i].astype(np.float32)
                        for i, name in enumerate(("x1", "y1", "x2", "y2"))
                    },
                },
                schema=DETECTIONS_SCHEMA,
            )
        )
    return pa.concat_tables(out) if out else DETECTIONS_SCHEMA.empty_table()


def set_thresholds(per_class_scores: list[np.ndarray], cap: int) -> np.ndarray:
    """``(C,)`` per-class score thresholds keeping each class's ``cap`` best candidates of the
    whole test set (ties at the threshold kept), as ``thresh(j)`` in rcnn_test.m; ``-inf`` where a
    class has no more than ``cap`` candidates."""
    out = np.full(len(per_class_scores), -np.inf)
    for k, s in enumerate(per_class_scores):
        if len(s) > cap:
            out[k] = np.sort(s)[::-1][cap - 1]
    return out


def detect(
    ctx: StepContext,
    *,
    layer: str,
    use_bbox_regression: bool,
    top_k: int,
    nms_iou: float,
    max_per_set_per_image: int = 0,
) -> None:
    dataset_dir, features_dir = ctx.input_dir("dataset"), ctx.input_dir("features")
    classes = _classes(dataset_dir)
    svm = dict(np.load(ctx.input_dir("svm") / "svm.npz"))
    bbox = (
        dict(np.load(ctx.input_dir("bbox_regression") / "bbox_regression.npz"))
        if (use_bbox_regression)
        else None
    )
    _, test_split = _splits(dataset_dir)
    sizes = {r["image_id"]: (r["width"], r["height"]) for r in read_images(dataset_dir, test_split)}
    feats, transform = layer_source(ctx, layer, test_split)
    pool5 = (
        feature_shards(features_dir, "pool5", test_split, ctx.input_file("features"))
        if bbox is not None
        else feats
    )
    fn = functools.partial(
        _detect_shard,
        classes=classes,
        svm=ctx.input_file("svm", "svm.npz"),  # read by each task: no weights by value
        bbox=ctx.input_file("bbox_regression", "bbox_regression.npz") if bbox is not None else None,
        sizes=sizes,
        top_k=top_k,
        nms_iou=nms_iou,
        transform=transform,
    )
    pairs = list(zip(feats, pool5, strict=True))  # references: each task resolves its own
    # memory: a shard's features through the head, pool5 for regression, the (N, C) scores, and
    # the weights every task holds
    row_bytes, fixed_bytes = _row_bytes(features_dir, layer, transform)
    if bbox is not None:
        row_bytes += _row_bytes(features_dir, "pool5", _identity)[0] // 2
    row_bytes += 3 * 8 * len(classes)
    fixed_bytes += sum(v.nbytes for d in (svm, bbox or {}) for v in d.values())
    rows = _shard_rows(features_dir, test_split)
    mem = _memory_mb(max(rows, default=0), row_bytes, fixed_bytes)
    thresholds = None
    if max_per_set_per_image:  # rcnn_test.m: max_per_set = 40 × #images per class, before NMS
        parts = _map(ctx, functools.partial(fn, scores_only=True), pairs, mem, f"{ctx.step}: caps")
        per_class = [np.concatenate([p[k] for p in parts]) for k in range(len(classes))]
        thresholds = set_thresholds(per_class, max_per_set_per_image * len(sizes))
        fn = functools.partial(fn, min_scores=thresholds)
    tables = _map(ctx, fn, pairs, mem, ctx.step)
    table = pa.concat_tables([t for t in tables if t.num_rows] or [DETECTIONS_SCHEMA.empty_table()])
    pq.write_table(table, ctx.out_dir / "detections.parquet")
    info = {"detections": table.num_rows}
    if thresholds is not None:
        info["detect_set_thresholds"] = {
            c: float(t) if np.isfinite(t) else None
            for c, t in zip(classes, thresholds, strict=True)
        }
    ctx.write_json("metrics.json", info)


# ----------------------------------------------------------------------------------------------
# evaluate: VOC devkit semantics, 11-point (VOC2007) and area (VOC2010+) AP
def evaluate(ctx: StepContext, *, test_split: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stages.detection.evaluate import evaluate_detections

    dataset_dir = ctx.input_dir("dataset")
    classes = _classes(dataset_dir)
    objects = pq.read_table(dataset_dir / "objects.parquet")
    objects = objects.filter(pa.compute.equal(objects["split"], test_split))
    det = pq.read_table(ctx.input_dir("detect") / "detections.parquet")
    result = evaluate_detections(det, objects, classes)
    metrics = {
        "mAP_voc07": result["mAP_voc07"],
        "mAP_area": result["mAP_area"],
        "AP_voc07": result["AP_voc07"],
        "AP_area": result["AP_area"],
    }
    ctx.write_json("metrics.json", metrics)
    fig, ax = plt.subplots(figsize=(5, 4))
    for cls in classes:
        recall, precision = result["curves"][cls]
        if len(recall):
            ax.plot(recall, precision, label=f"{cls} (AP {result['AP_voc07'][cls]:.2f})")
    ax.set(
        xlabel="recall",
        ylabel="precision",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title=f"Precision-recall ({test_split})",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ctx.out_dir / "precision_recall.png", dpi=120)
    plt.close(fig)
