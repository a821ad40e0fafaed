"""R-CNN — Girshick, Donahue, Darrell, Malik, "Rich feature hierarchies for accurate object detection
and semantic segmentation", CVPR 2014 (arXiv 1311.2524).

Steps: ``dataset`` → ``proposals`` (§2.1 selective search, fast mode) → ``proposal_report`` (recall
vs number of proposals) → ``pretrain`` → ``finetune`` (§2.3) → ``features`` (pool5/fc6/fc7 Parquet
cache) → ``svm`` (per class, hard negative mining, App. B) → ``bbox_regression`` (App. C) →
``detect`` (§2.2: top 100, NMS 0.3) → ``evaluate`` (VOC devkit AP) → ``region_features`` (§5) →
``report``. Config and presets live in ``config.py``; the step graph in ``steps.py``; the step adaptors in
``data.py`` (dataset, proposals), ``train.py`` (pretrain, fine-tune), ``features.py`` (the Parquet
feature cache), ``detect.py`` (SVMs, box regression, detection, evaluation) and ``report.py``;
``common.py`` holds what several adaptors read.

Reproduces: the detection pipeline and its Table 2 (``--preset table2``: pool5/fc6/fc7 × without /
with fine-tuning, + bbox regression, T-Net vs O-Net), the §5 region-feature comparison, the
SVM-vs-softmax and mining-vs-all-negatives comparisons (``svm.scorer``, ``svm.mode``).

Commands::

    paperline run rcnn                         # preset tiny: generated VOC-format set, embedded Ray
    paperline run rcnn --preset ci             # what the test suite runs
    paperline run rcnn --preset table2         # every Table 2 row in one graph, one table
    paperline run rcnn --preset voc2007 --set data.root=/data/VOCdevkit/VOC2007 \
        --set pretrain.weights_path=torchvision --address auto
    paperline run rcnn --preset voc2007 --set data.root=... \
        --set proposals.method=precomputed --set proposals.precomputed_path=voc07_ss.mat
"""

from pipelines.rcnn.config import PRESETS, RCNNConfig
from pipelines.rcnn.steps import steps
from pipelines.registry import PipelineSpec

PIPELINE = PipelineSpec(
    name="rcnn",
    summary="R-CNN (Girshick et al. 2014): selective search → CNN features → SVMs → VOC mAP",
    config=RCNNConfig,
    presets=PRESETS,
    default_preset="tiny",
    steps=steps,
    metric="mAP_voc07",
)
