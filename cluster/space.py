"""Search spaces for sweeps, independent of Ray Tune (the Ray executor translates them)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Grid:
    values: tuple


@dataclass(frozen=True)
class Uniform:
    low: float
    high: float
    log: bool = False

    def sample(self, rng: np.random.Generator) -> float:
        if self.log:
            return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        return float(rng.uniform(self.low, self.high))


@dataclass(frozen=True)
class Choice:
    values: tuple

    def sample(self, rng: np.random.Generator) -> Any:
        return self.values[int(rng.integers(len(self.values)))]


def expand(space: dict[str, Any], num_samples: int = 1, seed: int = 0) -> list[dict[str, Any]]:
    """Trial configs in Tune's order: the grid's cross product, repeated ``num_samples`` times,
    sampled dimensions drawn per trial. Constants pass through."""
    grid_keys = [k for k, v in space.items() if isinstance(v, Grid)]
    grids = list(itertools.product(*(space[k].values for k in grid_keys))) or [()]
    rng = np.random.default_rng(seed)
    trials = []
    for _ in range(num_samples):
        for combo in grids:
            cfg = {}
            for key, value in space.items():
                if isinstance(value, Grid):
                    cfg[key] = combo[grid_keys.index(key)]
                elif isinstance(value, Uniform | Choice):
                    cfg[key] = value.sample(rng)
                else:
                    cfg[key] = value
            trials.append(cfg)
    return trials
