"""Connect to Ray: an embedded single-node instance by default, or an existing cluster by address.

Token authentication stays on (DESIGN): an embedded instance creates and uses a token; attaching to
a cluster uses ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` / ``~/.ray/auth_token``.
"""

from __future__ import annotations

import logging
import os
import socket

import ray

# Small machines: Ray's default object store (30% of RAM) starves torch; large arrays go through the
# store's Parquet files, not the object store, so 2 GiB is plenty for the embedded case.
EMBEDDED_OBJECT_STORE_BYTES = 2 << 30


def connect(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    temp_dir: str | None = None,
    include_dashboard: bool | None = None,
) -> dict:
    """Start or attach to Ray once per process; returns a short description of the cluster."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        # workers log at WARNING: Ray Train's per-report INFO lines drown the progress output
        common = dict(
            configure_logging=True,
            logging_level=logging.WARNING,
            log_to_driver=True,
            logging_config=ray.LoggingConfig(log_level="WARNING"),
        )
        if address:
            ray.init(address=address, **common)
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
            ray.init(
                num_cpus=num_cpus or os.cpu_count(),
                num_gpus=num_gpus,
                object_store_memory=EMBEDDED_OBJECT_STORE_BYTES,
                include_dashboard=include_dashboard,
                dashboard_host="127.0.0.1",  # never expose an embedded dashboard beyond loopback
                **init,
                **common,
            )
        quiet_data()
    res = ray.cluster_resources()
    return {
        "address": address or "embedded",
        "cpus": res.get("CPU", 0.0),
        "gpus": res.get("GPU", 0.0),
        "nodes": len([n for n in ray.nodes() if n.get("Alive")]),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet_data() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()
