"""The network surface of an embedded run: every socket its Ray processes listen on is on loopback.

One embedded instance (``runtime.connect()`` in a fresh process, as ``paperline run`` starts it)
serves the whole module. The test process finds that instance's processes (the driver and its
descendants: GCS, raylet, autoscaler monitor, dashboard, dashboard agent, runtime-env agent,
workers), lists their listening sockets with psutil, and connects to each port from loopback
and from every non-loopback address of the machine.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import ray  # noqa: F401  (puts Ray's bundled psutil on sys.path)

psutil = pytest.importorskip("psutil")

ROOT = Path(__file__).resolve().parents[2]

# Starts the embedded instance, keeps an actor (a worker process) alive, reports, and shuts Ray
# down when the test writes a line to its stdin. SIGALRM ends it if anything hangs.
SCRIPT = """
import json, os, signal, sys
signal.alarm(240)
import ray
from cluster import runtime

info = runtime.connect(num_cpus=1)

@ray.remote(num_cpus=0)
class Probe:
    def pid(self):
        return os.getpid()

probe = Probe.remote()
print("READY", json.dumps({"node_ip": ray.util.get_node_ip_address(), "cpus": info["cpus"],
                           "worker_pid": ray.get(probe.pid.remote())}), flush=True)
signal.alarm(0)  # from here on the test's line (or its end: EOF) stops it
sys.stdin.readline()
runtime.shutdown()
"""

# process kinds that listen in Ray 2.60 (measured: 12 sockets in 8 processes)
REQUIRED_KINDS = {
    "driver",
    "gcs_server",
    "raylet",
    "autoscaler monitor",
    "dashboard",
    "dashboard agent",
    "runtime env agent",
    "worker",
}
MIN_LISTENERS = 10
# the three Prometheus endpoints (autoscaler monitor, dashboard, dashboard agent) answer any path
METRICS_KINDS = {"autoscaler monitor", "dashboard", "dashboard agent"}


def _kind(proc, driver_pid: int, worker_pid: int) -> str:
    if proc.pid == driver_pid:
        return "driver"
    if proc.pid == worker_pid:
        return "worker"
    cmd = " ".join(proc.cmdline())
    if "gcs_server" in cmd:
        return "gcs_server"
    if cmd.split(" ")[0].endswith("/raylet"):
        return "raylet"
    if "autoscaler" in cmd and "monitor.py" in cmd:
        return "autoscaler monitor"
    if "dashboard/dashboard.py" in cmd:
        return "dashboard"
    if "DashboardAgent" in cmd or "dashboard/agent.py" in cmd:
        return "dashboard agent"
    if "RuntimeEnvAgent" in cmd or "runtime_env/agent" in cmd:
        return "runtime env agent"
    if cmd.startswith("ray::"):
        return "worker"
    return cmd[:80]


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)  # an IPv6 socket bound to ::ffff:127.0.0.1
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def _session_processes(driver_pid: int) -> dict:
    try:
        driver = psutil.Process(driver_pid)
        return {p.pid: p for p in [driver, *driver.children(recursive=True)]}
    except psutil.NoSuchProcess:
        return {}


def _listeners(procs: dict, driver_pid: int, worker_pid: int) -> list[dict]:
    """Listening TCP sockets and unconnected bound UDP sockets of the session's processes."""
    found = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.pid not in procs or not conn.laddr:
            continue
        tcp = conn.type == socket.SOCK_STREAM
        if (tcp and conn.status != psutil.CONN_LISTEN) or (not tcp and conn.raddr):
            continue
        try:
            kind = _kind(procs[conn.pid], driver_pid, worker_pid)
        except psutil.NoSuchProcess:
            continue
        found.append(
            {
                "kind": kind,
                "pid": conn.pid,
                "proto": "tcp" if tcp else "udp",
                "ip": conn.laddr.ip,
                "port": conn.laddr.port,
            }
        )
    return sorted(found, key=lambda s: (s["kind"], s["port"]))


def _local_ip(ip: str) -> str:
    """Where to reach a socket bound to ip from this machine (a wildcard is reached at 127.0.0.1)."""
    addr = ipaddress.ip_address(ip.split("%")[0])
    if addr.is_unspecified:
        return "127.0.0.1"
    mapped = getattr(addr, "ipv4_mapped", None)
    return str(mapped or addr)


def _non_loopback_addresses() -> list[str]:
    addrs = []
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            addr = ipaddress.ip_address(entry.address.split("%")[0])
            if not (addr.is_loopback or addr.is_link_local):  # link-local needs a scope id
                addrs.append(str(addr))
    return sorted(set(addrs))


