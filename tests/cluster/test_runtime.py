"""`runtime.connect` beside another Ray cluster on the same host (one a `ray start` recorded)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh process: starts an embedded Ray, then asks Ray's State API *from inside a task*
# whether an actor of ours is alive, the question Ray Train's placement-group cleaner asks about
# its controller.
SCRIPT = """
import json
import ray
from cluster import runtime

info = runtime.connect(num_cpus=1)

@ray.remote(num_cpus=0)
class Probe:
    def ping(self):
        return 1

probe = Probe.remote()
ray.get(probe.ping.remote())

@ray.remote(num_cpus=0)
def state_of(actor_id):
    from ray.util.state import get_actor
    found = get_actor(actor_id, timeout=20)
    return found.state if found else None

print("RESULT", json.dumps({"address": info["address"], "cpus": info["cpus"],
                            "state": ray.get(state_of.remote(probe._actor_id.hex()))}))
"""


@pytest.mark.ray
def test_embedded_ray_ignores_the_cluster_a_ray_start_recorded(tmp_path):
    # Ray records the last `ray start` in <tmp>/ray/ray_current_cluster; ray.init() with no address
    # and Ray's State API both read it. Record one where nothing listens (a short temp root: Ray's
    # socket paths must stay under 108 characters).
    root = tempfile.mkdtemp(prefix="pl-rt-", dir="/tmp")
    try:
        (Path(root) / "ray").mkdir()
        (Path(root) / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(TMPDIR=root, PYTHONPATH=str(ROOT), PAPERLINE_DASHBOARD="1")
        out = subprocess.run(
            [sys.executable, "-c", SCRIPT],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        if shutil.which("pkill"):  # Ray processes a timed-out driver left behind
            subprocess.run(["pkill", "-f", f"{root}/ray"], check=False)
        shutil.rmtree(root, ignore_errors=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    # an embedded 1-CPU instance was started (not an attempt to attach to 127.0.0.1:9) ...
    assert result["address"] == "embedded" and result["cpus"] == 1.0
    # ... and a task's State API query reached our own cluster, which knows the actor
    assert result["state"] == "ALIVE"
