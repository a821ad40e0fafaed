"""Read precomputed region proposals (for parity with the published VOC2007 boxes).

R-CNN's VOC2007 proposals were computed by the selective search authors and cannot be exactly
regenerated (REFERENCE §1 "Proposals"), so the R-CNN pipeline can load them instead of running
selective search. Two formats:

- Parquet: columns ``image_id, x1, y1, x2, y2`` (xyxy, VOC 1-based inclusive) and optionally
  ``rank`` (0 = best); rows of an image are ordered by ``rank`` when present, else by file order.
  This is what `stages.detection.proposals.proposals_table` writes.
- MATLAB ``.mat`` as released with R-CNN / selective search (``selective_search_data/*.mat``):
  ``images``, a cell of image ids, and ``boxes``, a cell of ``(N, 4)`` arrays in
  **[y1 x1 y2 x2]** order, 1-based. We swap the columns to xyxy and keep them 1-based (Fast R-CNN's
  `_load_selective_search_roidb` does the same swap and then subtracts 1 for its 0-based boxes).
  Only MATLAB v5/v7 files are readable by `scipy.io.loadmat`; v7.3 (HDF5) files are rejected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.io

from data.errors import DatasetError

PARQUET_COLUMNS = ("image_id", "x1", "y1", "x2", "y2")
MAT_VARIABLES = ("images", "boxes")
_SUFFIXES = (".parquet", ".pq", ".mat")


def read_precomputed_proposals(
    path: str | Path,
    image_ids: Sequence[str] | None = None,
    image_sizes: Mapping[str, tuple[int, int]] | None = None,
) -> dict[str, np.ndarray]:
    """Image id -> float32 ``(N, 4)`` xyxy VOC 1-based proposals, best first, from Parquet or .mat.

    With ``image_ids``, returns exactly those images in that order and raises if any is absent
    from the file. With ``image_sizes`` (image id -> ``(width, height)`` px), every box of those
    images must lie inside its image, ``1 <= x1 <= x2 <= width``, ``1 <= y1 <= y2 <= height``;
    images of the file without a size are not checked. Raises `DatasetError` naming the file for
    a missing or unreadable file, an unsupported extension, missing columns/variables, degenerate
    boxes (x2 < x1 or y2 < y1) and boxes outside their image.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise DatasetError(path, "proposals file not found")
    if suffix not in _SUFFIXES:
        raise DatasetError(path, f"unsupported proposals format {suffix!r}; expected {_SUFFIXES}")
    proposals = _read_mat(path) if suffix == ".mat" else _read_parquet(path, image_ids)

    for image_id, boxes in proposals.items():
        bad = ~np.isfinite(boxes).all(axis=1) | (boxes[:, 2] < boxes[:, 0])
        bad |= boxes[:, 3] < boxes[:, 1]
        if bad.any():
            first = boxes[np.argmax(bad)].tolist()
            raise DatasetError(
                path,
                f"image {image_id!r}: {int(bad.sum())} degenerate box(es) (need finite "
                f"x1 <= x2, y1 <= y2 in xyxy), first {first}",
            )
        if image_sizes is not None and image_id in image_sizes:
            _check_inside_image(path, image_id, boxes, *image_sizes[image_id])

    if image_ids is None:
        return proposals
    absent = [i for i in image_ids if i not in proposals]
    if absent:
        raise DatasetError(path, f"{len(absent)} requested image id(s) absent, e.g. {absent[:5]}")
    return {i: proposals[i] for i in image_ids}


def _check_inside_image(
    path: Path, image_id: str, boxes: np.ndarray, width: int, height: int
) -> None:
    # Checked here rather than where the boxes are warped (stages/detection/warp.py), which runs
    # in a Ray actor that knows neither the file nor the image id.
    outside = (boxes[:, 0] < 1) | (boxes[:, 1] < 1) | (boxes[:, 2] > width)
    outside |= boxes[:, 3] > height
    if not outside.any():
        return
    first = boxes[np.argmax(outside)].tolist()
    hint = " (0-based boxes? add 1 to every coordinate)" if (boxes[:, :2] == 0).any() else ""
    raise DatasetError(
        path,
        f"image {image_id!r}: {int(outside.sum())} box(es) outside the {width}x{height} image, "
        f"first {first}; expected VOC 1-based inclusive xyxy with 1 <= x1 <= x2 <= {width} and "
        f"1 <= y1 <= y2 <= {height}{hint}",
    )


