"""The artifact store on a non-local pyarrow filesystem (what s3:// or gs:// give): a fake
``remote://`` scheme served by a SubTreeFileSystem over a temporary folder, so the remote code
paths (upload on publish, download on read) run without a network."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from cluster.local import LocalExecutor
from data import store as store_mod
from data.store import ArtifactStore
from pipelines.engine import run_steps
from tests.pipelines.toy import read, toy_steps


@pytest.fixture
def remote(tmp_path, monkeypatch):
    """``remote://bucket/store`` → ``tmp_path/remote/bucket/store``; downloads under tmp_path."""
    backing = tmp_path / "remote"
    backing.mkdir()
    real = store_mod.filesystem_from_uri

    def from_uri(uri):
        if uri.startswith("remote://"):
            return pafs.SubTreeFileSystem(str(backing), pafs.LocalFileSystem()), uri[9:]
        return real(uri)

    monkeypatch.setattr(store_mod, "filesystem_from_uri", from_uri)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "local-tmp"))
    (tmp_path / "local-tmp").mkdir()
    copies = []
    real_copy = pafs.copy_files

    def copy_files(src, dst, **kw):
        if kw.get("source_filesystem") is not None:  # a download from the store
            copies.append(src)
        return real_copy(src, dst, **kw)

    monkeypatch.setattr(pafs, "copy_files", copy_files)
    return ArtifactStore("remote://bucket/store"), copies


def test_a_republished_artifact_is_read_anew_not_from_the_stale_copy(remote):
    store, _ = remote
    assert not store.is_local
    art = store.artifact("toy", "model", "k1")
    for version in ("v1", "v2"):  # v2: republished under the same key, as --force does
        with store.writer(art) as out:
            (out / "model.json").write_text(json.dumps(version))
        assert read(art, "model.json") == version
    old, new = sorted(p.parent.name for p in Path(tempfile.gettempdir()).rglob("model.json"))[:2]
    assert old != new  # each version has its own copy; the first is left to its readers


def test_a_cached_rerun_downloads_only_metrics_and_published_files(remote, tmp_path):
    store, copies = remote
    (tmp_path / "counts").mkdir()
    steps = toy_steps(tmp_path / "counts")
    ex = LocalExecutor(progress=False)
    first = run_steps("toy", steps, store=store, executor=ex, run_dir=tmp_path / "run1",
                      log=lambda _: None)  # fmt: skip
    assert first.computed() == ["numbers", "squares", "total", "label"]
    copies.clear()
    again = run_steps("toy", steps, store=store, executor=ex, run_dir=tmp_path / "run2",
                      log=lambda _: None)  # fmt: skip
    assert again.computed() == []
    published = [name for s in steps for name in s.publish]
    assert len(copies) == len(published)  # no whole-artifact download
    assert all(c.rsplit("/", 1)[-1] in published for c in copies)
    assert json.loads((tmp_path / "run2" / "metrics.json").read_text()) == json.loads(
        (tmp_path / "run1" / "metrics.json").read_text()
    )
    for name in published:
        assert (tmp_path / "run2" / name).read_bytes() == (tmp_path / "run1" / name).read_bytes()


def test_inference_on_several_nodes_needs_a_shared_filesystem_store(remote, tmp_path):
    from pipelines.config import ConfigError
    from pipelines.engine import Step
    from pipelines.runner import check_store_reach

    store, _ = remote
    steps = [Step("features", lambda ctx: None, kind="infer"), Step("svm", lambda ctx: None)]
    with pytest.raises(ConfigError, match=r"remote://bucket/store: step\(s\) features run Ray"):
        check_store_reach(store, steps, ["features", "svm"], nodes=2)
    check_store_reach(store, steps, ["features"], nodes=1)  # one node: its own local copies
    check_store_reach(store, steps, ["svm"], nodes=3)  # features cached: nothing to infer
    check_store_reach(ArtifactStore(tmp_path / "shared"), steps, ["features"], nodes=3)
