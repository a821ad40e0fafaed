"""Learning to weight unlabeled data — Ren, Yeh & Schwing, "Not All Unlabeled Data are Equal:
Learning to Weight Data in Semi-supervised Learning", NeurIPS 2020 (arXiv 2007.01293; REFERENCE §5).

FixMatch with one weight λ_u per unlabeled example, learned by influence-function hypergradients on
the last layer (inner step: SGD on θ with the current λ; outer step every ``inner_steps``: masked
Adam on the λ of the current batch), against the simpler alternatives: uniform λ (FixMatch), one
scalar λ tuned on validation data by a Tune sweep, MC-dropout confidence weights, supervised only.

Steps: ``dataset`` (CIFAR-10 binary, a generated CIFAR-10-format set, or scikit-learn's digits) →
``train_<method>`` (Ray Train, N workers; every labelled-set size × seed in turn) and
``scalar_sweep`` (Ray Tune over labelled sizes × seeds × λ) → ``report`` (``results.parquet``,
``metrics.json``, ``report.md``: median of the last k evaluations per run, mean ± spread over seeds,
λ histograms, λ vs pseudo-label correctness, outer/inner step cost).

Commands::

    paperline run ssl                      # preset tiny: digits, small conv net, embedded Ray
    paperline run ssl --preset ci          # what the test suite runs
    paperline run ssl --preset paper --set data.root=/data/cifar-10-batches-bin --address auto
    paperline run ssl --set weights.outer_lr=0.05      # recomputes train_learned and the report
"""

from pipelines.registry import PipelineSpec
from pipelines.ssl.config import PRESETS, SSLConfig
from pipelines.ssl.steps import steps

PIPELINE = PipelineSpec(
    name="ssl",
    summary="Learned per-example weights for unlabeled data (Ren et al. 2020) vs FixMatch",
    config=SSLConfig,
    presets=PRESETS,
    default_preset="tiny",
    steps=steps,
    metric="accuracy_learned",
)
