"""Issue 18: the same pipeline on a cluster whose nodes share nothing but an object store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.ray
@pytest.mark.cluster
@pytest.mark.timeout(1800)  # ≈ 6 min on an idle 2-core machine: two pipelines, twice
def test_three_nodes_with_only_an_s3_store_in_common(tmp_path):
    """Head + 2 worker nodes, each with its own cache directory, the store on an S3 server on
    loopback: `rcnn ci` end to end (Train, map tasks, the features step's Ray Data actors) and
    BatchNorm's Tune sweep and 2-worker Train steps. Every artifact equals an in-process run's;
    every reference was resolved inside the resolving node's own cache; no node downloaded an
    artifact twice. (`multinode_scenarios.py` has the scenario.)"""
    pytest.importorskip("moto.server", reason="needs moto[server] (pip install -e '.[dev]')")
    env = {**os.environ, "PAPERLINE_DASHBOARD": "0", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(
        [sys.executable, "-m", "tests.cluster.multinode_scenarios", "no_shared_fs", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    s = json.loads(out.stdout.strip().splitlines()[-1])
    steps = {a.rsplit("/", 1)[0] for a in s["artifacts"]}
    assert {"rcnn/features", "rcnn/svm", "rcnn/finetune", "rcnn/evaluate", "batchnorm/mnist",
            "batchnorm/multi_worker"} <= steps  # fmt: skip
    # the same keys as the single-node run: same code, same config
    assert s["same_artifacts"], s["only_on_one_side"]
    # Same key, same bytes — except what a run measures of its own wall clock (seconds per
    # proposal image, training seconds) and the reports quoting it, and BatchNorm's 2-worker
    # step, which the in-process executor runs with one worker (README, Reproducibility)
    unexplained = [
        d
        for d in s["differing_files"]
        if d not in s["timing_only"]
        and not d.endswith(".md")
        and not d.startswith(("batchnorm/multi_worker/", "batchnorm/report/"))
    ]
    assert unexplained == []
    exact = ("pretrain", "finetune", "features", "svm", "bbox_regression", "detect", "evaluate")
    assert not [d for d in s["differing_files"] if d.split("/")[1] in exact]
    assert s["metrics"]["rcnn"]["mAP_voc07"] > 0.3
    # references resolved on the node that used them, in that node's own cache
    assert s["outside_own_cache"] == [] and s["wrong_cache_dir"] == []
    caches = {k.split(" ")[0].rsplit("-", 1)[-1] for k in s["downloads"]}
    assert {"a", "b"} <= caches  # work ran on both worker nodes
    assert max(s["downloads"].values()) == 1, s["downloads"]  # once per node and artifact
    assert s["processes"] >= 6  # driver, tasks, Ray Data actors, trials, Train workers
