"""R-CNN feature cache: one Parquet file per shard of images, one row per box, plus feature scaling.

A shard holds, for each of its images, the ground-truth boxes followed by the proposals, with the
CNN feature of every box (fc7: ``D = 4096``; REFERENCE §1 "Features") and the per-class overlap
that the SVM step needs to pick positives and negatives (§2.3). Columns:

=============  =====================================  ==========================================
column         Arrow type                             meaning
=============  =====================================  ==========================================
``image_id``   ``string`` (dictionary-encoded)        image the box belongs to
``box_index``  ``int32``                              row of the box within its image
``is_gt``      ``bool``                               ground-truth box (never scored at test time)
``x1..y2``     ``float32``                            box, ``xyxy`` VOC 1-based inclusive
``gt_class``   ``int16``                              class index of a gt row, -1 for proposals
``max_iou``    ``fixed_size_list<float32, C>``        per class: max devkit IoU with that class's gt
``feature``    ``fixed_size_binary(D * itemsize)``    ``D`` little-endian float32 (or float16)
=============  =====================================  ==========================================

``max_iou`` uses *all* ground truth of the image, difficult objects included, and covers gt rows
too, exactly like ``overlap`` in R-CNN's ``imdb/roidb_from_voc.m`` (``attach_proposals``); the
devkit ignores difficult objects only at evaluation time. A gt row has ``max_iou = 1`` for its own
class.

Why ``feature`` is fixed-size *binary*, not ``fixed_size_list<float32, D>``: Parquet stores a list
column with a repetition level per value, and decoding 82 M levels dominates the read. Measured on
a 20000 × 4096 float32 array (fc7-like: ReLU of Gaussians), hot page cache, 2 cores shared with
other jobs, best of 3-5 (pyarrow 26, ``ParquetFile.read`` + zero-copy ``np.frombuffer``):

    layout of the feature column                     read            file     vs np.load, same run
    np.load of the .npy                              0.056-0.17 s    328 MB   1x
    fixed_size_list, nullable items, no compression  1.25 s          328 MB   0.05x
    fixed_size_list, non-null items, no compression  0.44 s          328 MB   0.13x
    fixed_size_list, non-null items, lz4 (+bss)      0.46-0.53 s     220 MB   0.11-0.12x
    fixed_size_list, non-null items, zstd            0.70-0.83 s     185 MB   0.07x
    fixed_size_binary, no compression, 1 row group   0.073-0.077 s   328 MB   0.86-0.91x
    fixed_size_binary, lz4                           0.18 s          220 MB   0.37x
    fixed_size_binary, zstd                          0.52 s          185 MB   0.13x
    this module, float32 (features only)             0.08-0.14 s     330 MB   0.64-1.7x
    this module, float16 (decoded to float32)        0.72-1.1 s      166 MB   0.14-0.24x

Only uncompressed fixed-size binary meets the goal of reading at least half as fast as ``np.load``,
so that is the layout; the float dtype and ``D`` are recorded in the field metadata. ``float16``
halves the disk cost (hundreds of GB for VOC; REFERENCE §1 user complaints) but numpy's
half-to-single conversion (~150 M values/s here) then dominates the read.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from os import PathLike
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FEATURE_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
# Off unless set (benchmarks/bench_scale.py): a file every shard read appends "path<TAB>bytes" to,
# from whatever process reads it (Ray workers inherit the variable), to count cache passes.
READ_LOG_ENV = "PAPERLINE_FEATURE_READ_LOG"
BOX_COLUMNS = ("x1", "y1", "x2", "y2")
# Keys of `read_feature_shard`'s dict = `write_feature_shard`'s keywords, so they round-trip.
FIELDS = ("image_ids", "box_index", "is_gt", "boxes", "gt_class", "max_iou", "features")


def _feature_field(dim: int, dtype: str) -> pa.Field:
    if dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature dtype must be one of {sorted(FEATURE_DTYPES)}, got {dtype!r}")
    width = dim * FEATURE_DTYPES[dtype].itemsize
    meta = {"dtype": dtype, "dim": str(dim), "layout": "row-major little-endian"}
    return pa.field("feature", pa.binary(width), nullable=False, metadata=meta)


def feature_schema(num_classes: int, dim: int, dtype: str = "float32") -> pa.Schema:
    """Arrow schema of a shard with ``num_classes`` overlap columns and ``dim``-d features.

    Every field is non-nullable: Parquet then stores no definition levels, which reads faster.
    """
    if num_classes < 1 or dim < 1:
        raise ValueError(f"num_classes and dim must be >= 1, got {num_classes}, {dim}")
    # "element" is the child name Parquet writes back (LIST spec), so the schema round-trips.
    iou_type = pa.list_(pa.field("element", pa.float32(), nullable=False), num_classes)
    return pa.schema(
        [
            pa.field("image_id", pa.string(), nullable=False),
            pa.field("box_index", pa.int32(), nullable=False),
            pa.field("is_gt", pa.bool_(), nullable=False),
            *[pa.field(c, pa.float32(), nullable=False) for c in BOX_COLUMNS],
            pa.field("gt_class", pa.int16(), nullable=False),
            pa.field("max_iou", iou_type, nullable=False),
            _feature_field(dim, dtype),
        ]
    )


def write_feature_shard(
    path: str | PathLike,
    *,
    image_ids: Sequence[str],
    box_index: np.ndarray,
    is_gt: np.ndarray,
    boxes: np.ndarray,
    gt_class: np.ndarray,
    max_iou: np.ndarray,
    features: np.ndarray,
    dtype: str = "float32",
) -> None:
    """Write one shard: ``N`` rows, ``boxes (N, 4)`` xyxy VOC 1-based, ``max_iou (N, C)``,
    ``features (N, D)``; the other arguments are ``(N,)``. ``gt_class`` is -1 exactly on proposals.

    Writer options are chosen for read speed (see the module docstring): no compression, one row
    group, no dictionary or statistics for the feature column.
    """
    features = np.asarray(features)
    max_iou = np.asarray(max_iou, dtype=np.float32)
    boxes = np.asarray(boxes, dtype=np.float32)
    is_gt = np.asarray(is_gt, dtype=bool)
    gt_class = np.asarray(gt_class)
    n = len(features)
    if features.ndim != 2 or max_iou.ndim != 2 or boxes.shape != (n, 4):
        raise ValueError(
            f"{path}: expected features (N, D), max_iou (N, C), boxes (N, 4); got "
            f"{features.shape}, {max_iou.shape}, {boxes.shape}"
        )
    lengths = {"image_ids": len(image_ids), "box_index": len(box_index), "is_gt": len(is_gt)}
    lengths |= {"gt_class": len(gt_class), "max_iou": len(max_iou)}
    if any(v != n for v in lengths.values()):
        raise ValueError(f"{path}: every column needs N={n} rows (= len(features)), got {lengths}")
    if np.any(np.where(is_gt, gt_class < 0, gt_class != -1)):
        raise ValueError(f"{path}: gt_class must be >= 0 on gt rows and -1 on proposals")
    schema = feature_schema(max_iou.shape[1], features.shape[1], dtype)  # checks dtype
    with np.errstate(over="ignore"):  # reported just below, with the path
        stored = features.astype(FEATURE_DTYPES[dtype], copy=False)
    if not np.isfinite(stored).all():  # float16 overflows above 65504
        raise ValueError(f"{path}: features are not finite once stored as {dtype}")
    stored = np.ascontiguousarray(stored)
    feature_col = pa.FixedSizeBinaryArray.from_buffers(
        schema.field("feature").type, n, [None, pa.py_buffer(stored)]
    )
    iou_col = pa.FixedSizeListArray.from_arrays(
        pa.array(max_iou.reshape(-1)), type=schema.field("max_iou").type
    )
    columns = [
        pa.array(list(image_ids), pa.string()),
        pa.array(np.asarray(box_index, dtype=np.int32)),
        pa.array(is_gt),
        *[pa.array(boxes[:, j]) for j in range(4)],
        pa.array(gt_class.astype(np.int16)),
        iou_col,
        feature_col,
    ]
    table = pa.Table.from_arrays(columns, schema=schema)
    small = [f for f in schema.names if f != "feature"]
    pq.write_table(
        table,
        str(path),
        row_group_size=max(n, 1),  # one row group = one Arrow chunk = a zero-copy feature view
        compression="none",  # fastest read by 2.4x over lz4 (module docstring)
        use_dictionary=["image_id"],  # ~2000 rows per image share an id
        write_statistics=small,  # min/max of 16 KB binary blobs is useless
    )


def _single_chunk(table: pa.Table, name: str) -> pa.Array:
    column = table.column(name)
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _features_from(array: pa.FixedSizeBinaryArray, field: pa.Field, path) -> np.ndarray:
    meta = {k.decode(): v.decode() for k, v in (field.metadata or {}).items()}
    if meta.get("dtype") not in FEATURE_DTYPES or "dim" not in meta:
        raise ValueError(f"{path}: column 'feature' lacks dtype/dim metadata; not a feature shard")
    dim, dt = int(meta["dim"]), FEATURE_DTYPES[meta["dtype"]]
    if len(array) == 0:
        return np.zeros((0, dim), dtype=np.float32)
    flat = np.frombuffer(
        array.buffers()[1],
        dtype=dt,
        count=len(array) * dim,
        offset=array.offset * dim * dt.itemsize,
    )
    return flat.reshape(-1, dim).astype(np.float32, copy=False)  # (N, D), a view when float32


MATRIX_DTYPES = {"float16", "float32", "float64", "int32", "int64"}


def matrix_field(name: str, a: np.ndarray) -> pa.Field:
    """The cache's matrix layout for any 2-D array: one fixed-size binary value per row (the
    layout the benchmark above reads fastest), its dtype and width in the field's metadata."""
    if a.ndim != 2 or a.dtype.name not in MATRIX_DTYPES:
        raise ValueError(f"{name}: a 2-D array of {sorted(MATRIX_DTYPES)}, got {a.dtype} {a.shape}")
    meta = {"dtype": a.dtype.name, "dim": str(a.shape[1]), "layout": "row-major little-endian"}
    return pa.field(name, pa.binary(a.shape[1] * a.dtype.itemsize), nullable=False, metadata=meta)


