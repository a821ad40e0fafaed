"""``paperline plan``: a dry estimate of a run before paying for it (issue 19).

Per step: rows, bytes written, peak memory per task, number of tasks, and CPU hours at the
throughputs our benchmarks measured on the 2-core development machine (labelled as such in every
row). Nothing runs: no Ray, no dataset read beyond its index (split files, or the generated set's
config). Every pipeline gets its step names, kinds and the tasks that are knowable from its
config; R-CNN gets the detail, since its feature cache is what decides whether a paper-scale run
fits on a disk.

Sizes of Parquet artifacts are not hand formulas: the feature cache's are measured by writing two
real shards of a few rows with ``stages.detection.features.write_feature_shard`` (the writer the
``features`` step uses) and scaling the fitted ``fixed + per_row * rows`` to each shard's rows.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import registry
from pipelines.config import ConfigError, remote_data_paths
from pipelines.rcnn.common import (
    features_actor_bytes,
    proposals_task_bytes,
    train_worker_bytes,
)

# Throughputs measured by benchmarks/ on the 2-core development machine, no GPU (README,
# Benchmarks). CPU hours below are core-hours at these rates; no GPU rate has been measured yet.
RATE_SOURCE = "rates measured by benchmarks/ on the 2-core dev machine (CPU, no GPU)"
SELECTIVE_SEARCH_S_PER_PX = 1.06 / (500 * 375)  # bench_proposals.py: 1.06 s, 500x375, one core
# bench_features.py: 2000 proposals warped + features, float32, both cores: rcnn_small (64 px)
# 0.9 s/image, AlexNet 21 s/image -> crops per second of the 2-core machine
FEATURE_CROPS_PER_S_2CORES = {("rcnn_small", 64): 2000 / 0.9, ("rcnn_alexnet", 227): 2000 / 21}

# VOC2007's published split sizes and objects per image (devkit), for a `voc` plan whose data.root
# is not on this machine (the `voc2007` preset planned before the data arrives)
VOC2007_SPLIT_IMAGES = {"train": 2501, "val": 2510, "trainval": 5011, "test": 4952}
VOC_OBJECTS_PER_IMAGE = 2.5  # 12 608 / 5 011 trainval, 12 032 / 4 952 test
SS_PROPOSALS_PER_PX = 2000 / (500 * 375)  # selective search fast mode: ≈2000 per VOC image (§2.1)
# App. C training pairs (proposals overlapping a ground-truth box by > bbox.min_iou, plus the
# ground-truth rows) per training object: 1 + this × proposals per image. Measured on the
# generated `ci` set (176 pairs for 42 objects at 150 proposals per image); real photos differ
PAIRS_PER_OBJECT_PER_PROPOSAL = (176 / 42 - 1) / 150
VOC_IMAGE_PX = (500, 375)  # a typical VOC image; the index does not say each one's size
FLOAT32 = 4


def plan(pipeline: str, preset: str | None = None, overrides: Mapping[str, Any] | None = None):
    """One dict per step, in pipeline order: ``step``, ``kind``, ``tasks``, ``rows``,
    ``bytes_written``, ``peak_task_bytes``, ``cpu_core_hours``, ``gpu_hours``, ``note`` (None
    where not estimated), and ``rates`` saying where the hours come from."""
    spec = registry.get(pipeline)
    cfg = spec.build_config(preset, overrides)
    keyed = cfg
    if spec.name == "rcnn" and cfg.data.source == "voc" and not cfg.data.root:
        # a plan for data not here yet (the `voc2007` preset): the steps only need a root's name
        keyed = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root="DATA_ROOT"))
    with remote_data_paths():  # keys only: no fingerprint of data.root's files, no path checks
        steps = spec.steps(keyed)
    rows = [_generic(s) for s in steps]
    if spec.name == "rcnn":
        detail = _rcnn(cfg, steps)
        for r in rows:
            r.update(detail.get(r["step"], {}))
    return rows


def _generic(step) -> dict:
    return {
        "step": step.name,
        "kind": step.kind,
        "tasks": 1 if step.kind == "task" else step.trials,
        "rows": None,
        "bytes_written": None,
        "peak_task_bytes": None,
        "cpu_core_hours": None,
        "gpu_hours": None,
        "note": step.description + (f"; {step.trials} trials" if step.trials else ""),
        "rates": RATE_SOURCE,
    }


# ----------------------------------------------------------------------------------------------
# R-CNN
def _rcnn_index(cfg) -> dict:
    """Images per split, class count, image size and objects per image from the dataset's index
    only: the generated set's config, or the VOC directory's split files (never annotations)."""
    d = cfg.data
    cap = (lambda n: min(n, d.max_images)) if d.max_images else (lambda n: n)
    if d.source == "synthetic":
        from data.synthetic_voc import SHAPE_CLASSES

        return {
            "train": cap(d.num_train),
            "test": cap(d.num_test),
            "classes": len(SHAPE_CLASSES),
            "size": (d.width_px, d.height_px),
            # objects per image: the generator draws up to max_objects, some are dropped
            "objects": (1 + d.max_objects) / 2,
            "source": "the generated set's config",
        }
    main = Path(d.root).expanduser() / "ImageSets" / "Main" if d.root else None
    if main is not None and main.is_dir():

        def count(split: str) -> int:
            path = main / f"{split}.txt"
            if not path.is_file():
                raise ConfigError(f"plan: {path} not found; data.train_split/test_split name it")
            return sum(1 for line in path.read_text().splitlines() if line.strip())

        present = sorted({p.name.rsplit("_", 1)[0] for p in main.glob("*_*.txt")})
        source = f"split files of {d.root}"
    else:  # VOC2007 planned before its data is here: only with the VOC classes and splits
        splits = [d.train_split] + ([d.test_split] if d.holdout_fraction == 0 else [])
        if d.classes != ("voc",) or not set(splits) <= set(VOC2007_SPLIT_IMAGES):
            raise ConfigError(
                f"plan: data.root {d.root or '(unset)'} is not a directory here: plan counts "
                "the lines of its ImageSets/Main split files (without them it assumes VOC2007, "
                f"which needs data.classes=voc and splits among {', '.join(VOC2007_SPLIT_IMAGES)})"
            )
        count, present, source = VOC2007_SPLIT_IMAGES.__getitem__, [], "VOC2007's split sizes"
    train = count(d.train_split)
    if d.holdout_fraction > 0:
        test = round(train * d.holdout_fraction)
        train -= test
    else:
        test = count(d.test_split)
    if d.classes == ("voc",):
        classes = 20
    elif d.classes == ("auto",):
        classes = len(present) or 20  # per-class split files name the classes (devkit layout)
    else:
        classes = len(d.classes)
    return {
        "train": cap(train),
        "test": cap(test),
        "classes": classes,
        "size": VOC_IMAGE_PX,
        "objects": VOC_OBJECTS_PER_IMAGE,
        "source": source,
    }


def _model_sizes(cnn, num_outputs: int) -> tuple[dict[str, int], int]:
    """Feature dims per layer and float32 parameter bytes, from the net built on torch's meta
    device (no memory, no weights)."""
    import torch

    from stages.models.registry import create

    with torch.device("meta"):
        net = create(cnn.model, num_classes=num_outputs, **cnn.model_kwargs())
    params = sum(p.numel() for p in net.parameters()) * FLOAT32
    return dict(net.feature_dims), params


def _shard_bytes_fit(classes: int, dim: int, dtype: str) -> tuple[float, float]:
    """(fixed, per_row) bytes of a feature shard, fitted on two real shards written by the
    feature cache's own writer (4 and 8 images of 50 rows)."""
    from stages.detection.features import write_feature_shard

    sizes = []
    with tempfile.TemporaryDirectory(prefix="pl-plan-") as tmp:
        for images in (4, 8):
            n, per = images * 50, 50
            rng = np.random.default_rng(0)
            xy = rng.uniform(1, 200, (n, 2)).astype(np.float32)
            path = Path(tmp) / f"{images}.parquet"
            write_feature_shard(
                path,
                image_ids=[f"{i // per:06d}" for i in range(n)],
                box_index=np.arange(n) % per,
                is_gt=np.arange(n) % per < 2,
                boxes=np.concatenate([xy, xy + 40], axis=1),
                gt_class=np.where(np.arange(n) % per < 2, 0, -1),
                max_iou=rng.uniform(0, 1, (n, classes)),
                features=np.maximum(rng.standard_normal((n, dim), np.float32), 0),
                dtype=dtype,
            )
            sizes.append((n, path.stat().st_size))
    (n1, b1), (n2, b2) = sizes
    per_row = (b2 - b1) / (n2 - n1)
    return b1 - per_row * n1, per_row


