"""Issue 18: node-local copies of a remote store's artifacts (one per node and artifact version,
checked against the marker), and `paperline gc` removing what no run will read again."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from cluster.local import LocalExecutor
from data import store as store_mod
from data.store import ArtifactStore
from pipelines import cli
from pipelines.engine import run_steps
from tests.data.test_remote_store import remote  # noqa: F401 - the remote:// store fixture
from tests.pipelines.toy import read, toy_steps


def _toy(store: ArtifactStore, tmp_path: Path):
    (tmp_path / "counts").mkdir(exist_ok=True)
    steps = toy_steps(tmp_path / "counts")
    return run_steps("toy", steps, store=store, executor=LocalExecutor(progress=False),
                     log=lambda _: None)  # fmt: skip


def test_copies_go_to_the_node_cache_dir_once_and_are_checked(remote, tmp_path, monkeypatch):  # noqa: F811
    store, _ = remote
    monkeypatch.setenv("PAPERLINE_CACHE_DIR", str(tmp_path / "node-a"))
    monkeypatch.setattr(store_mod, "DOWNLOADS", [])
    art = store.artifact("toy", "model", "k1")
    with store.writer(art) as out:
        (out / "model.json").write_text(json.dumps("v1"))
    assert read(art, "model.json") == "v1" and read(art, "model.json") == "v1"
    assert store_mod.DOWNLOADS == ["toy/model/k1"]  # once per node and version
    assert art.local_dir().is_relative_to(tmp_path / "node-a")
    monkeypatch.setenv("PAPERLINE_CACHE_DIR", str(tmp_path / "node-b"))  # another node
    assert read(art, "model.json") == "v1"
    assert store_mod.DOWNLOADS == ["toy/model/k1", "toy/model/k1"]
    # bytes on the store that differ from the marker never become a copy
    backing = tmp_path / "remote" / "bucket" / "store" / "toy" / "model" / "k1" / "model.json"
    backing.write_text(json.dumps("v9"))  # same size, other bytes
    monkeypatch.setenv("PAPERLINE_CACHE_DIR", str(tmp_path / "node-c"))
    with pytest.raises(OSError, match="downloaded bytes differ from the marker"):
        art.local_dir()
    assert not list((tmp_path / "node-c").rglob("model.json"))


def test_gc_removes_stale_staging_locks_work_and_superseded_copies(remote, tmp_path, monkeypatch):  # noqa: F811
    local = ArtifactStore(tmp_path / "store")
    result = _toy(local, tmp_path)
    key = result.artifacts["squares"].key
    step_dir = tmp_path / "store" / "toy" / "squares"
    (step_dir / f".{key}.tmp-dead0001").mkdir()  # a crashed writer's staging dir
    (step_dir / ".feedface.tmp-live0001").mkdir()  # a writer computing now, holding its lock
    (step_dir / "feedface.lock").write_text(f"{socket.gethostname()}:{os.getpid()}:x")
    (step_dir / "abad1dea.lock").write_text(f"{socket.gethostname()}:999999999:x")  # dead pid
    work = tmp_path / "store" / "_work" / "toy"
    (work / f"squares-{key}").mkdir(parents=True)  # finished: nothing to resume
    (work / "squares-0123456789abcdef").mkdir()  # an unfinished step's checkpoints: kept
    removed = local.gc(dry_run=True)
    assert removed["staging"] == [f"toy/squares/.{key}.tmp-dead0001"]
    assert removed["locks"] == ["toy/squares/abad1dea.lock"]
    assert removed["work"] == [f"_work/toy/squares-{key}"]
    assert (step_dir / f".{key}.tmp-dead0001").exists()  # dry run
    assert cli.main(["gc", "--store", str(tmp_path / "store")]) == 0
    assert not (step_dir / f".{key}.tmp-dead0001").exists()
    assert (step_dir / ".feedface.tmp-live0001").exists() and (step_dir / "feedface.lock").exists()
    assert not (step_dir / "abad1dea.lock").exists() and not (work / f"squares-{key}").exists()
    assert (work / "squares-0123456789abcdef").exists()
    assert local.gc() == {"staging": [], "locks": [], "work": [], "cache": []}
    # a remote store: this node's copy of a republished artifact's old version goes
    store, _ = remote
    monkeypatch.setenv("PAPERLINE_CACHE_DIR", str(tmp_path / "node"))
    art = store.artifact("toy", "model", "k1")
    for version in ("v1", "v2"):
        with store.writer(art) as out:
            (out / "model.json").write_text(json.dumps(version))
        read(art, "model.json")
    copies = sorted((tmp_path / "node" / "toy" / "model" / "k1").iterdir())
    assert len(copies) == 2
    gone = store.gc()["cache"]
    assert len(gone) == 1 and read(art, "model.json") == "v2"
    assert len(list((tmp_path / "node" / "toy" / "model" / "k1").iterdir())) == 1


def test_a_reference_resolves_on_the_node_that_uses_it(remote, tmp_path, monkeypatch):  # noqa: F811
    """Issue 18: remote work gets an ArtifactFile, not the driver's path; unpickled on another
    node it fills that node's cache and opens the file there."""
    import pickle

    import numpy as np

    store, _ = remote
    art = store.artifact("toy", "data", "k1")
    with store.writer(art) as out:
        np.savez(out / "data.npz", x=np.arange(5))
    monkeypatch.setattr(store_mod, "DOWNLOADS", [])
    ref = art.file("data.npz")
    shipped = pickle.dumps(ref)  # what a task, trial or Train worker receives: no path in it
    assert str(tmp_path).encode() not in shipped
    monkeypatch.setenv("PAPERLINE_CACHE_DIR", str(tmp_path / "worker-node"))
    there = pickle.loads(shipped)
    with np.load(there) as f:  # os.PathLike: numpy, Path(), open() take it as it is
        assert f["x"].tolist() == [0, 1, 2, 3, 4]
    assert Path(there).is_relative_to(tmp_path / "worker-node")
    assert store_mod.DOWNLOADS == ["toy/data/k1"]
    assert (art.file() / "data.npz") == ref
    local = ArtifactStore(tmp_path / "mounted")  # a mounted filesystem: the store's own path
    lart = local.artifact("toy", "data", "k1")
    with local.writer(lart) as out:
        (out / "a.txt").write_text("x")
    assert str(lart.file("a.txt")) == str(tmp_path / "mounted" / "toy" / "data" / "k1" / "a.txt")
