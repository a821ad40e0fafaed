"""Issue 22's figures: honest axes for sweeps, true/false positives in R-CNN's detections grid."""

import numpy as np
import pyarrow as pa

from pipelines.rcnn.report import _match_detections
from pipelines.sweep_report import honest_ylim, log_x, plot_metric_vs


def test_sweep_plot_log_x_for_decades_and_full_range_for_fractions(tmp_path):
    rows = [{"svm.C": c, "metric": m} for c, m in [(1e-4, 0.610), (1e-3, 0.611), (1e-2, 0.609)]]
    axes = plot_metric_vs(tmp_path / "c.png", "svm.C", rows, "mAP_voc07")
    assert axes["xscale"] == "log"
    assert axes["ylim"] == (0.0, 1.02)  # a 0.002 spread of mAP stays flat
    assert (tmp_path / "c.png").stat().st_size > 0


def test_log_x_and_honest_ylim_cases():
    assert log_x([1, 10, 100]) and not log_x([1, 2, 50]) and not log_x([0, 1, 1000])
    lo, hi = honest_ylim([100.0, 100.1])  # a loss: padded to 10% of its magnitude
    assert hi - lo >= 10.0 and lo < 100.0 < 100.1 < hi


def _det(cls, score, box):
    return dict(zip(("class", "score", "x1", "y1", "x2", "y2"), (cls, score, *box), strict=True))


def test_match_detections_follows_the_devkit_rule():
    classes = ["circle", "square"]
    gt = {
        "boxes": np.array([[10, 10, 50, 50], [100, 100, 140, 140]], np.float32),
        "cls": np.array([0, 1]),
        "difficult": np.array([False, True]),
    }
    dets = [
        _det("circle", 1.0, (11, 11, 50, 50)),  # matches the circle: tp
        _det("circle", 2.0, (10, 10, 49, 51)),  # higher score takes the circle first: tp
        _det("square", 0.5, (10, 10, 50, 50)),  # wrong class: fp
        _det("square", 0.4, (100, 100, 140, 140)),  # a difficult object: not scored
    ]
    assert _match_detections(dets, gt, classes) == ["fp", "tp", "fp", "ignored"]
    assert pa.Table.from_pylist(dets).num_rows == 4
