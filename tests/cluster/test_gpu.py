"""Every step kind on a CUDA device: resources requested, tensors on the device, same numbers as
on the CPU. Skipped without a GPU (see benchmarks/gpu_check.sh)."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from cluster.resources import Resources
from cluster.space import Grid
from stages.models.registry import create
from stages.training.context import LocalTrainContext
from tests.cluster.workloads import linear_regression_train

pytestmark = pytest.mark.gpu


def _device_report(_: int) -> dict:
    import ray

    return {
        "cuda": torch.cuda.is_available(),
        "gpu_ids": ray.get_gpu_ids(),
        "device": str(torch.zeros(1, device="cuda").device),
    }


class CudaPredictor:
    def __init__(self):
        self.model = create("rcnn_small", input_size=64).eval().cuda()

    def __call__(self, batch: pa.Table) -> pa.Table:
        x = torch.tensor(batch.column("x").to_pylist(), dtype=torch.float32).view(-1, 3, 64, 64)
        with torch.inference_mode():
            y = self.model(x.cuda())
        return pa.table({"device": [str(y.device)] * len(y), "sum": y.sum(1).cpu().tolist()})


def test_cnn_features_on_cuda_match_cpu_and_bf16_is_close():
    torch.manual_seed(0)
    model = create("rcnn_small", input_size=64).eval()
    x = torch.randn(16, 3, 64, 64)
    with torch.inference_mode():
        cpu = model.features_all(x)
        gpu = model.cuda().features_all(x.cuda())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = model.features_all(x.cuda().contiguous(memory_format=torch.channels_last))
    for layer in cpu:
        torch.testing.assert_close(gpu[layer].cpu(), cpu[layer], rtol=1e-3, atol=1e-3)
        rel = (half[layer].float().cpu() - cpu[layer]).norm() / cpu[layer].norm()
        assert rel < 0.05, (layer, float(rel))


def test_features_step_code_on_cuda_in_bf16_matches_cpu_float32():
    """features.amp=bf16 on a GPU: the step's own path (warp on the CPU, CNN on the device)."""
    import numpy as np

    from pipelines.rcnn.features import default_chunk, image_features

    torch.manual_seed(0)
    model = create("rcnn_small", input_size=64).eval().fused_for_inference()
    image = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    boxes = np.array([[1, 1, 80, 60], [20, 30, 160, 120], [50, 10, 90, 100]] * 30, np.float32)
    kw = dict(layers=("pool5", "fc7"), padding=16, mode="warp")
    cpu = image_features(model, image, boxes, chunk=16, device=torch.device("cpu"), **kw)
    cuda = torch.device("cuda")
    gpu = image_features(
        model.cuda(), image, boxes, chunk=default_chunk(cuda, "bf16"), device=cuda, amp="bf16", **kw
    )
    for layer in kw["layers"]:
        assert gpu[layer].dtype == np.float32 and gpu[layer].shape == cpu[layer].shape
        rel = np.linalg.norm(gpu[layer] - cpu[layer]) / np.linalg.norm(cpu[layer])
        assert rel < 0.05, (layer, float(rel))


def test_influence_hypergradient_on_cuda_matches_cpu():
    """The learned-λ outer step on a GPU worker: every term on the device (the labelled term's
    weights were once made on the CPU and failed in torch.cat)."""
    from stages.ssl.influence import weight_hypergradients

    g = torch.Generator().manual_seed(0)
    fs, fu, fv = (torch.randn(n, 5, generator=g) for n in (6, 8, 7))
    w = torch.randn(5, 3, generator=g)
    kw = dict(
        labeled_features=fs, labeled_probs=torch.softmax(fs @ w, 1),
        unlabeled_features=fu, unlabeled_probs=torch.softmax(fu @ w, 1),
        pseudo_targets=torch.randint(0, 3, (8,), generator=g), mask=torch.ones(8),
        weights=torch.ones(8), val_features=fv, val_probs=torch.softmax(fv @ w, 1),
        val_targets=torch.randint(0, 3, (7,), generator=g), l2=5e-4,
    )  # fmt: skip
    cpu = weight_hypergradients(**kw)
    gpu = weight_hypergradients(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in kw.items()})
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu().double(), cpu.double(), rtol=1e-6, atol=1e-9)


def test_training_loop_on_cuda():
    ctx = LocalTrainContext(device="cuda")
    linear_regression_train(ctx, {"lr": 0.5, "epochs": 3})
    assert ctx.last_checkpoint["model"]["weight"].device.type == "cuda"
    assert abs(ctx.last_checkpoint["model"]["weight"].item() - 3) < 0.05


@pytest.mark.ray
def test_ray_task_map_infer_train_and_sweep_get_the_gpu(ray_executor, tmp_path):
    gpu = Resources(cpus=1, gpus="auto")
    assert gpu.resolve_gpus(ray_executor.cluster_gpus()) == 1
    out = ray_executor.run_task(_device_report, 0, resources=gpu)
    assert out["cuda"] and out["gpu_ids"] and out["device"] == "cuda:0"
    assert all(r["gpu_ids"] for r in ray_executor.map(_device_report, [0, 1], resources=gpu))

    x = torch.randn(8, 3 * 64 * 64).tolist()
    table = ray_executor.infer(pa.table({"x": x}), CudaPredictor, {}, batch_size=4, resources=gpu)
    assert table.num_rows == 8 and set(table.column("device").to_pylist()) == {"cuda:0"}

    result = ray_executor.train(
        linear_regression_train,
        {"lr": 0.5, "epochs": 2},
        num_workers=1,
        resources_per_worker=gpu,
        storage_path=str(tmp_path / "train"),
        name="gpu",
    )
    assert result.metrics["epoch"] == 1

    rows = ray_executor.sweep(
        _gpu_trial,
        {"k": Grid((1, 2))},
        metric="ok",
        mode="max",
        resources_per_trial=gpu,
        storage_path=str(tmp_path / "tune"),
        name="gpu",
    )
    assert sorted(r["metrics"]["ok"] for r in rows) == [1.0, 1.0]


def _gpu_trial(config: dict, report) -> None:
    report({"ok": float(torch.cuda.is_available() and torch.ones(1, device="cuda").item() == 1)})
