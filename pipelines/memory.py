"""Memory requests of the steps' units of work (Train workers, Tune trials, map tasks, actors):
each asks the cluster for its own estimate, so concurrent units never exhaust a node (issue 19).
Scheduling only: a request is not in any key."""

from __future__ import annotations

# what a worker process holds before its model and data: the interpreter, torch, pyarrow, Ray
# (a features actor of R-CNN's `tiny` demo peaked at 606 MiB with a 0.3 MB net and 60 MB of rows,
# which Ray Data's memory check reported against a request made with a 512 MiB base)
WORKER_BASE_BYTES = 1 << 30


def request_mb(nbytes: int) -> int:
    """Megabytes to ask for: the estimate plus the worker's base."""
    return -(-(WORKER_BASE_BYTES + int(nbytes)) // (1 << 20))


def input_bytes(ctx, name: str, prefix: str = "") -> int:
    """Bytes of input artifact ``name`` (its files under ``prefix``), from its marker: what a
    unit that loads it holds, without copying it to the driver."""
    return ctx.inputs[name].file_bytes(prefix)


def trainer_mb(nets_and_inputs, *, data_bytes: int = 0, data_copies: int = 2,
               optimizer_states: int = 1) -> int:  # fmt: skip
    """The request of a unit that trains one of ``nets_and_inputs`` (``(net, input_shape)``
    pairs, nets on the meta device; the largest counts) holding ``data_bytes`` of data
    ``data_copies`` times (loaded arrays and their tensors)."""
    from stages.training.memory import training_step_bytes

    step = max(
        (training_step_bytes(n, s, optimizer_states=optimizer_states) for n, s in nets_and_inputs),
        default=0,
    )
    return request_mb(step + data_copies * data_bytes)
