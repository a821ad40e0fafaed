"""Region proposals by selective search (R-CNN §2.1; REFERENCE §1 "Proposals").

R-CNN runs selective search "fast mode" (Uijlings et al., IJCV 2013) through the authors' MATLAB
code (`rcnn/selective_search/selective_search_boxes.m`). We use OpenCV contrib's re-implementation,
`cv2.ximgproc.segmentation`, which has the same building blocks but different presets. In the
OpenCV version we pin (5.0, `selectivesearchsegmentation.cpp`):

- ``switchToSelectiveSearchFast(base_k, inc_k, sigma)``: images HSV and Lab; Felzenszwalb
  segmentations with k in {base_k, base_k + inc_k, base_k + 2 inc_k} (three values, not two) and
  min_size fixed at the library default of 100 (R-CNN: min_size = k); two strategies,
  colour+fill+texture+size and fill+texture+size, equally weighted. So ``mode="fast"`` with
  k = 50, 50 searches k in {50, 100, 150}.
- ``switchToSelectiveSearchQuality``: HSV, Lab, grey, H and rgI; five k values; four strategies.
- ``switchToSingleStrategy(k, sigma)``: HSV only, one k, colour+fill+texture+size.

``mode="rcnn"`` builds R-CNN's fast mode exactly from the same OpenCV parts: HSV and Lab,
k in {base_k, base_k + inc_k} = {50, 100} with min_size = k, sigma = 0.8, the two strategies above.
Use it to reproduce the paper; ``"fast"`` is OpenCV's own preset.

Ranking. OpenCV, like the MATLAB code, ranks each region by ``rand() * hierarchy level`` and sorts
ascending ("pseudo-random sorting as in the paper"). OpenCV draws from the C library's ``rand()``,
so we reseed it with ``srand`` before every search: the same image then always gives the same
boxes in the same order (POSIX only). That state is shared by every thread of the process: inside
a Ray worker, Ray's own threads draw from ``rand()`` while a search runs (measured: repeated searches
of one image in one worker gave different orders), so ``selective_search_isolated`` runs the search
in a private single-threaded helper process, started once per calling process and reused.

Threads. Selective search takes ≈2 s per PASCAL image on one core (REFERENCE §1). OpenCV may start
its own worker threads; a caller running one search per core should call ``cv2.setNumThreads(1)``
in each worker. This module leaves that setting alone.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Sequence

import cv2
import numpy as np
import pyarrow as pa

from stages.detection.boxes import clip_boxes_voc, dedupe_boxes, to_voc_from_xywh0

SELECTIVE_SEARCH_MODES = ("fast", "quality", "single", "rcnn")

PROPOSALS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("rank", pa.int32()),  # 0 = best-ranked proposal of its image
        ("x1", pa.float32()),  # xyxy, VOC 1-based inclusive, original-image pixels
        ("y1", pa.float32()),
        ("x2", pa.float32()),
        ("y2", pa.float32()),
    ]
)

_RANK_SEED = 1  # glibc treats srand(0) as srand(1); any fixed value gives determinism


def selective_search(
    image_bgr: np.ndarray,
    *,
    mode: str = "fast",
    base_k: int = 50,
    inc_k: int = 50,
    sigma: float = 0.8,
    resize_width: int | None = None,
    min_width_px: int = 20,
    max_boxes: int | None = None,
) -> np.ndarray:
    """Selective search proposals for one ``(H, W, 3)`` uint8 BGR image.

    Returns float32 ``(N, 4)`` xyxy, VOC 1-based inclusive, in original-image pixels, best-ranked
    first. As in R-CNN's `selective_search_boxes.m`: boxes narrower *or* shorter than
    ``min_width_px`` are dropped (`FilterBoxesWidth` tests both sides — REFERENCE only says
    "narrower"), measured at the scale the search ran at; exact duplicates are removed keeping the
    first. ``resize_width`` rescales the image (aspect kept) before the search, since selective
    search is not scale invariant (R-CNN uses 500 for non-PASCAL images), and maps the boxes back.
    ``max_boxes`` keeps only the best-ranked ones. The ranking is reproducible only while no other
    thread of the process draws from C ``rand()`` (OpenCV's own threads included): pipelines call
    ``selective_search_isolated``.
    """
    if mode not in SELECTIVE_SEARCH_MODES:
        raise ValueError(f"unknown selective search mode {mode!r}; valid: {SELECTIVE_SEARCH_MODES}")
    image = np.asarray(image_bgr)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 BGR image, got {image.shape} {image.dtype}")
    if max_boxes is not None and max_boxes < 0:
        raise ValueError(f"max_boxes must be >= 0 or None, got {max_boxes}")
    height, width = image.shape[:2]

    search = image
    if resize_width is not None and resize_width != width:
        if resize_width < 1:
            raise ValueError(f"resize_width must be a positive width in pixels, got {resize_width}")
        search_height = max(1, int(np.floor(height * resize_width / width + 0.5)))
        # Area averaging when shrinking avoids aliasing (MATLAB's imresize antialiases too).
        interp = cv2.INTER_AREA if resize_width < width else cv2.INTER_LINEAR
        search = cv2.resize(image, (resize_width, search_height), interpolation=interp)

    ss = _configure(search, mode, base_k=base_k, inc_k=inc_k, sigma=sigma)
    ctypes.CDLL(None).srand(_RANK_SEED)  # OpenCV ranks regions with C rand(); see module docstring
    rects = np.asarray(ss.process(), dtype=np.float64).reshape(-1, 4)  # (R, 4) x, y, w, h 0-based

    boxes = to_voc_from_xywh0(rects)  # search-image coordinates, best first
    size_ok = (rects[:, 2] >= min_width_px) & (rects[:, 3] >= min_width_px)
    boxes = boxes[size_ok]
    if search is not image:
        boxes = _map_to_original(boxes, width / search.shape[1], height / search.shape[0])
        boxes = clip_boxes_voc(boxes, width, height)
    boxes = boxes[dedupe_boxes(boxes)]  # rounding back to the original grid can merge boxes
    if max_boxes is not None:
        boxes = boxes[:max_boxes]
    return boxes.astype(np.float32)


class _SearchHelper:
    """A private child process running searches one at a time (stdin/stdout, ``.npy`` payloads).

    A plain subprocess rather than ``multiprocessing``: inside Ray workers the latter's resource
    tracker gets killed and spews warnings. The child is single-threaded, so ``srand`` + search is
    deterministic there.
    """

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        return subprocess.Popen(
            [sys.executable, "-c", "from stages.detection.proposals import _serve; _serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )

    def search(self, image: np.ndarray, kwargs: dict) -> np.ndarray:
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self.proc = self._start()
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(image))
            payload = buf.getvalue()
            self.proc.stdin.write(json.dumps({**kwargs, "_nbytes": len(payload)}).encode() + b"\n")
            self.proc.stdin.write(payload)
            self.proc.stdin.flush()
            header = self.proc.stdout.readline()
            if not header:
                raise RuntimeError("selective search helper process died")
            reply = json.loads(header)
            if not reply["ok"]:
                raise ValueError(reply["error"])
            return np.load(io.BytesIO(self.proc.stdout.read(reply["nbytes"])))


def _serve() -> None:
    """Child side of ``_SearchHelper``: answer requests until stdin closes."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints go to stderr, never into the reply stream
    cv2.setNumThreads(1)
    inp = sys.stdin.buffer
    while header := inp.readline():
        kwargs = json.loads(header)
        image = np.load(io.BytesIO(inp.read(kwargs.pop("_nbytes"))))
        try:
            buf = io.BytesIO()
            np.save(buf, selective_search(image, **kwargs))
            out.write(json.dumps({"ok": True, "nbytes": buf.tell()}).encode() + b"\n")
            out.write(buf.getvalue())
        except Exception as e:  # reported to the caller, which raises it
            out.write(
                json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}).encode() + b"\n"
            )
        out.flush()


