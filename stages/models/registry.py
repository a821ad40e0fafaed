"""The one model registry (STYLE "One small registry, for models only").

Constructors register under a self-explaining name and take explicit keyword arguments::

    @register("rcnn_alexnet")
    def rcnn_alexnet(num_classes: int = 1000, weights_path: str | None = None) -> nn.Module: ...

    model = create("rcnn_alexnet", num_classes=21)
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_CONSTRUCTORS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding ``constructor`` under ``name``; a name may be registered only once."""

    def add(constructor: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _CONSTRUCTORS and _CONSTRUCTORS[name] is not constructor:
            raise ValueError(f"model {name!r} is already registered by {_CONSTRUCTORS[name]}")
        _CONSTRUCTORS[name] = constructor
        return constructor

    return add


def create(name: str, **kwargs) -> nn.Module:
    """Build the model registered as ``name`` with its keyword arguments."""
    if name not in _CONSTRUCTORS:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(names())}")
    return _CONSTRUCTORS[name](**kwargs)


def names() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_CONSTRUCTORS)
