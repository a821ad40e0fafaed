"""Connect to Ray: an embedded single-node instance by default, or an existing cluster by address.

Token authentication stays on (DESIGN): an embedded instance creates and uses a token; attaching to
a cluster uses ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` / ``~/.ray/auth_token``.

An embedded instance listens on loopback only: its node IP is 127.0.0.1, which makes Ray bind every
process of the node there (GCS, raylet, dashboard and its agent, runtime-env agent, workers and
the three Prometheus metrics endpoints). Attaching by address changes nothing about the cluster.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import select
import socket
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import ray

from cluster import progress

# Small machines: Ray's default object store (30% of RAM) starves torch; large arrays go through the
# store's Parquet files, not the object store, so 2 GiB is plenty for the embedded case.
EMBEDDED_OBJECT_STORE_BYTES = 2 << 30


def _code_runtime_env() -> dict:
    """Attaching to a cluster ships this checkout's code, as ``paperline submit`` does: the
    workers then run the code whose fingerprint is in the step keys, not whatever copy a node
    has installed (issue 18). Not inside a submitted job (its runtime_env already carries the
    code) nor with ``PAPERLINE_SHIP_CODE=0``."""
    from cluster.jobs import WORKING_DIR_EXCLUDES

    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ or os.environ.get("PAPERLINE_SHIP_CODE") == "0":
        return {}
    repo = Path(__file__).resolve().parent.parent
    return {"runtime_env": {"working_dir": str(repo), "excludes": WORKING_DIR_EXCLUDES}}


def connect(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    temp_dir: str | None = None,
    include_dashboard: bool | None = None,
    verbose: bool | None = None,
) -> dict:
    """Start or attach to Ray once per process; returns a short description of the cluster.

    Quiet unless ``verbose`` (default: ``PAPERLINE_VERBOSE``, set by ``paperline -v``): workers'
    output stays in Ray's log files and the driver shows only the engine's step lines and
    progress bars (issue 22: Train's per-report lines, the Train controller's GetTimeoutError
    tracebacks, core-worker errors and idle workers' exit crash dumps drowned them). A remote
    error still reaches the user: its exception is re-raised on the driver (``original_error``)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if verbose is None:
        verbose = is_verbose()
    if not verbose:
        # Tune's default console output prints a configuration table, "View detailed results
        # here" and a TensorBoard hint for every sweep step even at ``verbose=0`` (issue 22);
        # its older reporter at verbosity 0 prints nothing. The engine draws the trials' bar.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if not ray.is_initialized():
        # workers log at WARNING: Ray Train's per-report INFO lines drown the progress output
        common = dict(
            configure_logging=True,
            logging_level=logging.WARNING if verbose else logging.ERROR,
            log_to_driver=verbose,
            logging_config=ray.LoggingConfig(log_level="WARNING"),
        )
        if address:
            ray.init(address=address, **_code_runtime_env(), **common)
        else:
            if include_dashboard is None:
                include_dashboard = os.environ.get("PAPERLINE_DASHBOARD", "1") != "0"
            # Ray Train's controller polls its workers every 2 s and a run waits for several
            # polls (started, reports, finished): 0.5 s saves seconds per small training run
            # (the BN pipeline's 2-worker run: 25 s -> 18 s). The workers inherit the setting.
            os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
            # a training step waits for CPUs like any task (concurrent steps of a small machine
            # queue), instead of failing after Train's default 60 s worker-group start timeout
            os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "1800")
            if not verbose:
                # "Token authentication is enabled", on every run: what DESIGN asks for, so not a
                # warning here. (RAY_AUTH_MODE=token would say it explicitly, but then Ray does
                # not create the token of a new local cluster and the GCS refuses the driver.)
                logging.getLogger(
                    "ray._private.authentication.authentication_token_setup"
                ).setLevel(logging.ERROR)
            # "local": always a new embedded instance. With no address, ray.init would attach to
            # the cluster a `ray start` on this host last recorded (/tmp/ray/ray_current_cluster)
            # and then fail on num_cpus; attaching is what --address auto is for.
            init = dict(address="local", _temp_dir=temp_dir)
            if include_dashboard:
                # Inside our workers, Ray's State API finds "the" cluster the same way, so with a
                # `ray start` cluster on the host Ray Train's placement-group cleaner would ask
                # *that* cluster's dashboard whether our Train controller is alive, be told no,
                # and remove our run's placement group. Point our workers at our own dashboard.
                port = _free_port()
                init.update(
                    dashboard_port=port,
                    runtime_env={
                        "env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
                    },
                )
            with _loopback_node():
                ray.init(
                    num_cpus=num_cpus or os.cpu_count(),
                    num_gpus=num_gpus,
                    object_store_memory=EMBEDDED_OBJECT_STORE_BYTES,
                    include_dashboard=include_dashboard,
                    dashboard_host="127.0.0.1",  # never expose an embedded dashboard beyond loopback
                    _node_ip_address="127.0.0.1",
                    **init,
                    **common,
                )
            _require_loopback_node()
    if not verbose and FILTER_RAY_NOISE:
        filter_ray_noise()
    # also where Ray was already initialised: a Tune trial (`paperline sweep`) runs its pipeline's
    # Ray Data steps from the trial's process, whose DataContext showed the bars (issue 22)
    quiet_data(verbose)
    res = ray.cluster_resources()
    return {
        "address": address or "embedded",
        "cpus": res.get("CPU", 0.0),
        "gpus": res.get("GPU", 0.0),
        "nodes": len([n for n in ray.nodes() if n.get("Alive")]),
    }