def _read_parquet(path: Path, image_ids: Sequence[str] | None) -> dict[str, np.ndarray]:
    try:
        schema = pq.read_schema(path)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise DatasetError(path, f"not a readable Parquet file ({err})") from err
    names = schema.names
    missing = [c for c in PARQUET_COLUMNS if c not in names]
    if missing:
        raise DatasetError(
            path, f"missing column(s) {missing}; expected {list(PARQUET_COLUMNS)} (+ optional rank)"
        )
    columns = list(PARQUET_COLUMNS) + (["rank"] if "rank" in names else [])
    # Push the image filter into the reader (a VOC split's file holds ~10M rows) when ids are
    # stored as strings; other id types are compared after conversion with str().
    filters = None
    id_type = schema.field("image_id").type
    if image_ids is not None and (pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
        filters = pc.field("image_id").isin(pa.array(list(image_ids), type=id_type))
    table = pq.read_table(path, columns=columns, filters=filters)

    ids = np.asarray([str(i) for i in table.column("image_id").to_pylist()], dtype=object)
    coords = np.stack(
        [table.column(c).to_numpy().astype(np.float32) for c in PARQUET_COLUMNS[1:]], axis=1
    )  # (R, 4)
    if len(ids) == 0:
        return {}
    rank = table.column("rank").to_numpy() if "rank" in columns else np.arange(len(ids))
    uniq, first, group = np.unique(ids, return_index=True, return_inverse=True)
    order = np.lexsort((rank, group))  # stable: by image, then rank (or file order)
    starts = np.searchsorted(group[order], np.arange(len(uniq)))
    chunks = np.split(coords[order], starts[1:])
    return {str(uniq[g]): chunks[g] for g in np.argsort(first)}


def _read_mat(path: Path) -> dict[str, np.ndarray]:
    try:
        mat = scipy.io.loadmat(path)
    except NotImplementedError as err:  # scipy's message for v7.3 / HDF5 files
        raise DatasetError(
            path, "MATLAB v7.3 (HDF5) files are not supported; save with -v7"
        ) from err
    except Exception as err:
        raise DatasetError(path, f"not a readable MATLAB file ({err})") from err
    missing = [v for v in MAT_VARIABLES if v not in mat]
    if missing:
        raise DatasetError(path, f"missing variable(s) {missing}; expected {list(MAT_VARIABLES)}")

    ids = _mat_strings(path, mat["images"])
    cells = mat["boxes"].ravel()
    if len(cells) != len(ids):
        raise DatasetError(path, f"{len(ids)} images but {len(cells)} box arrays")
    out: dict[str, np.ndarray] = {}
    for image_id, cell in zip(ids, cells, strict=True):
        yxyx = np.asarray(cell, dtype=np.float32)
        if yxyx.size == 0:
            yxyx = yxyx.reshape(0, 4)
        if yxyx.ndim != 2 or yxyx.shape[1] != 4:
            raise DatasetError(
                path, f"image {image_id!r}: boxes have shape {yxyx.shape}, not (N, 4)"
            )
        if image_id in out:
            raise DatasetError(path, f"image {image_id!r} appears more than once")
        out[image_id] = np.ascontiguousarray(yxyx[:, [1, 0, 3, 2]])  # [y1 x1 y2 x2] -> xyxy
    return out


def _mat_strings(path: Path, images: np.ndarray) -> list[str]:
    """Image ids from a loadmat'ed cell of strings or a (space-padded) char matrix."""
    if images.dtype.kind == "U":  # char matrix: one row per id
        return [str(s).rstrip() for s in images.ravel()]
    ids = []
    for cell in images.ravel():
        value = cell
        while isinstance(value, np.ndarray) and value.dtype == object and value.size == 1:
            value = value.ravel()[0]
        if isinstance(value, np.ndarray) and value.dtype.kind == "U" and value.size == 1:
            value = value.ravel()[0]
        if not isinstance(value, str):
            raise DatasetError(path, f"'images' must hold strings, found {value!r}")
        ids.append(value.rstrip())
    return ids
