"""Resource requests for one unit of work (a task, a map item, an actor, a training worker, a trial)."""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Resources:
    cpus: float = 1.0
    # GPUs per unit; "auto" requests one GPU only when the cluster has any (DESIGN: gpu auto)
    gpus: float | str = 0
    memory_mb: int = 0

    def __post_init__(self):
        if self.cpus < 0:
            raise ValueError(f"cpus must be >= 0, got {self.cpus}")
        if isinstance(self.gpus, str) and self.gpus != "auto":
            raise ValueError(f"gpus must be a number or 'auto', got {self.gpus!r}")

    def resolve_gpus(self, cluster_gpus: float) -> float:
        if self.gpus == "auto":
            return 1.0 if cluster_gpus > 0 else 0.0
        return float(self.gpus)

    def threads(self) -> int:
        """Threads a unit may use for torch/OpenCV: its CPU share, at least one."""
        return max(1, int(self.cpus))

    def to_dict(self) -> dict:
        return asdict(self)


def limit_threads(n: int) -> None:
    """Pin torch and OpenCV thread pools to ``n``.

    Ray reuses worker processes between tasks and torch fixes its pool size at first use, so every
    unit of work sets this from its own CPU request (DESIGN: no oversubscription). A process that
    has not loaded torch yet does not load it here (≈ 2 s on a busy 2-core machine, e.g. in every
    new Tune trial actor, whose R-CNN trial only drives Ray tasks): torch sizes its pool from
    ``OMP_NUM_THREADS`` when it loads, so that is set instead.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        os.environ["OMP_NUM_THREADS"] = str(n)
    elif torch.get_num_threads() != n:
        torch.set_num_threads(n)
    try:
        import cv2

        cv2.setNumThreads(n)
    except ImportError:  # pragma: no cover
        pass