def matrix_array(a: np.ndarray) -> pa.FixedSizeBinaryArray:
    """``a``'s rows as fixed-size binary values, bit for bit (no copy when ``a`` is C-contiguous
    little-endian)."""
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    width = a.shape[1] * a.dtype.itemsize
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), len(a), [None, pa.py_buffer(a.reshape(-1).view(np.uint8))]
    )


def matrix_from(column: pa.ChunkedArray | pa.Array, field: pa.Field) -> np.ndarray:
    """``matrix_array``'s inverse, for a column of any number of chunks (one copy)."""
    meta = {k.decode(): v.decode() for k, v in (field.metadata or {}).items()}
    if meta.get("dtype") not in MATRIX_DTYPES or "dim" not in meta:
        raise ValueError(f"column {field.name!r} lacks dtype/dim metadata: not a matrix column")
    dim, dt = int(meta["dim"]), np.dtype(meta["dtype"]).newbyteorder("<")
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = [
        np.frombuffer(
            c.buffers()[1], dtype=dt, count=len(c) * dim, offset=c.offset * dim * dt.itemsize
        )
        for c in chunks
        if len(c)
    ]
    out = np.concatenate(parts) if parts else np.zeros(0, dt)
    return out.reshape(-1, dim).astype(dt.newbyteorder("="), copy=len(parts) == 1)


