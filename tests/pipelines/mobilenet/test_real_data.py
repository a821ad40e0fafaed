"""MobileNetV2 on real Fashion-MNIST, grey 28 px through a 1-channel stem (the `real` preset on a
slice: 60-140 s in-process on the shared box). Skips with the reason where the data is not
installed (`make data`)."""

from __future__ import annotations

import json

from pipelines import runner
from stages.models.registry import create
from tests.pipelines.fashion import needs_fashion_mnist

SLICE = {
    "data.num_train": "2000",
    "data.num_test": "500",
    "optim.epochs": "2",
    "train.resolution": "14",
    "sweep.widths": "0.35",
    "sweep.resolutions": "14",
    "sweep.v1_widths": "0.5",
    "sweep.seeds": "0",
    "ablations.variants": "mobilenetv2",
    "ablations.resolution": "14",
    "ablations.seeds": "0",
    "complexity.widths": "1.0",
    "complexity.resolutions": "224",
    "complexity.latency_repeats": "1",
}


def test_a_grey_stem_changes_only_the_first_conv():
    rgb, grey = (
        create("mobilenetv2", num_classes=10),
        create("mobilenetv2", num_classes=10, in_channels=1),
    )
    n = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert n(rgb) - n(grey) == 2 * 9 * 32  # the 3×3 stem's kernels for the two dropped channels
    v1 = create("mobilenetv1", num_classes=10, width_mult=0.5, in_channels=1)
    assert v1.features[0][0].in_channels == 1


@needs_fashion_mnist
def test_mobilenet_trains_on_grey_fashion_mnist(tmp_path):
    kw = dict(store=str(tmp_path / "s"), runs=tmp_path / "r", progress=False, log=lambda _: None)
    result = runner.run("mobilenet", "real", SLICE, executor="local", **kw)
    info = json.loads((result.artifacts["dataset"].local_dir() / "dataset.json").read_text())
    assert info["format"] == "mnist" and info["num_train"] == 2000 and not info["generated"]
    trials = json.loads((result.artifacts["width_sweep"].local_dir() / "trials.json").read_text())
    assert {t["variant"] for t in trials} == {"mobilenetv2", "mobilenetv1"}
    assert all(t["error"] is None for t in trials)
    # chance is 0.10; 62 SGD steps on 2000 grey images reach well above it (measured 0.44 for
    # V2 0.35@14, 0.63 for V1 0.5@14)
    assert min(t["accuracy"] for t in trials) >= 0.3
    report = (result.run_dir / "report.md").read_text()
    assert report.startswith("# MobileNetV2") and "3×3×1 kernels" in report
