"""Rethinking generalization — Zhang, Bengio, Hardt, Recht, Vinyals, "Understanding deep learning
requires rethinking generalization", ICLR 2017 (arXiv 1611.03530).

Steps: ``dataset`` (CIFAR-10 binary / MNIST IDX at ``data.root``, or a generated CIFAR-10-format
set) → ``randomize`` (§2's corruptions, drawn once and saved) → ``randomization`` (Tune sweep:
conditions × models × seeds, Figure 1a) → ``corruption`` (Tune sweep: label noise p × models,
Figure 1b/1c) → ``regularizers`` (Tune sweep: weight decay × random crop × dropout, true and random
labels, Table 1) → ``expressivity`` (Theorem 1, §4) → ``min_norm`` (kernel interpolation, §5) →
``report`` (sweep.parquet, curves.parquet, figures, report.md beside the paper's numbers).
``experiments`` picks which of the five run. Config and presets in ``config.py``;
the step list in ``steps.py``; the step adaptors in ``experiments.py``; the report in ``report.py``.

Commands::

    paperline run generalization                     # tiny: generated set, MLPs, minutes on CPU
    paperline run generalization --preset ci         # what the Ray end-to-end test runs
    paperline run generalization --preset paper --set data.root=/data/cifar-10-batches-bin \
        --set min_norm.root=/data/mnist --address auto
"""

from pipelines.generalization.config import PRESETS, GeneralizationConfig
from pipelines.generalization.steps import steps
from pipelines.registry import PipelineSpec

PIPELINE = PipelineSpec(
    name="generalization",
    summary="Zhang et al. 2017: random labels, label corruption, regularisers, Theorem 1, min-norm",
    config=GeneralizationConfig,
    presets=PRESETS,
    default_preset="tiny",
    steps=steps,
    metric="random_labels_train_acc",
    mode="max",
)