def _proposal_bytes_per_row() -> float:
    """Bytes per proposal row of ``proposals.parquet``, from the step's own table and writer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.detection.proposals import proposals_table

    rng = np.random.default_rng(0)
    ids = [f"{i:06d}" for i in range(20)]
    xy = [rng.uniform(1, 300, (500, 2)).round() for _ in ids]
    table = proposals_table(ids, [np.concatenate([p, p + rng.uniform(20, 200, p.shape).round()], 1)
                                  for p in xy])  # fmt: skip
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().size / table.num_rows


def _rcnn(cfg, steps) -> dict[str, dict]:
    idx = _rcnn_index(cfg)
    c, f, p = cfg.cnn, cfg.features, cfg.proposals
    images = {"train": idx["train"], "test": idx["test"]}
    n_images = sum(images.values())
    w, h = idx["size"]
    if p.resize_width_px:  # selective search runs on the resized image
        w, h = p.resize_width_px, p.resize_width_px * h // w
    props = SS_PROPOSALS_PER_PX * w * h
    props = min(props, p.max_per_image) if p.max_per_image else props
    per_image = props + idx["objects"]  # feature rows per image: gt boxes, then proposals
    dims, param_bytes = _model_sizes(c, idx["classes"] + 1)
    out: dict[str, dict] = {
        "dataset": {
            "rows": n_images,
            "note": f"{idx['train']} train + {idx['test']} test images, {idx['classes']} classes "
            f"({idx['source']})",
        }
    }
    hours_note = f"CPU hours: {RATE_SOURCE}"

    ss_s = SELECTIVE_SEARCH_S_PER_PX * w * h * n_images
    out["proposals"] = {
        "tasks": math.ceil(n_images / p.images_per_task),
        "rows": round(props * n_images),
        "bytes_written": round(_proposal_bytes_per_row() * props * n_images),
        "cpu_core_hours": ss_s / 3600 if p.method == "selective_search" else None,
        # the search's helper process on one image at a time (precomputed: the file is read in
        # the step's process)
        "peak_task_bytes": proposals_task_bytes(w * h) if p.method == "selective_search" else None,
        "note": f"≈{props:.0f} proposals per {w}x{h} image; {hours_note}",
    }
    for s in steps:
        crops = idx["train"] * (idx["objects"] + cfg.pretrain.backgrounds_per_image)
        crop_bytes = crops * 3 * c.input_size**2 * FLOAT32
        if s.identity == "pretrain_crops":
            out[s.name] = {  # streamed image by image into shards of 512 crops
                "rows": round(crops),
                "bytes_written": round(crop_bytes),
                "peak_task_bytes": round(512 * 3 * c.input_size**2 * FLOAT32),
                "note": f"{crops:.0f} float32 crops of {c.input_size} px in .npy shards",
            }
        elif s.kind == "train" and s.identity == "pretrain":
            weights = bool(s.params.get("weights_path"))
            batch = cfg.pretrain.batch_size * 3 * c.input_size**2 * FLOAT32
            out[s.name] = {
                "tasks": cfg.pretrain.num_workers,
                "rows": 0 if weights else round(crops),
                "bytes_written": param_bytes,
                # the workers memory-map the crop shards (issue 19): weights, gradients, momentum
                # and a batch in the heap; the page cache holds what fits of the shards
                "peak_task_bytes": param_bytes
                if weights
                else round(train_worker_bytes(param_bytes, batch)),
                "note": "local ImageNet weights: nothing trained"
                if weights
                else f"{crops:.0f} crops read by each worker from the crop shards",
            }
        elif s.kind == "train" and s.identity == "finetune":
            enabled = s.params.get("enabled", True)
            its = cfg.finetune.iterations * cfg.finetune.batch_size
            # a worker: weights, gradients, momentum and the model's copy in flight (4×), two
            # minibatches of windows (one training, one warped ahead), and every training image
            # it decodes, kept as uint8 (stages.training.rcnn.ImageWindows)
            window_batch = cfg.finetune.batch_size * 3 * c.input_size**2 * FLOAT32
            decoded = idx["train"] * idx["size"][0] * idx["size"][1] * 3
            # the window table (image index int64, box 4 × float32, label int64 per candidate
            # window: ground truth and proposals of each training image), which the workers read
            # from the artifact rather than from the Train config
            windows = round(idx["train"] * per_image)
            out[s.name] = {
                "tasks": cfg.finetune.num_workers,
                "rows": its if enabled else 0,
                "bytes_written": param_bytes + (32 * windows if enabled else 0),
                "peak_task_bytes": round(train_worker_bytes(param_bytes, window_batch, decoded))
                if enabled
                else None,
                "note": f"{its} warped windows ({cfg.finetune.iterations} iterations) drawn from "
                f"{windows} candidates"
                if enabled
                else "no fine-tuning: the pretrained net",
            }
        elif s.kind == "infer" and s.identity == "features":
            out[s.name] = _rcnn_features(s, cfg, idx, images, per_image, dims, param_bytes)
    shard_rows = f.images_per_shard * per_image
    train_shards = math.ceil(idx["train"] / f.images_per_shard)
    test_shards = math.ceil(idx["test"] / f.images_per_shard)
    layer = cfg.svm.layer
    src_dim = dims["pool5" if f.cache == "pool5" else layer]
    head = 0 if f.cache == "layers" or layer == "pool5" else param_bytes  # Pool5Head (fc6/fc7)
    # a map task holds one shard: its cached layer, the SVM layer computed from it, the head
    shard_task = round(shard_rows * (src_dim + dims[layer]) * FLOAT32 + head)
    for s in steps:
        if s.identity == "svm":
            from pipelines.rcnn.detect import solver_memory_mb

            positives = math.ceil(idx["train"] * idx["objects"] / max(1, idx["classes"]))
            solver = solver_memory_mb(1, positives, dims[layer], 4 * 2000) / 1024
            out[s.name] = {
                "tasks": 2 * train_shards,
                "bytes_written": idx["classes"] * (dims[layer] + 1) * FLOAT32,
                "peak_task_bytes": shard_task,
                "note": f"2 passes over the {train_shards} training shards, all classes at once "
                f"(positives + norm sample, then mining); caches and solves in up to "
                f"{idx['classes']} solver actors, ≈{solver:.1f} GiB for one class (≈{positives} "
                "positives and an estimated 8000 cached negatives, held and solved)",
            }
        elif s.identity == "bbox_regression":
            # the training pairs are kept in the artifact (pool5, proposal, target, IoU, class);
            # the step fits one class at a time from them
            pairs = idx["train"] * idx["objects"] * (1 + PAIRS_PER_OBJECT_PER_PROPOSAL * props)
            pair_bytes = (dims["pool5"] + 8) * FLOAT32 + 8 + 4
            out[s.name] = {
                "tasks": train_shards,
                "rows": round(pairs),
                "bytes_written": round(
                    idx["classes"] * (dims["pool5"] + 1) * 4 * FLOAT32 + pairs * pair_bytes
                ),
                "peak_task_bytes": round(shard_rows * dims["pool5"] * FLOAT32),
                "note": f"1 pass over the {train_shards} training shards, all classes at once; "
                f"≈{pairs:.0f} training pairs kept (rate measured on the generated ci set)",
            }
        elif s.identity == "detect":
            passes = 2 if cfg.detect.max_per_set_per_image else 1
            out[s.name] = {
                "tasks": passes * test_shards,
                "peak_task_bytes": shard_task,
                "note": f"{passes} pass(es) over the {test_shards} test shards",
            }
    return out


def _rcnn_features(step, cfg, idx, images, per_image, dims, param_bytes) -> dict:
    """The feature cache: shard sizes from the writer, one shard per split per
    ``images_per_shard`` images and one file per cached layer."""
    f = step.params
    per_shard = step.fn.keywords["images_per_shard"]
    num_actors = step.fn.keywords.get("num_actors")
    layers, dtype = f["layers"], f["dtype"]
    total, by_layer = 0.0, {}
    for layer in layers:
        fixed, per_row = _shard_bytes_fit(idx["classes"], dims[layer], dtype)
        size = 0.0
        for n in images.values():
            full, rest = divmod(n, per_shard)
            size += full * (fixed + per_row * per_shard * per_image)
            size += (fixed + per_row * rest * per_image) if rest else 0
        by_layer[layer] = size
        total += size
    shards = sum(math.ceil(n / per_shard) for n in images.values())
    rows = per_image * sum(images.values())
    shard_feats = per_shard * per_image * sum(dims[x] for x in layers) * FLOAT32
    c = cfg.cnn
    crops = (step.fn.keywords.get("chunk") or 256) * 3 * c.input_size**2 * FLOAT32
    measured = c.model != "rcnn_small" or c.small_widths == (16, 32, 64, 128)
    rate = FEATURE_CROPS_PER_S_2CORES.get((c.model, c.input_size)) if measured else None
    if f.get("amp", "none") != "none":  # measured in float32 only here
        rate = None
    return {
        "tasks": shards,
        "rows": round(rows),
        "bytes_written": round(total),
        # the actor's CNN plus one shard's features, concatenated once before the write
        "peak_task_bytes": round(features_actor_bytes(param_bytes, shard_feats, crops)),
        "by_layer": {k: round(v) for k, v in by_layer.items()},
        "cpu_core_hours": rows / rate * 2 / 3600 if rate else None,
        "note": f"{shards} shards on {num_actors or 'auto'} actor(s); "
        + ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in by_layer.items()),
    }


# ----------------------------------------------------------------------------------------------
def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def table(rows: list[dict]) -> str:
    """The plan as a fixed-width table, the rates' source beneath it."""
    head = f"{'step':<22} {'kind':<6} {'tasks':>6} {'rows':>12} {'written':>10} "
    head += f"{'peak/task':>10} {'CPU core-h':>10}  note"
    lines = [head]
    for r in rows:
        hours = "-" if r["cpu_core_hours"] is None else f"{r['cpu_core_hours']:.3g}"
        lines.append(
            f"{r['step']:<22} {r['kind']:<6} {'-' if r['tasks'] is None else r['tasks']:>6} "
            f"{'-' if r['rows'] is None else r['rows']:>12} {_fmt_bytes(r['bytes_written']):>10} "
            f"{_fmt_bytes(r['peak_task_bytes']):>10} {hours:>10}  {r['note']}"
        )
    known = [r["bytes_written"] for r in rows if r["bytes_written"] is not None]
    if known:
        lines.append(f"total written by the estimated steps: {_fmt_bytes(sum(known))}")
    lines.append(f"CPU core-hours at {RATE_SOURCE}; GPU hours: not measured (no GPU lent yet)")
    return "\n".join(lines)
