"""Fault scenarios that need their own Ray cluster, run as subprocesses by ``test_faults.py``.

``python -m tests.cluster.fault_scenarios node_loss WORKDIR`` starts a head (no CPUs) and two
worker nodes with ``ray.cluster_utils.Cluster``, runs a ``map`` step through the engine, kills
one worker node hard while its tasks run, and prints a JSON summary on the last line. Tasks on the
doomed node never finish by themselves (they wait to be killed), so every attempt there is lost
and must run again elsewhere, however slowly the kill lands on a loaded machine.
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
VICTIM_TASK_S = 120.0  # far longer than the kill takes: the node dies with these tasks running


def slow_square(attempts_dir: str, task_s: float, victim_file: str, x: int) -> int:
    """One attempt file per execution, named by the node that ran it. On the node named in
    ``victim_file`` the task sleeps until the node is killed."""
    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    Path(attempts_dir, f"{x}-{node}-{time.time_ns()}").touch()
    doomed = victim_file and Path(victim_file).read_text() == node
    time.sleep(VICTIM_TASK_S if doomed else task_s)
    return x * x


def square_step(
    ctx: StepContext, *, n: int, attempts_dir: str, task_s: float, victim_file: str
) -> None:
    fn = functools.partial(slow_square, attempts_dir, task_s, victim_file)
    squares = ctx.map(fn, list(range(n)))
    ctx.write_json("squares.json", squares)


def _steps(attempts_dir: Path, task_s: float, victim_file: str = "") -> list[Step]:
    # the attempts dir, the sleep and the victim are plumbing, outside the key: both runs share
    # one key
    fn = functools.partial(
        square_step, attempts_dir=str(attempts_dir), task_s=task_s, victim_file=victim_file
    )
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
    # GCS health checks every second instead of every 3 s: a dead node (connection refused) is
    # declared dead after 5 failed checks, ~5 s instead of ~15 s, and its tasks are retried then.
    # A live node still needs 5 checks that each time out (10 s) to be declared dead.
    head_args = {"num_cpus": 0, "_system_config": {"health_check_period_ms": 1000}}
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    victim = workers[1]
    victim_file = workdir / "victim"
    victim_file.write_text(victim.node_id)
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
        _steps(attempts, TASK_S, str(victim_file)),
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
        "victim_attempts": len([p for p in attempts.iterdir() if victim.node_id in p.name]),
        "killed": killed,
        "wall_s": wall,
    }


if __name__ == "__main__":
    scenario, workdir = sys.argv[1], Path(sys.argv[2])
    out = {"node_loss": node_loss}[scenario](workdir)
    print(json.dumps(out))