def read_feature_shard(path: str | PathLike, columns: Iterable[str] | None = None) -> dict:
    """Read a shard into numpy arrays keyed like `write_feature_shard`'s arguments.

    ``columns`` picks a subset of ``FIELDS`` (default all). ``features`` comes back ``(N, D)``
    float32 — for float32 shards a zero-copy, **read-only** view of the Arrow buffer; ``boxes``
    ``(N, 4)``, ``max_iou`` ``(N, C)`` float32; ``image_ids`` an object array of str.
    """
    wanted = list(FIELDS if columns is None else columns)
    unknown = sorted(set(wanted) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown columns {unknown}; valid: {list(FIELDS)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature shard not found: {path}")
    parquet_names = {"boxes": list(BOX_COLUMNS), "features": ["feature"], "image_ids": ["image_id"]}
    names = [c for w in wanted for c in parquet_names.get(w, [w])]
    try:
        table = pq.ParquetFile(path).read(columns=names)
    except (pa.ArrowInvalid, KeyError) as err:
        raise ValueError(
            f"{path}: not a readable feature shard with columns {names}: {err}"
        ) from err
    if log := os.environ.get(READ_LOG_ENV):
        with open(log, "a") as f:  # one short O_APPEND write per read: whole lines
            f.write(f"{path}\t{table.nbytes}\n")
    out = {}
    for w in wanted:
        if w == "features":
            field = table.schema.field("feature")
            out[w] = _features_from(_single_chunk(table, "feature"), field, path)
        elif w == "boxes":
            cols = [table.column(c).to_numpy() for c in BOX_COLUMNS]
            out[w] = np.stack(cols, axis=1).astype(np.float32, copy=False)  # (N, 4)
        elif w == "max_iou":
            lists = _single_chunk(table, "max_iou")
            out[w] = lists.flatten().to_numpy().reshape(len(lists), lists.type.list_size)
        elif w == "image_ids":
            out[w] = table.column("image_id").to_numpy(zero_copy_only=False).astype(object)
        else:
            out[w] = table.column(w).to_numpy()
    return out


def iter_feature_shards(
    paths: Iterable[str | PathLike], columns: Iterable[str] | None = None
) -> Iterator[dict]:
    """Yield `read_feature_shard` of each path in order; missing files fail before any read."""
    paths = [Path(p) for p in paths]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} feature shard(s) not found: {missing[:5]}")
    cols = None if columns is None else list(columns)
    for p in paths:
        yield read_feature_shard(p, cols)


def sample_rows_for_norm(paths: Iterable[str | PathLike], num_rows: int, seed: int) -> np.ndarray:
    """Features ``(min(num_rows, total), D)`` float32 of rows drawn uniformly without replacement.

    Deterministic given ``seed`` and the set of files: paths are sorted, so their order does not
    matter. Ground-truth rows are sampled too, as in R-CNN's ``rcnn_feature_stats``, which took
    ≤200 random boxes from each of 200 random images (so ``num_rows=40_000`` matches its size); a
    uniform row sample estimates the same mean norm. Only shards holding a sampled row are read;
    to bound I/O on a large cache, pass a (seeded) subset of the shards.
    """
    paths = sorted((Path(p) for p in paths), key=str)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} feature shard(s) not found: {missing[:5]}")
    counts = [pq.ParquetFile(p).metadata.num_rows for p in paths]
    parts = [
        read_feature_shard(path, ["features"])["features"][rows]
        for path, rows in zip(paths, norm_sample_plan(counts, num_rows, seed), strict=True)
        if len(rows)
    ]
    return np.concatenate(parts)


