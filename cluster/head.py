"""``paperline head start|stop``: one Ray head on this machine that can be stopped alone.

``ray stop`` stops every Ray process of the machine (other users' heads, embedded test sessions).
``start`` runs ``ray start --head --block`` from this interpreter's environment (so jobs run with
the venv's Python, not the system's) in a process group of its own, with its own temp dir; its
pid and address go to ``<temp_dir>/head.json``, which ``stop`` reads to end exactly that group.
Token authentication stays on: ``RAY_AUTH_TOKEN`` must be set (a head without a token would let
anyone who reaches its ports run code).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_TEMP_DIR = "/tmp/paperline-head"  # short: Ray's Unix sockets break past 107 bytes


class HeadError(RuntimeError):
    pass


def start(
    *,
    num_cpus: int | None = None,
    port: int = 6379,
    dashboard_port: int = 8265,
    temp_dir: str = DEFAULT_TEMP_DIR,
    timeout_s: float = 120,
) -> dict:
    """Start the head and wait until its Jobs API answers with our token."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        raise HeadError(
            "RAY_AUTH_TOKEN is not set: export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(openssl rand "
            "-hex 32) first (the same token on every node and client)"
        )
    state = Path(temp_dir) / "head.json"
    if state.exists() and _alive(json.loads(state.read_text())["pid"]):
        raise HeadError(f"a head started from {temp_dir} is running: paperline head stop first")
    Path(temp_dir).mkdir(parents=True, exist_ok=True)
    ray = Path(sys.executable).parent / "ray"
    cmd = [
        str(ray),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        # Ray's fixed defaults for the head's internal ports (agent 52365, metrics, ...) collide
        # with any other head of the machine (measured: "No available agent to submit job"
        # while the agent failed to bind 52365); the two a user addresses stay as given
        *(f"--{n}={p}" for n, p in zip(_INTERNAL_PORTS, _free_ports(5), strict=True)),
        *([f"--num-cpus={num_cpus}"] if num_cpus else []),
    ]
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        # the venv first: the job supervisor runs `python -m pipelines` from this PATH
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log = open(Path(temp_dir) / "head.log", "w")  # noqa: SIM115 - the head keeps it open
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    info = {"pid": proc.pid, "address": address, "gcs": f"127.0.0.1:{port}", "temp_dir": temp_dir}
    state.write_text(json.dumps(info))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            state.unlink(missing_ok=True)
            tail = (Path(temp_dir) / "head.log").read_text()[-600:].strip()
            raise HeadError(f"ray start exited with {proc.returncode}: {tail.splitlines()[-1:]}")
        try:
            req = urllib.request.Request(
                f"{address}/api/version", headers={"Authorization": f"Bearer {token}"}
            )
            urllib.request.urlopen(req, timeout=2)
            return info
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(1)
    stop(temp_dir)
    raise HeadError(f"the head did not answer at {address} in {timeout_s:.0f} s; see head.log")


def stop(temp_dir: str = DEFAULT_TEMP_DIR) -> bool:
    """End the head started from ``temp_dir`` and every process of its group; False if none."""
    state = Path(temp_dir) / "head.json"
    if not state.exists():
        return False
    pid = json.loads(state.read_text())["pid"]
    if _alive(pid):
        os.killpg(pid, signal.SIGTERM)
        # `ray start --block` (Ray 2.60) ignores SIGTERM (tests/cluster/test_submit.py)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
    state.unlink(missing_ok=True)
    return True


_INTERNAL_PORTS = (
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
    "ray-client-server-port",
)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a zombie child of ours counts as gone
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True
