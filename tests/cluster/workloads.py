"""Small workloads for the executor tests (module level so Ray workers can import them)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import torch


def threads_and_double(x: int) -> tuple[int, int]:
    return torch.get_num_threads(), 2 * x


def big_result(i: int) -> dict:
    """4 MiB of float32 (object-store sized, not inlined in the reply) and its index."""
    return {"i": i, "array": np.full((1 << 20,), i, np.float32), "parts": [np.arange(3) + i]}


def scaled_sum(i: int, *, weights: np.ndarray) -> float:
    """``i`` times the sum of ``weights``: a map function holding arrays, like a model's."""
    return float(i * weights.sum())


def blas_product(seed: int) -> bytes:
    """relu(x @ w) in float32 at fc7's shapes, as bytes: OpenBLAS rounds it differently with one
    and with two threads."""
    rng = np.random.default_rng(seed)
    x = np.abs(rng.standard_normal((600, 2048))).astype(np.float32)
    w = rng.standard_normal((2048, 512)).astype(np.float32)
    return np.maximum(x @ w, 0).tobytes()


def fail_on_three(i: int) -> int:
    if i == 3:
        raise ValueError("item 3 is bad")
    return i


class AffinePredictor:
    """A 'model' loaded once per actor; counts its constructions in a file to prove reuse."""

    def __init__(self, scale: float, marker_dir: str):
        import os
        import uuid

        open(os.path.join(marker_dir, f"actor-{uuid.uuid4().hex}"), "w").close()
        self.scale = scale

    def __call__(self, batch: pa.Table) -> pa.Table:
        x = batch.column("x").to_numpy()
        return pa.table({"id": batch.column("id"), "y": pa.array(self.scale * x + 1.0)})


class BatchSpans:
    """A 'model' that says which rows each batch held: its first ``id``, its length, and the
    sum of its ``x`` (what the rows held, not only where they were)."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        x = batch.column("x").to_numpy()
        return pa.table(
            {"first": [batch.column("id")[0].as_py()], "rows": [batch.num_rows], "x": [x.sum()]}
        )


def linear_regression_train(ctx, config: dict) -> None:
    """Fit y = 3x - 1 with SGD; checkpoints every epoch, resumes from the last one."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2048, 1, generator=g)
    y = 3 * x - 1
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=False
    )
    loader = ctx.prepare_data_loader(loader)
    model = ctx.prepare_model(torch.nn.Linear(1, 1))
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"])
    start = 0
    state = ctx.load_checkpoint()
    if state is not None:
        getattr(model, "module", model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["epoch"] + 1
    for epoch in range(start, config["epochs"]):
        total = 0.0
        for xb, yb in loader:
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        net = getattr(model, "module", model)
        ctx.report(
            {"epoch": epoch, "loss": total / len(loader), "world_size": ctx.world_size},
            checkpoint={"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch},
        )


def quadratic_trial(config: dict, report) -> None:
    """Score peaks at x = 2; reports three 'epochs' like a training loop would."""
    for step in range(3):
        report(
            {
                "score": -((config["x"] - 2.0) ** 2) + step,
                "x": config["x"],
                "tag": config.get("tag", ""),
            }
        )


def pid_trial(config: dict, report) -> None:
    """Reports its process and its torch threads at start, then changes the threads (as a careless
    trial might) to show that the next trial in the same actor starts pinned again."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    report({"pid": os.getpid(), "threads": threads, "x": config["x"]})


class Tally:
    """An actor's state: a running total; ``add`` fails on a negative number."""

    def __init__(self, start: int):
        self.total = start

    def add(self, n: int) -> tuple[int, int, int]:
        if n < 0:
            raise ValueError(f"cannot add {n}")
        self.total += n
        return self.total, os.getpid(), torch.get_num_threads()


def make_table(n: int) -> pa.Table:
    return pa.table({"id": np.arange(n), "x": np.linspace(0, 1, n)})


def crash_once_train(ctx, config: dict) -> None:
    """Counts epochs with a checkpoint each; rank 0 kills its own process once, right after the
    checkpoint of epoch ``crash_at`` (a lost worker). Every start is recorded in ``log_dir``."""
    import os
    import time
    from pathlib import Path

    state = ctx.load_checkpoint()
    start = state["epoch"] + 1 if state is not None else 0
    Path(config["log_dir"], f"start-rank{ctx.rank}-epoch{start}-{time.time_ns()}").touch()
    model = ctx.prepare_model(torch.nn.Linear(1, 1))
    for epoch in range(start, config["epochs"]):
        net = getattr(model, "module", model)
        ctx.report(
            {"epoch": epoch, "world_size": ctx.world_size},
            checkpoint={"epoch": epoch, "model": net.state_dict()},
        )
        marker = Path(config["log_dir"], "crashed")
        if epoch == config["crash_at"] and ctx.rank == 0 and not marker.exists():
            marker.touch()
            os._exit(1)  # no cleanup, no exception: the process is simply gone


def threads_train(ctx, config: dict) -> None:
    """Reports the torch threads its worker was given (with a checkpoint: Ray Train V2 keeps only
    the metrics of reports that carry one)."""
    n = torch.get_num_threads()
    ctx.report({"threads": n}, checkpoint={"threads": n})


def uneven_trial(config: dict, report) -> None:
    """Reports whose keys differ (a closing record with keys of its own, as BN's trials end),
    numpy values and a NaN: what a sweep returns must be these reports, whatever the executor."""
    import numpy as np

    for step in range(2):
        report({"step": step, "loss": np.float32(1.0 / (step + 1)), "acc": float("nan"), "best": 0})
    report({"final": True, "best": np.float64(config["x"]), "curve": np.arange(3)})
