"""Resource requests for one unit of work (a task, a map item, an actor, a training worker, a trial)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Resources:
    cpus: float = 1.0
    # GPUs per unit; "auto" requests one GPU only when the cluster has any (DESIGN: gpu auto)
    gpus: float | str = 0
    memory_mb: int = 0
    # torch/OpenCV threads per unit; 0 = its CPU request. A step whose result depends on its
    # thread count (float reductions split across threads) fixes it here from its config: the
    # engine puts ``threads()`` into the step's key and every executor pins it, whatever CPUs the
    # unit is granted (a training worker capped to the CPUs a sweep leaves free keeps its threads)
    torch_threads: int = 0
    # run on the driver's node (Ray: its `node:<ip>` resource): for units that write into the
    # driver's local folders, e.g. `paperline sweep`'s trials, which are small drivers of Ray
    # tasks writing their run directories under the sweep's --out
    driver_node: bool = False

    def __post_init__(self):
        if self.cpus < 0:
            raise ValueError(f"cpus must be >= 0, got {self.cpus}")
        if isinstance(self.gpus, str) and self.gpus != "auto":
            raise ValueError(f"gpus must be a number or 'auto', got {self.gpus!r}")
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads must be >= 0, got {self.torch_threads}")

    def resolve_gpus(self, cluster_gpus: float) -> float:
        if self.gpus == "auto":
            return 1.0 if cluster_gpus > 0 else 0.0
        return float(self.gpus)

    def threads(self) -> int:
        """Threads a unit uses for torch/OpenCV: ``torch_threads``, else its CPU share, at least
        one. Part of the step's key (``pipelines.engine.step_key``)."""
        return self.torch_threads or max(1, int(self.cpus))

    def to_dict(self) -> dict:
        return asdict(self)


def _blas_threads(n: int) -> int:
    """Pin numpy's BLAS (the OpenBLAS its wheel bundles; torch has its own) to ``n`` threads;
    returns the largest count before (0 when numpy has loaded none). Products such as
    `Pool5Head`'s fc6/fc7 round differently with 1 and 2 BLAS threads (up to 5e-7 on a
    float32 fc7), so an artifact would depend on the executor, not only its key."""
    from threadpoolctl import threadpool_info, threadpool_limits

    pools = [p for p in threadpool_info() if p["user_api"] == "blas"]
    before = max((p["num_threads"] for p in pools), default=0)
    if any(p["num_threads"] != n for p in pools):
        threadpool_limits(n, user_api="blas")
    return before


def limit_threads(n: int) -> int:
    """Pin torch, numpy's BLAS and OpenCV thread pools to ``n``.

    Ray reuses worker processes between tasks and torch fixes its pool size at first use, so every
    unit of work sets this from its own CPU request (DESIGN: no oversubscription). A process that
    has not loaded torch yet does not load it here (≈ 2 s on a busy 2-core machine, e.g. in every
    new Tune trial actor, whose R-CNN trial only drives Ray tasks): torch sizes its pool from
    ``OMP_NUM_THREADS`` when it loads, so that is set instead. Returns the torch threads before
    (0 when torch was not loaded), for ``restore_threads``.
    """
    torch = sys.modules.get("torch")
    before = 0
    if torch is None:
        os.environ["OMP_NUM_THREADS"] = str(n)
    else:
        before = torch.get_num_threads()
        if before != n:
            torch.set_num_threads(n)
    _blas_threads(n)
    try:
        import cv2

        cv2.setNumThreads(n)
    except ImportError:  # pragma: no cover
        pass
    return before


@contextlib.contextmanager
def pinned_threads(n: int) -> Iterator[None]:
    """``limit_threads(n)`` for a block of the calling process (the in-process executor), then the
    torch thread count from before."""
    blas = _blas_threads(n)
    before = limit_threads(n)
    try:
        yield
    finally:
        if blas:
            _blas_threads(blas)
        torch = sys.modules.get("torch")
        if torch is not None and before and torch.get_num_threads() != before:
            torch.set_num_threads(before)