def _connect(ip: str, port: int) -> str:
    """'open', 'refused', or another error's name."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(3)
        try:
            s.connect((ip, port))
            return "open"
        except ConnectionRefusedError:
            return "refused"
        except OSError as e:
            return type(e).__name__


# straight to the address, whatever *_proxy variables the environment has
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str) -> tuple[int | str, str]:
    """HTTP GET without credentials: (status, start of body) or (error name, '')."""
    try:
        with _DIRECT.open(url, timeout=3) as r:
            return r.status, r.read(4096).decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, ""
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, ConnectionRefusedError):
            return "refused", ""
        return type(reason).__name__, ""
    except Exception as e:  # a gRPC port answering HTTP/1.1 with an HTTP/2 frame
        return type(e).__name__, ""


def _grpc_code(ip: str, port: int) -> str:
    """Status of a GCS call (list the nodes) made without the token."""
    import grpc

    with grpc.insecure_channel(f"{ip}:{port}", options=[("grpc.enable_http_proxy", 0)]) as channel:
        call = channel.unary_unary(
            "/ray.rpc.NodeInfoGcsService/GetAllNodeInfo",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        try:
            call(b"", timeout=10)
            return "OK"
        except grpc.RpcError as e:
            return e.code().name


def _url(ip: str, port: int, path: str) -> str:
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}{path}"


@pytest.fixture(scope="module")
def embedded():
    # a short temp root: Ray's Unix socket paths must stay under 108 characters
    root = tempfile.mkdtemp(prefix="pl-ls-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(TMPDIR=root, PYTHONPATH=str(ROOT), PAPERLINE_DASHBOARD="1")
    log = open(Path(root) / "driver.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    procs: dict = {}
    try:
        ready = None
        for line in proc.stdout:
            if line.startswith("READY "):
                ready = json.loads(line.removeprefix("READY "))
                break
        if ready is None:
            log.seek(0)
            pytest.fail(f"the embedded runtime did not start:\n{log.read()[-3000:]}")
        # The agents open their ports while ray.init returns: wait until every kind of process
        # listens and two successive listings agree.
        deadline, previous, listeners = time.monotonic() + 60, None, []
        while time.monotonic() < deadline:
            procs = _session_processes(proc.pid)
            listeners = _listeners(procs, proc.pid, ready["worker_pid"])
            kinds = {s["kind"] for s in listeners}
            if REQUIRED_KINDS <= kinds and listeners == previous:
                break
            previous = listeners
            time.sleep(1)
        yield {**ready, "listeners": listeners}
    finally:
        procs.update(_session_processes(proc.pid))
        try:  # communicate: the driver may still print worker logs while it shuts down
            proc.communicate(input="\n", timeout=60)
        except (subprocess.TimeoutExpired, OSError, ValueError):
            proc.kill()
            proc.wait()
        others = [p for pid, p in procs.items() if pid != proc.pid]
        _, left = psutil.wait_procs(others, timeout=20)
        for p in left:  # only this session's processes, by pid
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        log.close()
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"Ray processes outlived runtime.shutdown(): {left}"


@pytest.mark.ray
def test_an_embedded_run_listens_on_loopback_only(embedded):
    listeners = embedded["listeners"]
    assert embedded["node_ip"] == "127.0.0.1" and embedded["cpus"] == 1.0
    # the listing found the instance: every kind of Ray process, and as many sockets as measured
    # (before the fix 11 of 13 were on [::], 0.0.0.0 or the machine's address)
    kinds = {s["kind"] for s in listeners}
    assert REQUIRED_KINDS <= kinds, (REQUIRED_KINDS - kinds, listeners)
    assert len(listeners) >= MIN_LISTENERS, listeners
    exposed = [s for s in listeners if not _is_loopback(s["ip"])]
    assert exposed == [], exposed


@pytest.mark.ray
def test_no_port_of_an_embedded_run_answers_on_a_non_loopback_address(embedded):
    bound = {(_local_ip(s["ip"]), s["port"]) for s in embedded["listeners"] if s["proto"] == "tcp"}
    ports = sorted({port for _, port in bound})
    assert len(ports) >= MIN_LISTENERS
    # every port is really open where it is bound ...
    closed = {(ip, port): r for ip, port in bound if (r := _connect(ip, port)) != "open"}
    assert closed == {}
    addresses = _non_loopback_addresses()
    if not addresses:
        pytest.skip("this machine has no non-loopback IPv4/IPv6 address to connect from")
    # ... and refuses connections at each of the machine's other addresses
    answered = {
        (ip, port): r
        for ip in addresses
        for port in ports
        if (r := _connect(ip, port)) != "refused"
    }
    assert answered == {}


@pytest.mark.ray
def test_metrics_and_api_endpoints_need_loopback_and_the_api_needs_the_token(embedded):
    tcp = [s for s in embedded["listeners"] if s["proto"] == "tcp"]
    probes = {
        s["port"]: (s["kind"], *_get(_url(_local_ip(s["ip"]), s["port"], "/metrics"))) for s in tcp
    }
    # Prometheus endpoints answer without any token, so loopback is all that keeps them local
    metrics = {port: kind for port, (kind, status, body) in probes.items() if status == 200}
    assert sorted(metrics.values()) == sorted(METRICS_KINDS), probes
    assert all("# TYPE" in probes[port][2] for port in metrics)
    # the dashboard's HTTP API (and the agents' HTTP servers) refuse a request without the token
    api = {
        port for port, (kind, status, _) in probes.items() if kind == "dashboard" and status != 200
    }
    assert len(api) == 1, probes
    (dashboard_port,) = api
    (dashboard_ip,) = {_local_ip(s["ip"]) for s in tcp if s["port"] == dashboard_port}
    assert _get(_url(dashboard_ip, dashboard_port, "/api/jobs/"))[0] == 401
    assert _get(_url(dashboard_ip, dashboard_port, "/api/version"))[0] == 401
    # every other HTTP server (dashboard agent, runtime-env agent) refuses too (gRPC ports do not
    # speak HTTP/1.1), and so does the GCS's gRPC service
    http = {port: status for port, (_, status, _) in probes.items() if isinstance(status, int)}
    assert {port: status for port, status in http.items() if port not in metrics} == {
        port: 401 for port in http if port not in metrics
    }
    (gcs,) = [s for s in tcp if s["kind"] == "gcs_server"]
    assert _grpc_code(_local_ip(gcs["ip"]), gcs["port"]) == "UNAUTHENTICATED"
    addresses = _non_loopback_addresses()
    if not addresses:
        pytest.skip("this machine has no non-loopback IPv4/IPv6 address to connect from")
    reached = {
        (ip, port, path): status
        for ip in addresses
        for port, path in [*((p, "/metrics") for p in metrics), (dashboard_port, "/api/jobs/")]
        if (status := _get(_url(ip, port, path))[0]) != "refused"
    }
    assert reached == {}
