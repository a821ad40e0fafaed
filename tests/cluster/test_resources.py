"""`limit_threads`: the pool size a unit of work gets, whether or not its process has torch yet."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from cluster.resources import limit_threads

_FRESH_PROCESS = """
import sys
from cluster.resources import limit_threads
limit_threads(1)
loaded_early = "torch" in sys.modules
import torch
first = torch.get_num_threads()
limit_threads(2)
print(loaded_early, first, torch.get_num_threads())
"""


def test_limit_threads_leaves_torch_unloaded_and_its_pool_sized_when_it_loads():
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "1", "2"]


def test_limit_threads_resizes_a_loaded_torch():
    before = torch.get_num_threads()
    try:
        limit_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
