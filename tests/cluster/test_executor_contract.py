"""Both executors declare and keep the one ``Executor`` contract the engine relies on (issue 17):
same methods, same parameters, same defaults. Importing ``cluster.ray_executor`` starts no Ray."""

from __future__ import annotations

import inspect

import pytest

from cluster.executor import Executor
from cluster.local import LocalExecutor
from cluster.ray_executor import RayExecutor

METHODS = ("run_task", "map", "infer", "actors", "train", "train_capacity", "sweep")


@pytest.mark.parametrize("cls", [LocalExecutor, RayExecutor])
def test_executor_subclasses_the_contract(cls):
    assert Executor in cls.__mro__  # declared, not only structurally alike
    assert isinstance(cls(progress=False), Executor)  # runtime_checkable: attributes too


@pytest.mark.parametrize("cls", [LocalExecutor, RayExecutor])
@pytest.mark.parametrize("method", METHODS)
def test_signatures_match_the_contract(cls, method):
    want = inspect.signature(getattr(Executor, method))
    got = inspect.signature(getattr(cls, method))
    assert list(got.parameters) == list(want.parameters), (cls.__name__, method)
    for name, p in want.parameters.items():
        q = got.parameters[name]
        assert (q.kind, q.default) == (p.kind, p.default), (cls.__name__, method, name)
    assert got.return_annotation == want.return_annotation, (cls.__name__, method)


def test_a_missing_method_breaks_the_contract():
    class Half:  # what an executor that forgot `sweep` looks like
        name, max_parallel_steps, progress = "half", 1, False

        def run_task(self, fn, *args, resources=None, **kwargs): ...
        def map(self, fn, items, *, resources=None, desc="map"): ...
        def infer(self, *a, **k): ...
        def train(self, *a, **k): ...

    assert not isinstance(Half(), Executor)