_HELPER = _SearchHelper()


def selective_search_isolated(image_bgr: np.ndarray, **kwargs) -> np.ndarray:
    """``selective_search`` in a private helper process, so that no other thread of the caller can
    draw from ``rand()`` during the ranking: deterministic inside Ray workers too."""
    return _HELPER.search(image_bgr, kwargs)


def _configure(image: np.ndarray, mode: str, *, base_k: int, inc_k: int, sigma: float):
    seg = cv2.ximgproc.segmentation
    ss = seg.createSelectiveSearchSegmentation()
    if mode == "rcnn":
        # selective_search_boxes.m, fast_mode: colorTypes {Hsv, Lab}, ks [50 100], minSize = k,
        # sigma 0.8, simFunctionHandles {ColourTextureSizeFill, TextureSizeFill}.
        ss.addImage(cv2.cvtColor(image, cv2.COLOR_BGR2HSV))
        ss.addImage(cv2.cvtColor(image, cv2.COLOR_BGR2Lab))
        for k in (base_k, base_k + inc_k):
            ss.addGraphSegmentation(seg.createGraphSegmentation(sigma, float(k), int(k)))
        ss.addStrategy(
            seg.createSelectiveSearchSegmentationStrategyMultiple(
                seg.createSelectiveSearchSegmentationStrategyColor(),
                seg.createSelectiveSearchSegmentationStrategyFill(),
                seg.createSelectiveSearchSegmentationStrategyTexture(),
                seg.createSelectiveSearchSegmentationStrategySize(),
            )
        )
        ss.addStrategy(
            seg.createSelectiveSearchSegmentationStrategyMultiple(
                seg.createSelectiveSearchSegmentationStrategyFill(),
                seg.createSelectiveSearchSegmentationStrategyTexture(),
                seg.createSelectiveSearchSegmentationStrategySize(),
            )
        )
        return ss
    ss.setBaseImage(image)
    if mode == "fast":
        ss.switchToSelectiveSearchFast(base_k, inc_k, sigma)
    elif mode == "quality":
        ss.switchToSelectiveSearchQuality(base_k, inc_k, sigma)
    else:  # "single"
        ss.switchToSingleStrategy(base_k, sigma)
    return ss


