"""`paperline plan`: the feature cache it predicts is the one the run writes; VOC2007's size from
the writer; the index is all it reads; every pipeline gets a plan (issue 19)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import runner
from pipelines.cli import main
from pipelines.plan import plan

REPO = Path(__file__).resolve().parents[2]
SHORT = {"pretrain.epochs": "1", "finetune.iterations": "5"}  # sizes do not depend on training


def _by_step(rows: list[dict]) -> dict[str, dict]:
    return {r["step"]: r for r in rows}


def test_plan_predicts_the_feature_cache_the_ci_run_writes(tmp_path):
    predicted = _by_step(plan("rcnn", "ci", SHORT))["features"]
    result = runner.run(
        "rcnn", "ci", SHORT, store=str(tmp_path / "store"), runs=tmp_path / "runs",
        executor="local", until="features", progress=False, log=lambda _: None,
    )  # fmt: skip
    art = result.artifacts["features"].local_dir()
    written = sum(f.stat().st_size for f in art.rglob("*") if f.is_file())
    assert abs(predicted["bytes_written"] / written - 1) < 0.10, (predicted, written)
    rows = result.metrics["feature_rows"]
    assert abs(predicted["rows"] / rows - 1) < 0.10, (predicted["rows"], rows)
    shards = len(list((art / "pool5").glob("*.parquet")))
    assert predicted["tasks"] == shards == 6  # 16 + 8 images, 4 per shard
    # fine-tuning writes its weights and the candidate windows its workers read
    tuned = _by_step(plan("rcnn", "ci", SHORT))["finetune"]
    ft = result.artifacts["finetune"].local_dir()
    written = sum(f.stat().st_size for f in ft.rglob("*") if f.is_file() and f.suffix != ".json")
    assert abs(tuned["bytes_written"] / written - 1) < 0.10, (tuned, written)


def test_voc2007_cache_matches_the_writers_bytes_per_row():
    """pool5 is 9216 float32 = 36 864 B per row; the other columns add ~40 B. 5011 + 4952 images
    with ≈2000 proposals and 2.5 objects each: 19.95 M rows ≈ 736 GB (the 200 GB the config once
    said was 3.7x off); with fc7 (16 384 B per row) ≈ 1.06 TB."""
    rows = (5011 + 4952) * 2002.5
    pool5 = _by_step(plan("rcnn", "voc2007"))["features"]
    assert pool5["rows"] == pytest.approx(rows, rel=1e-3)
    assert pool5["bytes_written"] == pytest.approx(rows * 36_864, rel=0.01)
    both = _by_step(plan("rcnn", "voc2007", {"features.cache": "layers"}))["features"]
    assert both["by_layer"]["fc7"] == pytest.approx(rows * 16_384, rel=0.01)
    assert 1.0e12 < both["bytes_written"] < 1.1e12
    assert pool5["tasks"] == 627 + 619  # 8 images per shard, per split


def test_plan_reads_only_the_split_files_and_never_starts_ray(tmp_path):
    main_dir = tmp_path / "voc" / "ImageSets" / "Main"  # no Annotations/ nor JPEGImages/
    main_dir.mkdir(parents=True)
    (main_dir / "trainval.txt").write_text("".join(f"{i:06d}\n" for i in range(10)))
    (main_dir / "test.txt").write_text("".join(f"{i:06d}\n" for i in range(10, 15)))
    for c in ("mug", "kettle", "cup"):
        (main_dir / f"{c}_trainval.txt").write_text("000000  1\n")
    code = (
        "import sys, json; from pipelines.plan import plan; "
        f"r = plan('rcnn', None, {{'data.source': 'voc', 'data.root': '{tmp_path / 'voc'}'}}); "
        "print(json.dumps([r[0], [x for x in r if x['step'] == 'features'][0], "
        "'ray' in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    dataset, features, ray_loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert not ray_loaded
    assert dataset["rows"] == 15 and "3 classes" in dataset["note"]
    assert features["step"] == "features" and features["tasks"] == 2 + 1
    # 300 proposals (the small preset's cap) + 2.5 objects per image
    assert features["rows"] == round(15 * 302.5)


def test_every_pipeline_has_a_json_plan(capsys):
    for name in ("rcnn", "batchnorm", "mobilenet", "generalization", "ssl"):
        assert main(["plan", name, "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert rows and all({"step", "bytes_written", "tasks"} <= set(r) for r in rows)
        assert all(r["tasks"] == 1 for r in rows if r["kind"] == "task")


def test_plan_without_the_data_names_what_it_needs(capsys):
    code = main(["plan", "rcnn", "--set", "data.source=voc", "--set", "data.root=/no/such/set"])
    assert code == 2
    err = capsys.readouterr().err
    assert "/no/such/set" in err and "ImageSets/Main" in err


def test_feature_read_log_counts_each_read_only_when_asked(tmp_path, monkeypatch):
    """The counter benchmarks/bench_scale.py reads: one line per shard read, the Arrow bytes of
    the columns read (a 10 x 256 float32 feature column is 10 240 B of them); off by default."""
    import numpy as np

    from stages.detection import features as F

    path = tmp_path / "s.parquet"
    n = 10
    F.write_feature_shard(
        path, image_ids=["a"] * n, box_index=np.arange(n), is_gt=np.zeros(n, bool),
        boxes=np.ones((n, 4)), gt_class=-np.ones(n, int), max_iou=np.zeros((n, 2)),
        features=np.ones((n, 256), np.float32),
    )  # fmt: skip
    log = tmp_path / "reads.log"
    monkeypatch.delenv(F.READ_LOG_ENV, raising=False)
    F.read_feature_shard(path)
    assert not log.exists()
    monkeypatch.setenv(F.READ_LOG_ENV, str(log))
    F.read_feature_shard(path, ["features"])
    F.read_feature_shard(path, ["features", "max_iou"])
    lines = [line.split("\t") for line in log.read_text().splitlines()]
    assert [p for p, _ in lines] == [str(path)] * 2
    assert int(lines[0][1]) == n * 256 * 4
    assert int(lines[1][1]) == n * 256 * 4 + n * 2 * 4  # + the (N, 2) float32 overlaps
