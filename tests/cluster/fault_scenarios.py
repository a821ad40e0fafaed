"""Fault scenarios that need their own Ray cluster, run as subprocesses by ``test_faults.py``.

``python -m tests.cluster.fault_scenarios node_loss WORKDIR`` starts a head (no CPUs) and two
worker nodes with ``ray.cluster_utils.Cluster``, runs a ``map`` step through the engine, kills
one worker node hard while its tasks run, and prints a JSON summary on the last line.
"""

from __future__ import annotations

import functools
import json
import sys
import threading
import time
from pathlib import Path

from cluster.resources import Resources
from pipelines.engine import Step, StepContext

ITEMS = 12
TASK_S = 1.0


def slow_square(attempts_dir: str, task_s: float, x: int) -> int:
    """One attempt file per execution, named by the node that ran it."""
    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    Path(attempts_dir, f"{x}-{node}-{time.time_ns()}").touch()
    time.sleep(task_s)
    return x * x


def square_step(ctx: StepContext, *, n: int, attempts_dir: str, task_s: float) -> None:
    squares = ctx.map(functools.partial(slow_square, attempts_dir, task_s), list(range(n)))
    ctx.write_json("squares.json", squares)


def _steps(attempts_dir: Path, task_s: float) -> list[Step]:
    # the attempts dir and the sleep are plumbing, outside the key: both runs share one key
    fn = functools.partial(square_step, attempts_dir=str(attempts_dir), task_s=task_s)
    return [Step("squares", fn, kind="map", params={"n": ITEMS}, resources=Resources(cpus=1))]


def _files(artifact) -> dict[str, bytes]:
    d = artifact.local_dir()
    return {p.name: p.read_bytes() for p in d.iterdir() if p.name != "_COMPLETE.json"}


def node_loss(workdir: Path) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from cluster.ray_executor import RayExecutor
    from data.store import ArtifactStore
    from pipelines.engine import run_steps

    attempts = workdir / "attempts"
    attempts.mkdir(parents=True)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    victim = workers[1]
    killed = {}

    def kill_when_busy():
        while True:  # wait until the victim is running tasks, then pull its plug
            on_victim = [p for p in attempts.iterdir() if victim.node_id in p.name]
            if len(on_victim) >= 2:
                killed["tasks_running"] = len(on_victim)
                cluster.remove_node(victim, allow_graceful=False)
                killed["at_s"] = time.time()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_busy, daemon=True)
    killer.start()
    t0 = time.time()
    result = run_steps(
        "faults",
        _steps(attempts, TASK_S),
        store=ArtifactStore(workdir / "store"),
        executor=RayExecutor(progress=False),
        log=lambda _: None,
    )
    wall = time.time() - t0
    killer.join(timeout=5)
    files = _files(result.artifacts["squares"])
    ray.shutdown()
    cluster.shutdown()

    # the same step without faults (in-process), for the artifact comparison
    from cluster.local import LocalExecutor

    (workdir / "ref-attempts").mkdir()
    ref = run_steps(
        "faults",
        _steps(workdir / "ref-attempts", 0.0),
        store=ArtifactStore(workdir / "store-ref"),
        executor=LocalExecutor(progress=False),
        log=lambda _: None,
    )
    return {
        "squares": json.loads(files["squares.json"]),
        "same_key": result.artifacts["squares"].key == ref.artifacts["squares"].key,
        "same_files": files == _files(ref.artifacts["squares"]),
        "attempts": len(list(attempts.iterdir())),
        "killed": killed,
        "wall_s": wall,
    }


if __name__ == "__main__":
    scenario, workdir = sys.argv[1], Path(sys.argv[2])
    out = {"node_loss": node_loss}[scenario](workdir)
    print(json.dumps(out))
