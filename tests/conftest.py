"""Shared fixtures: one embedded Ray instance per test session (start-up costs seconds)."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

# The suite writes ≈1.6 GiB of temporary files (VGG16-sized state dicts, pipeline stores) plus
# Ray's session logs; on a nearly full disk it fails in dozens of unrelated places instead.
MIN_FREE_TMP_BYTES = 2 << 30
# one per test session (short: Ray's Unix sockets break past 107 bytes), removed at its end, so
# that concurrent sessions never remove each other's
RAY_TEMP_DIR = f"/tmp/pl-ray-{os.getpid()}"


def pytest_sessionstart(session):
    # pytest's temporary files go to the temp dir ($TMPDIR), Ray's sessions to /tmp/pl-ray
    for tmp in dict.fromkeys((tempfile.gettempdir(), "/tmp")):
        free = shutil.disk_usage(tmp).free
        if free < MIN_FREE_TMP_BYTES:
            pytest.exit(
                f"the tests need about {MIN_FREE_TMP_BYTES / 2**30:.0f} GiB free in {tmp} "
                f"(temporary files and Ray's session directory /tmp/pl-ray); it has "
                f"{free / 2**30:.1f} GiB",
                returncode=3,
            )


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 CPUs, token auth on (Ray's default), dashboard on loopback."""
    ray = pytest.importorskip("ray")
    from cluster import runtime

    # short temp dir: Ray's Unix sockets break past 107 bytes (DESIGN)
    info = runtime.connect(num_cpus=2, include_dashboard=True, temp_dir=RAY_TEMP_DIR)
    yield info
    ray.shutdown()
    shutil.rmtree(RAY_TEMP_DIR, ignore_errors=True)  # session logs: hundreds of MB (issue 22)


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