# Ray starts the autoscaler's and the dashboard's Prometheus endpoints on these fixed ports (44217,
# 44227) unless its processes find them in the environment; a second instance on the machine then
# loses both endpoints (the port is taken), so each embedded instance gets free ones.
METRICS_PORT_VARS = ("AUTOSCALER_METRIC_PORT", "DASHBOARD_METRIC_PORT")


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """While an embedded instance starts: node IP 127.0.0.1, so that Ray binds it to loopback.

    Ray 2.60 has no option for this on Linux: ``ray.init(_node_ip_address="127.0.0.1")`` is
    replaced by the address that routes off the machine (``resolve_ip_for_localhost``), and with a
    routable node IP the GCS, raylet, agents and workers bind ``[::]``/``0.0.0.0`` and the metrics
    endpoints ``0.0.0.0``. Ray's own local-only mode (what it uses on macOS and Windows, switched by
    ``ray_constants.ENABLE_RAY_CLUSTER``) resolves the node IP to loopback instead, and with a
    loopback node IP each of those processes binds 127.0.0.1 (Ray checks ``is_localhost(node_ip)``).
    The flag is read only while the IP of a process not yet connected is resolved, so it is
    switched for the start-up alone; Ray passes the node IP to every process it starts.
    """
    from ray._private import ray_constants

    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    saved_env = {name: os.environ.get(name) for name in METRICS_PORT_VARS}
    ray_constants.ENABLE_RAY_CLUSTER = False
    for name in METRICS_PORT_VARS:  # read by the monitor and dashboard processes ray.init starts
        os.environ.setdefault(name, str(_free_port()))
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _require_loopback_node() -> None:
    """Fail closed if a Ray upgrade stops honouring the loopback node IP."""
    ip = ray.util.get_node_ip_address()
    if not ipaddress.ip_address(ip).is_loopback:
        ray.shutdown()
        raise RuntimeError(
            f"the embedded Ray node got IP {ip}, not 127.0.0.1, so its processes would listen on "
            "every interface; cluster/runtime.py's _loopback_node no longer works with this Ray "
            "version"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_verbose() -> bool:
    return os.environ.get("PAPERLINE_VERBOSE", "") not in ("", "0", "false")


def quiet_data(verbose: bool = False) -> None:
    """Ray Data without its own progress bars and start/finish lines (the engine draws one bar
    per step); ``verbose`` brings them back."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    # "Data sink Parquet finished. N rows" counted the rows of one block, not the dataset's
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.WARNING)
    # "Progress bars disabled. To enable, set ...": what quiet asks for (-v enables them)
    logging.getLogger("ray.data._internal.progress").setLevel(
        logging.NOTSET if verbose else logging.ERROR
    )
    dataset_log = logging.getLogger("ray.data.dataset")
    for f in [f for f in dataset_log.filters if isinstance(f, _NoCpuWarning)]:
        dataset_log.removeFilter(f)
    if not verbose:
        dataset_log.addFilter(_NoCpuWarning())


class _NoCpuWarning(logging.Filter):
    """Drops Ray Data's "no available CPUs ... The Dataset job will hang" warning, which it gives
    whenever an inference step starts while concurrent steps hold every CPU. Here that is a
    queue, not a hang: those steps finish and release them, and a `paperline sweep` trial holds
    0.05 CPU (``pipelines.sweep.run_sweep``), never a whole one, so trials cannot starve it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Dataset job will hang" not in record.getMessage()


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()


# ---------------------------------------------------------------------------------------------
# Ray prints a few messages past Python's logging: the C++ core worker writes to the process's
# fd 2, and the driver's error listener prints the raylet's warnings to stdout. Lines known not to
# concern a healthy run are dropped there; everything else passes unchanged.
FILTER_RAY_NOISE = False  # the CLI sets it: library users keep their stdout/stderr as they are
HARMLESS_RAY_LINES: tuple[bytes, ...] = (
    # Ray Data passes its actor pool's data context and map function as object references and
    # asks for restarts; it holds both references for as long as the pool lives, so the restart
    # this warns about cannot lose them (Ray's issue 53727). Printed by the core worker at ERROR
    # for every inference step (issue 22). max_restarts=0 would silence it and lose the restarts.
    b"has constructor arguments in the object store and max_restarts > 0",
    # "(raylet) WARNING: N PYTHON worker processes have been started on node ... 5x the maximum
    # expected startup concurrency": what concurrent Tune trials and Train workers do on a
    # machine with few CPUs (the SSL `tiny` preset: four Train jobs and a sweep on 2 cores)
    b"PYTHON worker processes have been started on node",
)
_filters: list[_LineFilter] = []


class _LineFilter(threading.Thread):
    """``fd`` becomes a pipe read by this thread, which writes to the original every line except
    those containing one of ``drop``. Bytes after the last newline wait for it (at most
    ``hold_s``), unless they hold a ``\\r``: progress bars redraw without newlines and are never
    delayed."""

    def __init__(self, fd: int, drop: Sequence[bytes], hold_s: float = 0.2):
        super().__init__(name=f"paperline-line-filter-{fd}", daemon=True)
        self.fd, self.drop, self.hold_s = fd, tuple(drop), hold_s
        self.original = os.dup(fd)
        self.read_fd, write_fd = os.pipe()
        os.dup2(write_fd, fd)
        os.close(write_fd)

    def _emit(self, data: bytes) -> None:
        while data:
            data = data[os.write(self.original, data) :]

    def _lines(self, buf: bytes) -> bytes:
        """Emit ``buf``'s complete lines (dropping the harmless ones); return the rest."""
        *lines, rest = buf.split(b"\n")
        for line in lines:
            if not any(d in line for d in self.drop):
                self._emit(line + b"\n")
        return rest

    def run(self) -> None:
        try:
            self._forward()
        except OSError:  # the reader went away (`paperline run ... | head`): as without a filter
            os.dup2(self.original, self.fd)
        except BaseException:  # never leave the fd on a pipe nobody reads: writers would block
            os.dup2(self.original, self.fd)
            raise

    def _forward(self) -> None:
        buf = b""
        while True:
            ready, _, _ = select.select([self.read_fd], [], [], self.hold_s if buf else None)
            chunk = os.read(self.read_fd, 1 << 16) if ready else b""
            if ready and not chunk:  # every writer closed the pipe: drain and stop
                self._emit(buf)
                return
            buf = self._lines(buf + chunk)
            if buf and (not ready or b"\r" in buf):
                self._emit(buf)  # a progress bar, or a partial line held long enough
                buf = b""

    def stop(self) -> None:
        """Put the original back; what was already written still comes out."""
        os.dup2(self.original, self.fd)  # closes the pipe's last write end: drain, stop
        self.join(timeout=2)


def filter_ray_noise(drop: Sequence[bytes] = HARMLESS_RAY_LINES) -> None:
    """Drop ``drop``'s lines from what this process writes to fds 1 and 2 (once per process;
    undone at exit). Installed after Ray has started, so Ray's own processes keep theirs."""
    if _filters:
        return
    import atexit
    import sys

    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # what Python buffered so far goes out before the fd changes
    for fd in (1, 2):
        f = _LineFilter(fd, drop)
        progress.remember_terminal(fd, f.original)  # isatty(fd) says no from here on
        f.start()
        _filters.append(f)
        atexit.register(f.stop)
