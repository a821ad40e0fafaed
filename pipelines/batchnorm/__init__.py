"""Batch Normalization — Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training
by Reducing Internal Covariate Shift", ICML 2015 (arXiv 1502.03167). REFERENCE §2.

Steps: ``mnist_data`` / ``cifar_data`` (datasets) → ``mnist`` (§4.1, Figure 1: the 3×100 sigmoid
MLP with and without BN; Tune sweep over BN × seed) → ``variants`` (§4.2, Figures 2 and 3: Baseline,
BN-Baseline, BN-x5, BN-x30, BN-x5-Sigmoid, Baseline-Sigmoid on a small Inception-style net and a
CIFAR-10-format set; Tune sweep over variant × seed) → ``batch_size`` (the summary's criticism: BN vs
no BN down to minibatches of 1–2, train-mode vs inference-mode accuracy; Tune sweep) →
``multi_worker`` (Ray Train, 2 workers: per-worker vs synchronised BN statistics) → ``report``
(metrics.json, curves.parquet, report.md with Figures 1–3 beside the paper's numbers). Config and
presets in ``config.py``; the step list in ``steps.py``; the step adaptors (and the variants table)
in ``experiments.py``; the report writer in ``report.py``; the BN layer in
``stages/models/batchnorm.py``; the loops in ``stages/training/bn_experiments.py``.

Choices where the paper is silent: plain SGD (no momentum) at lr 0.5 for both MNIST nets (the
paper names no optimiser), initial weights N(0, 0.1²) ("small random Gaussian"), ε = 1e-5, moving
averages (momentum 0.1) for inference during training and Algorithm 2's exact population
statistics for the final numbers; SGD with momentum 0.9 for the conv variants.

Commands::

    paperline run batchnorm                      # preset tiny: digits + generated CIFAR set
    paperline run batchnorm --preset ci          # what the test suite runs
    paperline run batchnorm --preset paper --set data.root=/data/mnist \
        --set data.cifar_root=/data/cifar-10-batches-bin --address auto
    paperline run batchnorm --until mnist --set mnist.steps=3000   # Figure 1 only
"""

from pipelines.batchnorm.config import PRESETS, BatchNormConfig
from pipelines.batchnorm.steps import steps
from pipelines.registry import PipelineSpec

PIPELINE = PipelineSpec(
    name="batchnorm",
    summary="Batch Normalization (Ioffe & Szegedy 2015): Fig. 1 MNIST, Figs. 2-3 variants, batch size, DDP",
    config=BatchNormConfig,
    presets=PRESETS,
    default_preset="tiny",
    steps=steps,
    metric="mnist_steps_ratio",
    mode="max",
)