def norm_sample_plan(rows_per_shard: list[int], num_rows: int, seed: int) -> list[np.ndarray]:
    """Per shard (in sorted-path order), the sorted local rows of the seeded uniform sample of
    `sample_rows_for_norm`: from the row counts alone, so a pass that reads every shard anyway
    (R-CNN's SVM and box-regression passes) takes the sample without a pass of its own."""
    counts = np.asarray(rows_per_shard, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    total = int(starts[-1])
    if total == 0:
        raise ValueError(f"no rows to sample in {len(counts)} feature shard(s)")
    picked = np.sort(np.random.default_rng(seed).choice(total, min(num_rows, total), replace=False))
    shard_of = np.searchsorted(starts, picked, side="right") - 1
    return [picked[shard_of == k] - starts[k] for k in range(len(counts))]


def feature_norm_scale(sample_features: np.ndarray, target_norm: float = 20.0) -> float:
    """Factor that gives ``sample_features (N, D)`` a mean L2 norm of ``target_norm``.

    R-CNN multiplies every feature by ``20 / mean ||f||`` (``rcnn_scale_features``; REFERENCE §1
    "SVMs"), which is what makes the SVM's ``C = 0.001`` meaningful.
    """
    x = np.asarray(sample_features, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"sample_features must be a non-empty (N, D) array, got {x.shape}")
    return norm_scale(feature_norms(x), target_norm)


def feature_norms(features: np.ndarray) -> np.ndarray:
    """Each row's L2 norm in float64, ``(N,)``: row by row, so the norms of a shard's sample rows
    equal those of the same rows inside the whole sample, and a task can return N floats instead
    of N × D (issue 19: the sample no longer travels by value)."""
    return np.linalg.norm(np.asarray(features, dtype=np.float64), axis=1)


def norm_scale(norms: np.ndarray, target_norm: float = 20.0) -> float:
    """``target_norm / mean(norms)``: `feature_norm_scale` from the sample's row norms."""
    if len(norms) == 0:
        raise ValueError("need the norms of at least one sampled feature row")
    mean_norm = float(np.asarray(norms, dtype=np.float64).mean())
    if not np.isfinite(mean_norm) or mean_norm <= 0:
        raise ValueError(f"mean feature norm must be finite and > 0, got {mean_norm}")
    return float(target_norm) / mean_norm
