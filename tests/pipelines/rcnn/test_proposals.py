"""The R-CNN slice dataset → proposals → proposal_report, in-process and on Ray."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from pipelines import runner


def run_ci(tmp_path, tag: str, executor: str, **overrides):
    return runner.run(
        "rcnn",
        "ci",
        overrides,
        store=str(tmp_path / f"store-{tag}"),
        runs=tmp_path / f"runs-{tag}",
        executor=executor,
        until="proposal_report",
        progress=False,
        log=lambda _: None,
    )


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rcnn")
    return tmp, run_ci(tmp, "local", "local")


def test_ci_preset_outputs(local_run):
    tmp, result = local_run
    assert result.computed() == ["dataset", "proposals", "proposal_report"]
    m = result.metrics
    # selective search finds nearly every generated object at IoU 0.5 (measured: 1.0 on ci)
    assert m["proposal_recall_iou0.5"] >= 0.85
    assert m["proposal_recall_iou0.7"] >= 0.6
    assert m["proposal_mabo"] > 0.75
    assert 100 < m["proposals_per_image"] <= 150  # the ci preset keeps the best 150
    run_dir = result.run_dir
    assert json.loads((run_dir / "metrics.json").read_text()) == m
    report = (result.artifacts["proposal_report"].local_dir() / "report.md").read_text()
    assert "| all |" in report and "recall @ IoU 0.7" in report
    assert (run_dir / "proposal_recall.png").stat().st_size > 5000
    config = json.loads((run_dir / "config.json").read_text())
    assert config["preset"] == "ci" and config["config"]["proposals"]["mode"] == "rcnn"

    props = pq.read_table(result.artifacts["proposals"].local_dir() / "proposals.parquet")
    assert props.column_names == ["image_id", "rank", "x1", "y1", "x2", "y2"]
    widths = props.column("x2").to_numpy() - props.column("x1").to_numpy() + 1
    assert widths.min() >= 20  # R-CNN drops boxes narrower than 20 px
    images = pq.read_table(result.artifacts["dataset"].local_dir() / "images.parquet")
    assert set(props.column("image_id").to_pylist()) == set(images.column("image_id").to_pylist())
    assert images.num_rows == 24  # 16 trainval + 8 test


def test_rerun_is_fully_cached_and_one_knob_recomputes_its_dependents(local_run):
    tmp, first = local_run
    again = run_ci(tmp, "local", "local")
    assert again.cached() == ["dataset", "proposals", "proposal_report"]
    assert again.metrics == first.metrics
    changed = run_ci(tmp, "local", "local", **{"proposals.max_per_image": "50"})
    assert changed.cached() == ["dataset"]
    assert changed.computed() == ["proposals", "proposal_report"]
    assert changed.metrics["proposals_per_image"] <= 50
    report_only = run_ci(tmp, "local", "local", **{"report.recall_top_ns": "1,10"})
    assert report_only.computed() == ["proposal_report"]


@pytest.mark.ray
def test_ray_executor_gives_identical_artifacts(local_run, ray_session, tmp_path):
    _, local = local_run
    remote = run_ci(tmp_path, "ray", "ray")
    assert {k: a.key for k, a in remote.artifacts.items()} == {
        k: a.key for k, a in local.artifacts.items()
    }
    for step, name in [
        ("dataset", "objects.parquet"),
        ("dataset", "images.parquet"),
        ("proposals", "proposals.parquet"),
    ]:
        a = pq.read_table(local.artifacts[step].local_dir() / name)
        b = pq.read_table(remote.artifacts[step].local_dir() / name)
        if name == "images.parquet":  # absolute paths differ between stores; ids/sizes don't
            a, b = a.drop_columns(["path"]), b.drop_columns(["path"])
        assert a.equals(b), f"{step}/{name} differs between executors"
    same = {k: v for k, v in local.metrics.items() if "seconds" not in k}
    assert same == {k: v for k, v in remote.metrics.items() if "seconds" not in k}


def test_precomputed_proposals_give_the_same_recall(local_run, tmp_path):
    """The loader path for published boxes (e.g. VOC2007's selective-search .mat files)."""
    _, result = local_run
    published = tmp_path / "published.parquet"
    table = pq.read_table(result.artifacts["proposals"].local_dir() / "proposals.parquet")
    pq.write_table(table, published)
    again = runner.run(
        "rcnn",
        "ci",
        {"proposals.method": "precomputed", "proposals.precomputed_path": str(published)},
        store=str(tmp_path / "store"),
        runs=tmp_path / "runs",
        executor="local",
        until="proposal_report",
        progress=False,
        log=lambda _: None,
    )
    for key in ("proposal_recall_iou0.5", "proposal_recall_iou0.7", "proposals_per_image"):
        assert again.metrics[key] == result.metrics[key]
    assert (again.run_dir / "proposal_report.md").exists()


def test_selective_search_tasks_request_memory_for_their_largest_image(local_run, tmp_path):
    """Each selective-search task asks Ray for its worker, the helper process and 256 B per pixel
    of the largest image searched (resized where proposals.resize_width_px says)."""
    from types import SimpleNamespace

    import numpy as np

    from cluster.resources import Resources
    from pipelines.engine import StepContext
    from pipelines.rcnn.common import proposals_task_bytes, search_pixels
    from pipelines.rcnn.data import extract_proposals

    assert search_pixels(500, 375) == 187_500
    assert search_pixels(500, 375, 250) == 250 * 188  # 375 × 0.5 = 187.5, rounded half up
    assert search_pixels(500, 375, 500) == 187_500
    assert proposals_task_bytes(187_500) == (256 << 20) + 48_000_000
    _, result = local_run
    art = result.artifacts["dataset"]
    rows = pq.read_table(art.local_dir() / "images.parquet").to_pylist()
    seen = []

    def fake_map(fn, items, resources, desc):  # what the search would return: no boxes
        seen.append(resources)
        return [[(r["image_id"], np.zeros((0, 4), np.float32), 0.0) for r in s] for s in items]

    kw = dict(method="selective_search", mode="rcnn", base_k=50, inc_k=50, sigma=0.8,
              min_width_px=20, max_per_image=0, precomputed_path="", images_per_task=2)  # fmt: skip
    for resize in (0, 100):
        ctx = StepContext(pipeline="rcnn", step="proposals", key="k", inputs={"dataset": art},
                          out_dir=tmp_path, resources=Resources(cpus=1), work_uri=str(tmp_path),
                          executor=SimpleNamespace(map=fake_map))  # fmt: skip
        extract_proposals(ctx, resize_width_px=resize, **kw)
        largest = max(search_pixels(r["width"], r["height"], resize) for r in rows)
        want = -(-((1 << 30) + (256 << 20) + 256 * largest) // (1 << 20))
        assert seen[-1] == Resources(cpus=1, memory_mb=want)
    small, native = seen[-1].memory_mb, seen[0].memory_mb
    assert 1280 <= small < native  # 1 GiB worker + 256 MiB helper, plus the pixels
