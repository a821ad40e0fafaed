"""`limit_threads`: the pool size a unit of work gets, whether or not its process has torch yet."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from cluster.resources import limit_threads

_FRESH_PROCESS = """
import sys
from cluster.resources import limit_threads
limit_threads(1)
loaded_early = "torch" in sys.modules
import pytest
import torch
first = torch.get_num_threads()
limit_threads(2)
print(loaded_early, first, torch.get_num_threads())
"""


def test_limit_threads_leaves_torch_unloaded_and_its_pool_sized_when_it_loads():
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "1", "2"]


def test_limit_threads_resizes_a_loaded_torch():
    before = torch.get_num_threads()
    try:
        limit_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_limit_threads_pins_numpys_blas_and_the_in_process_block_restores_it():
    from threadpoolctl import threadpool_info, threadpool_limits

    from cluster.resources import pinned_threads

    def blas() -> set[int]:
        return {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}

    before = torch.get_num_threads()
    with threadpool_limits(2, user_api="blas"):
        try:
            with pinned_threads(1):
                assert blas() == {1}
            assert blas() == {2}
            limit_threads(1)
            assert blas() == {1}
        finally:
            torch.set_num_threads(before)


def test_auto_gpus_count_the_gpu_nodes_an_autoscaler_can_start(monkeypatch):
    """Issue 18: with GPU workers at min_workers 0 the cluster has no GPU until a request starts
    one; "auto" must count the autoscaler's GPU node types (as published in the GCS) or it
    never asks, and everything runs on the head's CPUs."""
    import ray
    from ray._private import state
    from ray.core.generated import autoscaler_pb2

    from cluster import ray_executor
    from cluster.resources import Resources

    config = autoscaler_pb2.ClusterConfig()
    head = config.node_group_configs.add(name="head", min_count=1, max_count=1)
    head.resources["CPU"] = 8
    gpu = config.node_group_configs.add(name="gpu_worker", min_count=0, max_count=4)
    gpu.resources.update({"CPU": 4, "GPU": 1})
    monkeypatch.setattr(state.state, "get_cluster_config", lambda: config)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})  # no GPU node yet
    ex = ray_executor.RayExecutor(progress=False)
    assert ray_executor.autoscaler_gpus() == 4.0 and ex.cluster_gpus() == 4.0
    assert Resources(gpus="auto").resolve_gpus(ex.cluster_gpus()) == 1.0
    assert ex._options(Resources(cpus=2, gpus="auto"))["num_gpus"] == 1.0
    gpu.max_count = 0  # a GPU group the autoscaler may not start: nothing to ask for
    assert ex.cluster_gpus() == 0.0 and ex._options(Resources(gpus="auto"))["num_gpus"] == 0.0
    monkeypatch.setattr(state.state, "get_cluster_config", lambda: None)  # no autoscaler
    assert ex.cluster_gpus() == 0.0
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 2.0})
    assert ex.cluster_gpus() == 2.0  # GPUs present now count first


def test_a_memory_request_no_node_can_grant_is_capped_to_the_largest_node(monkeypatch):
    """A step's estimate above every node's memory would leave its tasks pending for ever."""
    import ray
    from ray._private import state

    from cluster import ray_executor
    from cluster.resources import Resources

    nodes = [{"Alive": True, "Resources": {"CPU": 2.0, "memory": 8.0 * 2**30}},
             {"Alive": True, "Resources": {"CPU": 4.0, "memory": 16.0 * 2**30}},
             {"Alive": False, "Resources": {"CPU": 64.0, "memory": 512.0 * 2**30}}]  # fmt: skip
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 6.0})
    monkeypatch.setattr(state.state, "get_cluster_config", lambda: None)
    ex = ray_executor.RayExecutor(progress=False)
    assert ex._options(Resources(memory_mb=4096))["memory"] == 4096 * 2**20  # fits: as asked
    assert ex._options(Resources(memory_mb=40_000))["memory"] == 16 * 2**30  # the largest node
    monkeypatch.setattr(state.state, "get_cluster_config", lambda: object())  # autoscaler
    assert ex._options(Resources(memory_mb=40_000))["memory"] == 40_000 * 2**20


