"""The pipelines Paperline knows, by name. Each module defines ``PIPELINE = PipelineSpec(...)``."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pipelines.config import ConfigError, apply_overrides

MODULES = {
    "rcnn": "pipelines.rcnn",
    "generalization": "pipelines.generalization",
    "batchnorm": "pipelines.batchnorm",
    "mobilenet": "pipelines.mobilenet",
    "ssl": "pipelines.ssl",
}


@dataclass(frozen=True)
class PipelineSpec:
    name: str
    summary: str
    config: type  # frozen dataclass whose defaults are the paper's setting
    presets: Mapping[str, Mapping[str, Any]]  # name -> dotted-key overrides of the defaults
    default_preset: str
    steps: Callable[[Any], list]  # steps(cfg) -> list[Step]
    # the headline metric (a key of the run's metrics.json): `paperline sweep`'s default objective
    metric: str = ""
    mode: str = "max"

    def build_config(self, preset: str | None = None, overrides: Mapping[str, Any] | None = None):
        preset = preset or self.default_preset
        if preset not in self.presets:
            raise ConfigError(
                f"{self.name}: unknown preset {preset!r}; presets: {', '.join(self.presets)}"
            )
        cfg = apply_overrides(self.config(), self.presets[preset])
        return apply_overrides(cfg, overrides or {})


def names() -> list[str]:
    return list(MODULES)


def get(name: str) -> PipelineSpec:
    """A registered pipeline by name, or one of your own as ``package.module:ATTRIBUTE``."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            spec = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"pipeline {name!r}: cannot import it ({e})") from None
        if not isinstance(spec, PipelineSpec):
            raise ConfigError(f"pipeline {name!r} is a {type(spec).__name__}, not a PipelineSpec")
        return spec
    if name not in MODULES:
        raise ConfigError(f"unknown pipeline {name!r}; pipelines: {', '.join(MODULES)}")
    return importlib.import_module(MODULES[name]).PIPELINE