def _map_to_original(boxes: np.ndarray, scale_x: float, scale_y: float) -> np.ndarray:
    """Map ``(N, 4)`` VOC boxes from a resized image back to the original pixel grid.

    Box edges are scaled as continuous coordinates (left edge ``x1 - 1``, right edge ``x2``), so a
    box covering the whole resized image covers the whole original. R-CNN used
    ``(b - 1) * scale + 1`` and kept fractions; we snap to whole pixels, rounding half away from
    zero as the original MATLAB does (Python's ``round`` is half-to-even).
    """
    scale = np.array([scale_x, scale_y, scale_x, scale_y])
    edges = np.concatenate([boxes[:, :2] - 1.0, boxes[:, 2:]], axis=1) * scale  # (N, 4)
    snapped = np.sign(edges) * np.floor(np.abs(edges) + 0.5)
    return np.concatenate([snapped[:, :2] + 1.0, snapped[:, 2:]], axis=1)


def proposals_table(image_ids: Sequence[str], boxes: Sequence[np.ndarray]) -> pa.Table:
    """One row per proposal with ``PROPOSALS_SCHEMA``; ``boxes[i]`` is ``(N_i, 4)`` xyxy 1-based.

    Rank is the row's position within its image (0 = best). An image with no proposals has no rows.
    """
    if len(image_ids) != len(boxes):
        raise ValueError(f"got {len(image_ids)} image ids but {len(boxes)} box arrays")
    arrays = [np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in boxes]
    counts = np.array([len(b) for b in arrays], dtype=np.int64)
    coords = np.concatenate(arrays) if arrays else np.zeros((0, 4), np.float32)  # (sum N_i, 4)
    ranks = np.concatenate([np.arange(n, dtype=np.int32) for n in counts]) if arrays else []
    columns = {
        "image_id": np.repeat(np.asarray(image_ids, dtype=object), counts),
        "rank": ranks,
        "x1": coords[:, 0],
        "y1": coords[:, 1],
        "x2": coords[:, 2],
        "y2": coords[:, 3],
    }
    return pa.Table.from_pydict(columns, schema=PROPOSALS_SCHEMA)


def boxes_by_image(table: pa.Table) -> dict[str, np.ndarray]:
    """Inverse of `proposals_table`: image id -> float32 ``(N, 4)`` xyxy 1-based, sorted by rank.

    Images appear in the order of their first row.
    """
    missing = [name for name in PROPOSALS_SCHEMA.names if name not in table.column_names]
    if missing:
        raise ValueError(f"proposals table lacks columns {missing}; expected {PROPOSALS_SCHEMA}")
    ids = np.asarray(table.column("image_id").to_pylist(), dtype=object)
    ranks = table.column("rank").to_numpy()
    coords = np.stack(
        [table.column(c).to_numpy().astype(np.float32) for c in ("x1", "y1", "x2", "y2")], axis=1
    )
    if len(ids) == 0:
        return {}
    uniq, first, group = np.unique(ids, return_index=True, return_inverse=True)
    order = np.lexsort((ranks, group))  # by image, then rank
    starts = np.searchsorted(group[order], np.arange(len(uniq)))
    chunks = np.split(coords[order], starts[1:])
    return {str(uniq[g]): chunks[g] for g in np.argsort(first)}
