"""WHERE and with how much: every ``import ray`` of Paperline lives in this package.

Generic executors that know nothing of papers or steps:

- ``LocalExecutor`` (``cluster.local``): runs everything in this process, no Ray; for unit tests and
  debugging.
- ``RayExecutor`` (``cluster.ray_executor``): the same methods on Ray primitives: tasks, Ray Data
  ``map_batches`` with an actor pool, actors with state, Ray Train ``TorchTrainer``, Ray Tune
  ``Tuner``.

Both subclass ``Executor`` (``cluster.executor``), the one contract the engine relies on:
``run_task``, ``map``, ``infer``, ``actors``, ``train``, ``train_capacity`` and ``sweep``;
``cluster.runtime`` connects to an embedded or existing cluster and ``cluster.jobs`` wraps the
Ray Jobs API.
"""

from cluster.local import LocalExecutor
from cluster.resources import Resources

__all__ = ["LocalExecutor", "Resources"]
