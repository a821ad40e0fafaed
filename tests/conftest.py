"""Shared fixtures: one embedded Ray instance per test session (start-up costs seconds)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 CPUs, token auth on (Ray's default), dashboard on loopback."""
    ray = pytest.importorskip("ray")
    from cluster import runtime

    # short temp dir: Ray's Unix sockets break past 107 bytes (DESIGN)
    info = runtime.connect(num_cpus=2, include_dashboard=True, temp_dir="/tmp/pl-ray")
    yield info
    ray.shutdown()


@pytest.fixture
def ray_executor(ray_session):
    from cluster.ray_executor import RayExecutor

    return RayExecutor(progress=False)
