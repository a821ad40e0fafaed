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


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests skip on machines without a CUDA device (benchmarks/gpu_check.sh runs
    them where there is one)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
