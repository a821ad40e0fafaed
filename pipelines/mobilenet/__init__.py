"""MobileNetV2 — Sandler, Howard, Zhu, Zhmoginov, Chen, "MobileNetV2: Inverted Residuals and Linear
Bottlenecks", CVPR 2018 (arXiv 1801.04381); REFERENCE §3.

Steps: ``dataset`` (CIFAR-10 binary at ``data.root``, or a generated CIFAR-10-format set) →
``complexity`` (params / MAdds / CPU latency over the α × resolution grid at 1000 classes: the
paper's Table 4 numbers and Figure 5's x axis) → ``train`` (the reference α under Ray Train) →
``width_sweep`` (Ray Tune: accuracy over α × resolution × seeds, plus MobileNetV1 points: Figure 5)
→ ``ablations`` (Ray Tune: linear vs ReLU6 bottleneck, shortcut between bottlenecks / expansions /
none: Figure 6) → ``report`` (sweep.parquet, figures, tables beside the paper's numbers).
Config and presets in ``config.py``; the step list in ``steps.py``; the step adaptors in
``experiments.py``; the report in ``report.py``.

Small presets differ from the paper, on purpose and visibly: 32-px images (resolution multiplier
over 16…32 px instead of 96…224); the stem conv at stride 1 instead of 2 (``model.stem_stride``).
With the paper's total stride 32, a 32-px image is 2×2 after the fourth row and 1×1 after the
sixth, so the depthwise convs see almost no spatial context (α 0.5, 6 epochs: 41% vs 78% with stride
16). Stride 16 keeps a 2×2 map at the end, at 4× the MAdds. The usual CIFAR adaptation (stride 8)
also changes row 2's stride; we keep that one to stay affordable on 2 CPU cores. Also SGD with
Nesterov momentum and a cosine schedule for a few epochs instead of §6.1's RMSProp (which needs far
more steps than a CPU budget affords), and 10 classes. The ``complexity`` step always uses the
paper's architecture (stem stride 2, 1000 classes).

Commands::

    paperline run mobilenet                      # preset tiny: generated set, ~10 min on 2 idle cores
    paperline run mobilenet --preset ci          # what the test suite runs through Ray
    paperline run mobilenet --preset paper --set data.root=/data/cifar-10-batches-bin --address auto
    paperline run mobilenet --set sweep.scheduler=asha --set sweep.seeds=0,1,2
"""

from pipelines.mobilenet.config import PRESETS, MobileNetConfig
from pipelines.mobilenet.steps import steps
from pipelines.registry import PipelineSpec

PIPELINE = PipelineSpec(
    name="mobilenet",
    summary="MobileNetV2 (Sandler et al. 2018): MAdds/params table, accuracy vs MAdds, ablations",
    config=MobileNetConfig,
    presets=PRESETS,
    default_preset="tiny",
    steps=steps,
    metric="reference_accuracy",
    mode="max",
)
