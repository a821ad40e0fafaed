"""End to end: a separately started Ray head on loopback, `paperline submit`, artifacts on disk.

Token authentication stays on: the head runs with a token, and the client finds the same token in
RAY_AUTH_TOKEN; a client without it is refused.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(420)]
REPO = Path(__file__).resolve().parents[2]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    token = secrets.token_hex(32)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    gcs, dash, client, agent, agent_grpc, metrics, rtenv, nm, om = free_ports(9)
    temp_dir = f"/tmp/pl-head-{secrets.token_hex(3)}"  # short: Unix socket path limit
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={rtenv}",
        f"--node-manager-port={nm}",
        f"--object-manager-port={om}",
        "--num-cpus=2",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        "--node-ip-address=127.0.0.1",
    ]
    log = open(tmp_path_factory.mktemp("head") / "head.log", "w")
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(
                f"{address}/api/version", headers={"Authorization": f"Bearer {token}"}
            )
            urllib.request.urlopen(req, timeout=2)
            break
        except (urllib.error.URLError, ConnectionError, OSError):
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}; see {log.name}")
            time.sleep(1)
    else:
        pytest.fail(f"Ray head did not come up in 90 s; see {log.name}")
    yield {"address": address, "token": token, "env": env}
    os.killpg(proc.pid, signal.SIGTERM)  # only this head's processes, not other Ray instances
    try:
        # `ray start --block` (Ray 2.60) does not exit on SIGTERM at all (measured: still there
        # after 30 s), so waiting the old 10 s only delayed the SIGKILL below
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    log.close()
    shutil.rmtree(temp_dir, ignore_errors=True)  # the head's session logs: CI runs in /tmp


def paperline(*args: str, env: dict, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=360,
    )


def test_submit_runs_pipeline_on_the_cluster(ray_head, tmp_path):
    store, runs = tmp_path / "store", tmp_path / "runs"
    proc = paperline(
        "submit",
        "rcnn",
        "--preset",
        "ci",
        "--set",
        "data.num_train=4",
        "--set",
        "data.num_test=2",
        "--until",
        "proposal_report",
        "--store",
        str(store),
        "--out",
        str(runs),
        "--address",
        ray_head["address"],
        "--wait",
        env=ray_head["env"],
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SUCCEEDED" in proc.stdout
    job_id = proc.stdout.split("submitted ", 1)[1].split(":", 1)[0]
    # the job attached to the head (3 steps computed there), it did not start its own Ray
    metrics_files = list(runs.glob("rcnn/ci-*/metrics.json"))
    assert len(metrics_files) == 1
    metrics = json.loads(metrics_files[0].read_text())
    assert metrics["proposal_recall_iou0.5"] >= 0.8
    manifest = json.loads((metrics_files[0].parent / "manifest.json").read_text())
    assert [m["status"] for m in manifest] == ["computed"] * 3
    assert len(list(store.glob("rcnn/*/*/_COMPLETE.json"))) == 3

    status = paperline(
        "jobs", "status", job_id, "--address", ray_head["address"], env=ray_head["env"]
    )
    assert status.returncode == 0 and status.stdout.strip() == "SUCCEEDED"
    logs = paperline("jobs", "logs", job_id, "--address", ray_head["address"], env=ray_head["env"])
    assert "proposal_report" in logs.stdout and "cluster={'address': " in logs.stdout
    # the job attached to the head (RAY_ADDRESS, set by the job supervisor): no embedded Ray
    assert "cluster={'address': 'embedded'" not in logs.stdout


def test_client_without_token_is_refused(ray_head, tmp_path):
    env = {k: v for k, v in ray_head["env"].items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    proc = paperline("jobs", "status", "raysubmit_nope", "--address", ray_head["address"], env=env)
    assert proc.returncode != 0
    assert "auth" in (proc.stdout + proc.stderr).lower()