def test_train_workers_and_feature_actors_ask_for_their_steps_estimate(monkeypatch, tmp_path):
    """Issue 19: a Train worker's request carries the step's memory estimate (capped as tasks'
    are), and ``StepContext.train``/``infer`` raise the step's request to the estimate they pass."""
    import ray
    from ray._private import state

    from cluster import ray_executor
    from cluster.resources import Resources
    from pipelines.engine import StepContext

    nodes = [{"Alive": True, "Resources": {"CPU": 2.0, "memory": 8.0 * 2**30}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(state.state, "get_cluster_config", lambda: None)
    worker = ray_executor._worker_resources
    assert worker(Resources(cpus=2), 0) == {"CPU": 2}
    assert worker(Resources(cpus=1, memory_mb=3000), 1.0) == {
        "CPU": 1,
        "GPU": 1.0,
        "memory": 3000 * 2**20,
    }
    assert worker(Resources(cpus=1, memory_mb=20_000), 0)["memory"] == 8 * 2**30

    seen = []

    class Recorder:
        def train(self, fn, config, *, resources_per_worker, **kw):
            seen.append(resources_per_worker)

        def infer(self, source, predictor, kwargs, *, resources, **kw):
            seen.append(resources)

    ctx = StepContext(pipeline="p", step="s", key="k", inputs={}, out_dir=tmp_path,
                      resources=Resources(cpus=2, memory_mb=1000), work_uri=str(tmp_path),
                      executor=Recorder())  # fmt: skip
    ctx.train(print, {}, memory_mb=2500)
    ctx.train(print, {}, memory_mb=500)  # below the step's own request: the step's stands
    ctx.infer(None, object, {}, batch_size=1, memory_mb=1800)
    assert [r.memory_mb for r in seen] == [2500, 1000, 1800]
    assert all(r.cpus == 2 for r in seen)


def test_rcnn_memory_estimates_match_the_plan_formulas():
    """The estimates the R-CNN steps ask for are the ones `paperline plan` prints (plus a
    worker's base): AlexNet fine-tuning on VOC-sized images, by hand."""
    from pipelines.rcnn.common import (
        WORKER_BASE_BYTES,
        features_actor_bytes,
        memory_request_mb,
        meta_param_bytes,
        train_worker_bytes,
    )

    params = meta_param_bytes("rcnn_alexnet", {}, 21)
    # conv1-5 2,469,696 + fc6 37,752,832 + fc7 16,781,312 + the 21-way head 86,037, float32
    assert params == 4 * 57_089_877
    batch = 128 * 3 * 227 * 227 * 4
    decoded = 5011 * 500 * 375 * 3
    assert train_worker_bytes(params, batch, decoded) == 4 * params + 2 * batch + decoded
    assert features_actor_bytes(params, 10 << 20) == params + (20 << 20)
    crops = 256 * 3 * 227 * 227 * 4  # a GPU's chunk: the warped crops and first activations
    assert features_actor_bytes(params, 10 << 20, crops) == params + (20 << 20) + 3 * crops
    assert memory_request_mb(0) == WORKER_BASE_BYTES >> 20
    assert memory_request_mb(1) == (WORKER_BASE_BYTES >> 20) + 1  # rounded up


def test_feature_actors_are_sized_from_arch_json_and_the_proposal_count():
    """The features step sizes its actors from two small reads of its inputs (the net's
    arch.json, the proposals' Parquet footer): by hand for AlexNet's pool5 + fc7 cache."""
    import json
    from types import SimpleNamespace

    from pipelines.rcnn.common import WORKER_BASE_BYTES, meta_param_bytes
    from pipelines.rcnn.features import _actor_memory_mb

    arch = {"model": "rcnn_alexnet", "model_kwargs": {}, "num_outputs": 21}
    finetune = SimpleNamespace(read_bytes=lambda name: json.dumps(arch).encode())
    proposals = SimpleNamespace(parquet_rows=lambda name: 2000 * 100)  # 2,000 per image
    ctx = SimpleNamespace(inputs={"finetune": finetune, "proposals": proposals})
    mb = _actor_memory_mb(ctx, ("fc7", "pool5"), images_per_shard=8, chunk=0, images=100)
    per_image = 1.5 * 2000 + 64
    shard = round(8 * per_image * (4096 + 9216) * 4)
    crops = 256 * 3 * 227 * 227 * 4
    expected = meta_param_bytes("rcnn_alexnet", {}, 21) + 2 * shard + 3 * crops
    assert mb == -(-(WORKER_BASE_BYTES + expected) // (1 << 20))
    none = SimpleNamespace(read_bytes=lambda name: None)  # a model saved before arch.json
    old = SimpleNamespace(inputs={"finetune": none, "proposals": proposals})
    assert _actor_memory_mb(old, ("fc7",), 8, 0, 100) == 0  # the step's own request stands


def test_tune_trials_and_train_capacity_count_the_steps_memory_estimate(monkeypatch, tmp_path):
    """A trial's request carries the step's estimate (capped to the largest node), and the runs
    that fit at once are bounded by memory as well as by CPUs."""
    import ray
    from ray._private import state

    from cluster import ray_executor
    from cluster.resources import Resources
    from pipelines.engine import StepContext

    nodes = [{"Alive": True, "Resources": {"CPU": 8.0, "memory": 10.0 * 2**30}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "memory": 10.0 * 2**30})
    monkeypatch.setattr(state.state, "get_cluster_config", lambda: None)
    trial = ray_executor._trial_resources
    assert trial(Resources(cpus=2), 0) == {"cpu": 2, "gpu": 0}
    assert trial(Resources(cpus=1, memory_mb=3000), 0.5) == {
        "cpu": 1, "gpu": 0.5, "memory": 3000 * 2**20,
    }  # fmt: skip
    assert trial(Resources(cpus=1, memory_mb=50_000), 0)["memory"] == 10 * 2**30
    ex = ray_executor.RayExecutor(progress=False)
    assert ex.train_capacity(1, Resources(cpus=1)) == 8  # CPUs alone
    assert ex.train_capacity(1, Resources(cpus=1, memory_mb=3 * 1024)) == 3  # 10 GiB / 3 GiB
    assert ex.train_capacity(2, Resources(cpus=1, memory_mb=3 * 1024)) == 1
    assert ex.train_capacity(1, Resources(cpus=1, memory_mb=50_000)) == 1  # capped: one fits

    seen = []

    class Recorder:
        def sweep(self, fn, space, *, resources_per_trial, **kw):
            seen.append(resources_per_trial)

        def train_capacity(self, num_workers, resources):
            seen.append(resources)

    ctx = StepContext(pipeline="p", step="s", key="k", inputs={}, out_dir=tmp_path,
                      resources=Resources(cpus=1, memory_mb=1000), work_uri=str(tmp_path),
                      executor=Recorder())  # fmt: skip
    ctx.sweep(print, {}, metric="m", mode="max", memory_mb=2500)
    ctx.sweep(print, {}, metric="m", mode="max")  # no estimate: the step's own request
    ctx.train_capacity(2, memory_mb=4000)
    assert [r.memory_mb for r in seen] == [2500, 1000, 4000]


def test_artifact_bytes_come_from_the_marker_without_a_copy(tmp_path):
    from data.store import ArtifactStore

    store = ArtifactStore(tmp_path / "store")
    art = store.artifact("p", "s", "k1")
    with store.writer(art) as out:
        (out / "data.npz").write_bytes(b"x" * 1000)
        (out / "parts").mkdir()
        (out / "parts" / "a.bin").write_bytes(b"y" * 300)
        (out / "parts" / "b.bin").write_bytes(b"z" * 20)
    files = store.marker(art)["files"]
    assert art.file_bytes() == sum(m["size"] for m in files.values()) >= 1320
    assert art.file_bytes("data.npz") == 1000
    assert art.file_bytes("parts") == art.file_bytes("parts/") == 320
    assert art.file_bytes("part") == 0  # a prefix of a name is not a folder
    missing = store.artifact("p", "s", "nope")
    with pytest.raises(FileNotFoundError, match="nope: no completion marker"):
        missing.file_bytes()
