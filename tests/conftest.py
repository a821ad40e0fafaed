"""Shared fixtures: one embedded Ray instance per test session (start-up costs seconds)."""

from __future__ import annotations

import os

import pytest

# Ray Train's controller polls its worker group every 2 s by default, and a Train run waits for
# several polls (group started, reports, finished): measured 25 s -> 18 s for the BN pipeline's
# 2-worker run on 2 cores at 0.5 s. Only that latency changes. Set at import, before any Ray
# starts (its workers inherit the environment, as do the clusters that cluster tests start).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


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
