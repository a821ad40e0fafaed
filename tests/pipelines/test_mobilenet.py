"""The MobileNetV2 pipeline: output contract of the ci preset in-process and through Ray (Train +
Tune), config checks, and the generic classification loop it trains with."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from data.synthetic_cifar import generate_cifar10
from pipelines import mobilenet, runner
from pipelines.config import ConfigError
from pipelines.mobilenet_report import SWEEP_SCHEMA
from pipelines.registry import get
from stages.models.complexity import count_madds
from stages.models.registry import create
from stages.training.classify import (
    learning_rate,
    random_crop_flip,
    resolve_config,
    train_classifier,
)
from stages.training.context import LocalTrainContext


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mobilenet-ci")
    kw = dict(store=str(tmp / "store"), runs=tmp / "runs", progress=False, log=lambda _: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as Ray pins each 1-CPU trial / Train worker: comparable numbers
    try:
        yield kw, runner.run("mobilenet", "ci", executor="local", **kw)
    finally:
        torch.set_num_threads(threads)


def _check_outputs(result) -> None:
    run_dir, m = result.run_dir, result.metrics
    comp = pq.read_table(run_dir / "complexity.parquet").to_pylist()
    assert {"width", "resolution", "params", "madds", "latency_ms"} <= set(comp[0])
    assert len(comp) == 3 * 2 + 1  # ci grid: 3 widths × 2 resolutions, + MobileNetV1 1.0/224
    by = {(r["model"], r["width"], r["resolution"]): r for r in comp}
    v2 = by[("mobilenetv2", 1.0, 224)]
    assert v2["madds"] == 300_774_272 and v2["params"] == 3_504_872  # Table 4: 300M, 3.4M
    assert v2["params_no_bn"] == 3_470_760 and v2["num_classes"] == 1000
    assert abs(by[("mobilenetv2", 1.4, 224)]["madds"] / 585e6 - 1) < 0.01  # Table 4: 585M
    timed = {k for k, r in by.items() if r["latency_ms"] is not None}
    assert timed == {("mobilenetv2", 1.0, 224), ("mobilenetv1", 1.0, 224)}  # ci: one config
    assert all(by[k]["latency_ms"] > 0 for k in timed)

    sweep = pq.read_table(run_dir / "sweep.parquet")
    assert sweep.schema.equals(SWEEP_SCHEMA)
    rows = sweep.to_pylist()
    assert sorted((r["experiment"], r["variant"], r["width"]) for r in rows) == sorted(
        [("width_sweep", "mobilenetv2", 0.35), ("width_sweep", "mobilenetv2", 1.0)]
        + [("ablations", v, 0.35) for v in mobilenet.ABLATION_VARIANTS]
    )
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["epochs"] == 1 and r["resolution"] == 16
    small = create("mobilenetv2", num_classes=10, width_mult=0.35, stem_stride=1)
    assert rows[0]["madds"] == count_madds(small, 16)  # the trained model's own cost

    assert m["complexity"]["mobilenetv2_1.0@224"]["madds"] == 300_774_272
    assert abs(m["complexity"]["mobilenetv2_1.0@224"]["madds_rel_err"]) < 0.01
    assert 0.0 <= m["reference_accuracy"] <= 1.0
    assert set(m["ablation_accuracy"]) == set(mobilenet.ABLATION_VARIANTS)
    assert m["ablation_shortcut_order"][0] in mobilenet.ABLATION_VARIANTS
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["ablation_accuracy"] == m["ablation_accuracy"]
    report = (run_dir / "report.md").read_text()
    assert "| mobilenetv2 | 1.0 | 224 | 3.50M | 3.47M | 301M |" in report and "| 300M |" in report
    assert "Not the paper's setting" in report and "## Ablations (Figure 6 shape)" in report
    for figure in ("figure5_accuracy_vs_madds.png", "figure6_ablations.png"):
        assert (run_dir / figure).stat().st_size > 5000


def test_ci_output_contract(ci_run):
    kw, result = ci_run
    assert result.computed() == [
        "dataset", "complexity", "train", "width_sweep", "ablations", "report",
    ]  # fmt: skip
    _check_outputs(result)
    # a changed seed list recomputes the width sweep and the report only
    again = runner.run("mobilenet", "ci", {"sweep.seeds": "0,1"}, executor="local", **kw)
    assert again.computed() == ["width_sweep", "report"]
    rows = pq.read_table(again.run_dir / "sweep.parquet").to_pylist()
    assert sorted(r["seed"] for r in rows if r["experiment"] == "width_sweep") == [0, 0, 1, 1]


@pytest.mark.ray
def test_ci_through_ray(ci_run, ray_session):
    """Ray Train for the reference model and a Tune sweep, on the in-process run's store: the
    dataset, the complexity table and the ablations stay cached; `width_sweep` is forced (the same
    config as in process) and `train` gets a new key by checkpointing (same training, plus Ray
    Train's checkpoint path); the report runs as a Ray task. Both must equal the in-process run."""
    kw, local = ci_run
    result = runner.run(
        "mobilenet", "ci", {"train.checkpoint": "True"}, executor="ray", force="width_sweep", **kw
    )
    assert result.cached() == ["dataset", "complexity", "ablations"]
    assert result.computed() == ["train", "width_sweep", "report"]
    kinds = {m["step"]: m["kind"] for m in result.manifest}
    assert kinds["train"] == "train" and kinds["width_sweep"] == "sweep"
    _check_outputs(result)

    def read(run, step: str, name: str):
        return json.loads((run.artifacts[step].local_dir() / name).read_text())

    history = read(result, "train", "history.json")
    assert len(history) == 1 and math.isfinite(history[0]["train_loss"])
    if not torch.cuda.is_available():  # with CUDA the two runs need not share a device
        # one thread per worker / trial in both runs: the same losses to the last bit
        assert history == read(local, "train", "history.json")
        trials = read(result, "width_sweep", "trials.json")
        assert trials == read(local, "width_sweep", "trials.json")


def test_config_points_and_checks():
    paper = get("mobilenet").build_config("paper")
    points = mobilenet.width_points(paper.sweep)
    assert len(points) == 4 * 5 + 1 + 1  # Fig. 5 grid, 1.4 at 224, MobileNetV1 at 224
    assert "mobilenetv2:1.4@224" in points and "mobilenetv1:1.0@224" in points
    assert mobilenet.parse_point("relu6_bottleneck:0.35@32") == ("relu6_bottleneck", 0.35, 32)
    assert paper.optim.optimizer == "rmsprop" and paper.optim.lr == 0.045  # §6.1
    assert paper.model.stem_stride == 2 and get("mobilenet").build_config().model.stem_stride == 1
    with pytest.raises(ConfigError, match="ablations.variants"):
        get("mobilenet").build_config("ci", {"ablations.variants": "mobilenetv2,sideways"})
    with pytest.raises(ConfigError, match="sweep.scheduler"):
        get("mobilenet").build_config("ci", {"sweep.scheduler": "hyperband"})
    with pytest.raises(ConfigError, match="model.stem_stride"):
        get("mobilenet").build_config("ci", {"model.stem_stride": "4"})


def test_random_crop_flip_matches_a_per_image_loop():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    out = random_crop_flip(x, 2, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # redraw the same offsets and flips
    oy, ox = torch.randint(0, 5, (2,), generator=g), torch.randint(0, 5, (2,), generator=g)
    flip = torch.rand(2, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):
        crop = padded[b, :, oy[b] : oy[b] + 5, ox[b] : ox[b] + 5]
        assert torch.equal(out[b], crop.flip(-1) if flip[b] else crop)


def test_learning_rate_schedules():
    cfg = resolve_config({"dataset_root": "x", "model": "m", "lr": 0.1, "epochs": 4})
    assert learning_rate(cfg, 0, 0, 10) == pytest.approx(0.1)
    assert learning_rate(cfg, 2, 0, 10) == pytest.approx(0.05)  # cosine: half-way
    assert learning_rate(cfg, 3, 9, 10) < 0.002
    exp = {**cfg, "schedule": "exponential", "lr": 0.045}  # §6.1: × 0.98 per epoch
    assert learning_rate(exp, 10, 5, 10) == pytest.approx(0.045 * 0.98**10)
    warm = {**cfg, "warmup_epochs": 1.0}
    assert learning_rate(warm, 0, 4, 10) == pytest.approx(0.05)
    with pytest.raises(KeyError, match="unknown training config keys"):
        resolve_config({"dataset_root": "x", "model": "m", "lr_typo": 1})


def test_classifier_learns_and_resumes(tmp_path):
    root = generate_cifar10(tmp_path / "cifar", n_train=400, n_test=200, seed=0)
    cfg = {
        "dataset_root": str(root),
        "model": "mobilenetv2",
        "model_kwargs": {"width_mult": 0.35, "stem_stride": 1},
        "resolution": 16,
        "lr": 0.05,
        "batch_size": 16,
        "epochs": 5,
        "checkpoint": True,
    }
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first = LocalTrainContext(checkpoint_dir=tmp_path / "ckpt")
        train_classifier(first, {**cfg, "epochs": 5})
        resumed = LocalTrainContext(checkpoint_dir=tmp_path / "ckpt")
        train_classifier(resumed, {**cfg, "epochs": 6})
    finally:
        torch.set_num_threads(before)
    accs = [h["accuracy"] for h in first.history]
    assert [h["epoch"] for h in first.history] == [1, 2, 3, 4, 5]
    # 400 images, 5 epochs (measured: best 0.21 on 200 test images; chance 0.10 ± 0.02)
    assert max(accs) >= 0.18 and first.history[-1]["train_loss"] < first.history[0]["train_loss"]
    assert [h["epoch"] for h in resumed.history] == [6]  # picked up after epoch 5
    assert all(math.isfinite(h["train_loss"]) for h in first.history + resumed.history)
    # the last step of epoch 5 (25 batches of 16 per epoch)
    assert np.isclose(first.history[-1]["lr"], learning_rate(resolve_config(cfg), 4, 24, 25))
