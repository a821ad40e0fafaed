"""The interface a training loop sees, with or without Ray.

A training function is ``train_fn(ctx: TrainContext, config: dict) -> None``. It builds its model and
data, wraps them with ``ctx.prepare_model`` / ``ctx.prepare_data_loader`` (the only two lines that
differ between one process and distributed data parallel), resumes from ``ctx.load_checkpoint()``
and calls ``ctx.report(metrics, checkpoint=...)`` at the end of each epoch. ``cluster/`` provides the
Ray Train implementation; ``LocalTrainContext`` here runs the same function in-process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import torch


class TrainContext(Protocol):
    world_size: int
    rank: int
    device: torch.device

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def prepare_data_loader(self, loader: torch.utils.data.DataLoader) -> Any: ...

    def report(self, metrics: dict, checkpoint: dict | None = None) -> None: ...

    def load_checkpoint(self) -> dict | None: ...


def save_checkpoint(state: dict, directory: str | os.PathLike) -> Path:
    """Write ``state`` (tensors, numbers, strings, nested dicts/lists) atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "checkpoint.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, directory / "checkpoint.pt")
    return directory / "checkpoint.pt"


def load_checkpoint_file(path: str | os.PathLike) -> dict:
    # weights_only: checkpoints are data, never code (no arbitrary unpickling)
    return torch.load(path, map_location="cpu", weights_only=True)


class LocalTrainContext:
    """Single-process context; checkpoints go to ``checkpoint_dir`` so a rerun resumes."""

    world_size = 1
    rank = 0

    def __init__(self, checkpoint_dir: str | os.PathLike | None = None, device: str = "cpu"):
        self.device = torch.device(device)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.history: list[dict] = []
        self.last_checkpoint: dict | None = None

    def prepare_model(self, model):
        return model.to(self.device)

    def prepare_data_loader(self, loader):
        return loader

    def report(self, metrics: dict, checkpoint: dict | None = None) -> None:
        self.history.append(dict(metrics))
        if checkpoint is not None:
            self.last_checkpoint = checkpoint
            if self.checkpoint_dir is not None:
                save_checkpoint(checkpoint, self.checkpoint_dir)

    def load_checkpoint(self) -> dict | None:
        if self.checkpoint_dir is not None and (self.checkpoint_dir / "checkpoint.pt").exists():
            return load_checkpoint_file(self.checkpoint_dir / "checkpoint.pt")
        return None
