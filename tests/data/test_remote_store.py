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
from data.store import Artifact, ArtifactStore
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


class _ShardWriter:
    """A predictor like R-CNN's FeatureWriter: writes one file per batch through the step's
    output reference, from wherever it runs, and returns what it wrote."""

    def __init__(self, out):
        self.out = out

    def __call__(self, batch):
        import pyarrow as pa

        first = batch["i"][0].as_py()
        meta = (self.out / "parts" / f"{first:03d}.txt").write(
            lambda p: p.write_text(",".join(str(i) for i in batch["i"].to_pylist()))
        )
        return pa.table({"name": [f"parts/{first:03d}.txt"], "meta": [json.dumps(meta)]})


def _write_through_refs(ctx, *, fail: bool = False):
    import pyarrow as pa

    result = ctx.infer(pa.table({"i": list(range(10))}), _ShardWriter, {"out": ctx.output("")},
                       batch_size=4)  # fmt: skip
    ctx.add_files({n: json.loads(m) for n, m in zip(*result.to_pydict().values(), strict=True)})
    # scratch written the same way, read back and deleted (R-CNN's mining rounds): not kept
    scratch = ctx.output("scratch/round.txt")
    scratch.write(lambda p: p.write_text("hard negatives"))
    with scratch.open_input() as f:
        assert f.read() == b"hard negatives"
    scratch.delete()
    scratch.delete()  # a retried step deletes again: no error
    if fail:
        raise RuntimeError("after the remote writes")
    names = result["name"].to_pylist()
    # read back before publishing (box regression fits from the pairs its map tasks wrote)
    back = []
    for name in sorted(names):
        with ctx.output(name).open_input() as f:
            back.append(f.read().decode())
    ctx.write_json("summary.json", {"names": names, "read_back": back})


@pytest.mark.parametrize("kind", ["local", "remote"])
def test_files_remote_work_writes_join_the_artifact_hashed_once(
    kind, remote, tmp_path, monkeypatch
):
    from pipelines.engine import Step

    store = remote[0] if kind == "remote" else ArtifactStore(tmp_path / "store")
    hashed = []
    real_sha = store_mod._sha256
    monkeypatch.setattr(store_mod, "_sha256", lambda p: hashed.append(Path(p).name) or real_sha(p))
    steps = [Step("shards", _write_through_refs, kind="infer")]
    run_steps("toy", steps, store=store, executor=LocalExecutor(progress=False), log=lambda _: None)
    # each part (and the scratch file) hashed once, by its writer; the publishing process hashed
    # only its own file
    assert len(hashed) == 5 and hashed[-1] == "summary.json", hashed
    art = store.artifacts()[0]
    marker = store.marker(art)
    assert sorted(marker["files"]) == ["parts/000.txt", "parts/004.txt", "parts/008.txt",
                                       "summary.json"]  # fmt: skip
    assert (art.local_dir() / "parts" / "004.txt").read_text() == "4,5,6,7"
    assert not list(tmp_path.rglob("round.txt"))  # the scratch file: gone from store and staging
    assert read(art, "summary.json")["read_back"] == ["0,1,2,3", "4,5,6,7", "8,9"]
    assert store.verify(art) == []


@pytest.mark.parametrize("kind", ["local", "remote"])
def test_a_step_failing_after_remote_writes_leaves_no_complete_artifact(kind, remote, tmp_path):
    from pipelines.engine import Step, StepFailed

    store = remote[0] if kind == "remote" else ArtifactStore(tmp_path / "store")
    steps = [Step("shards", _write_through_refs, params={"fail": True}, kind="infer")]
    with pytest.raises(StepFailed):
        run_steps("toy", steps, store=store, executor=LocalExecutor(progress=False),
                  log=lambda _: None)  # fmt: skip
    assert store.artifacts() == []
    if kind == "local":  # nothing of the failed attempt is left beside the artifacts either
        assert not [p for p in (tmp_path / "store").rglob("*.txt")]


def test_concurrent_readers_on_one_node_download_an_artifact_once(remote, monkeypatch):
    import concurrent.futures as cf

    store, copies = remote
    art = store.artifact("toy", "model", "k1")
    with store.writer(art) as out:
        for i in range(20):  # enough files that unsynchronised readers would overlap
            (out / f"part-{i}.bin").write_bytes(bytes(range(256)) * 200)
    copies.clear()
    monkeypatch.setattr(store_mod, "DOWNLOADS", [])
    with cf.ThreadPoolExecutor(6) as pool:
        dirs = list(pool.map(lambda _: art.local_dir(), range(12)))
    assert len(set(dirs)) == 1 and store_mod.DOWNLOADS == [art.relpath]
    assert len([c for c in copies if not c.endswith("_COMPLETE.json")]) == 1  # one copy_files
    assert (dirs[0] / "part-7.bin").read_bytes() == bytes(range(256)) * 200
    assert [p.name for p in dirs[0].parent.iterdir()] == [dirs[0].name]  # no lock left behind


def test_paths_join_a_store_uri_before_its_query_string():
    """An S3-compatible server's store URI carries its endpoint as a query; `_work/<pipeline>`
    appended after it made Ray Train read "http/_work/rcnn" as the S3 scheme."""
    from data.store import join_uri

    uri = "s3://bucket/store?endpoint_override=127.0.0.1:9000&scheme=http"
    assert join_uri(uri, "_work", "rcnn") == (
        "s3://bucket/store/_work/rcnn?endpoint_override=127.0.0.1:9000&scheme=http"
    )
    assert join_uri("/data/store/", "rcnn/svm/k") == "/data/store/rcnn/svm/k"
    assert Artifact("s3://bucket/store?region=x", "p/s/k").uri == "s3://bucket/store/p/s/k?region=x"


def test_parquet_rows_reads_the_footer_without_copying_the_artifact(tmp_path):
    """The features step sizes its actors from the proposals' row count: read from the store,
    never a download of the artifact to the driver."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.store import DOWNLOADS, ArtifactStore

    store = ArtifactStore(tmp_path / "store")
    art = store.artifact("p", "proposals", "k1")
    with store.writer(art, {}) as out:
        pq.write_table(pa.table({"image_id": ["a"] * 7 + ["b"] * 5}), out / "proposals.parquet")
    before = len(DOWNLOADS)
    assert art.parquet_rows("proposals.parquet") == 12
    assert len(DOWNLOADS) == before
