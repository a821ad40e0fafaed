"""R-CNN's claims (Table 2, App. C, §2.3) as data, evaluated by a paired bootstrap over test images.

Every claim here is a difference of VOC07 11-point mAP between two detectors scored on the same
test images; the interval resamples the images (``stages/detection/bootstrap.py``), so it says
whether the test split is big enough to resolve the difference at all.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import claims as core
from pipelines.claims import Claim
from pipelines.rcnn.common import _classes, _splits, read_images


def _diff(cid: str, statement: str, source: str, a: str, b: str, paper: float) -> Claim:
    return Claim(cid, statement, source, f"mAP({a}) − mAP({b})", ">", 0.0, paper_value=paper,
                 unit="points", scale=100)  # fmt: skip


# the paper's numbers: VOC2007 test, AlexNet (T-Net) / VGG16 (O-Net), Table 2 and §2.3
CLAIMS = {
    c.id: c
    for c in (
        _diff(
            "finetune_pool5",
            "Fine-tuning improves pool5",
            "Table 2",
            "pool5 ft",
            "pool5",
            0.473 - 0.442,
        ),  # fmt: skip
        _diff(
            "finetune_fc6", "Fine-tuning improves fc6", "Table 2", "fc6 ft", "fc6", 0.531 - 0.462
        ),
        _diff(
            "finetune_fc7", "Fine-tuning improves fc7", "Table 2", "fc7 ft", "fc7", 0.542 - 0.447
        ),
        _diff(
            "fc7_over_pool5_ft",
            "Fine-tuned fc7 beats fine-tuned pool5",
            "Table 2",
            "fc7 ft",
            "pool5 ft",
            0.542 - 0.473,
        ),  # fmt: skip
        _diff(
            "bbox_regression",
            "Bounding-box regression adds 3–4 mAP",
            "App. C, Table 2",
            "fc7 ft + bbox reg",
            "fc7 ft",
            0.585 - 0.542,
        ),  # fmt: skip
        _diff(
            "onet_over_tnet",
            "The bigger net (O-Net, VGG16) beats T-Net",
            "Table 3",
            "O-Net fc7 ft",
            "T-Net fc7 ft",
            0.622 - 0.542,
        ),  # fmt: skip
        _diff(
            "neg_iou_0.3_over_0",
            "SVM negatives at IoU < 0.3 beat IoU = 0 (0 costs 4 mAP)",
            "§2.3, App. B",
            "neg_iou 0.3",
            "neg_iou 0",
            0.04,
        ),  # fmt: skip
        _diff(
            "neg_iou_0.3_over_0.5",
            "SVM negatives at IoU < 0.3 beat < 0.5 (0.5 costs 5 mAP)",
            "§2.3, App. B",
            "neg_iou 0.3",
            "neg_iou 0.5",
            0.05,
        ),  # fmt: skip
    )
}


def split_truth(dataset_dir: Path) -> tuple[pa.Table, list[str], list[str]]:
    """(objects of the test split, its image ids — those without objects included, classes)."""
    _, test_split = _splits(dataset_dir)
    objects = pq.read_table(dataset_dir / "objects.parquet")
    objects = objects.filter(pc.equal(objects["split"], test_split))
    ids = [r["image_id"] for r in read_images(dataset_dir, test_split)]
    return objects, ids, _classes(dataset_dir)


def evaluate_pairs(
    pairs: list[tuple[str, str | None, str | None]],
    detections: dict[str, pa.Table],
    dataset_dir: Path,
    *,
    why_missing: str = "",
) -> list[core.ClaimResult]:
    """Each ``(claim id, detector a, detector b)``: mAP(a) − mAP(b) with a paired bootstrap over
    the test images. A pair naming a detector this run lacks is "not measured"."""
    from stages.detection.bootstrap import bootstrap_map

    objects, ids, classes = split_truth(dataset_dir)
    boot = bootstrap_map(detections, objects, classes, ids, resamples=core.RESAMPLES,
                         seed=core.SEED)  # fmt: skip
    pos = boot["num_pos"]
    note = (f"{len(ids)} test images, {min(pos.values())}–{max(pos.values())} non-difficult "
            "objects per class")  # fmt: skip
    out = []
    for cid, a, b in pairs:
        claim = CLAIMS[cid]
        if a not in detections or b not in detections:
            out.append(core.not_measured(claim, why_missing or "the run lacks one of the rows"))
            continue
        est = boot["mAP"][a] - boot["mAP"][b]
        samples = boot["samples"][a] - boot["samples"][b]
        out.append(
            core.evaluate(
                claim,
                est,
                samples,
                method=f"paired bootstrap over {len(ids)} test images",
                n=len(ids),
                note=note,
                details={"a": a, "b": b, "mAP_a": boot["mAP"][a], "mAP_b": boot["mAP"][b]},
            )
        )
    return out


# Table 2 study rows (labels of ``steps.table2_steps``) -> the detectors each claim compares
def table2_pairs(labels: list[str], neg_iou: float) -> list[tuple[str, str | None, str | None]]:
    def find(prefix: str) -> str | None:
        return next((x for x in labels if x == prefix), None)

    onet = next((x for x in labels if x.startswith("O-Net") and x.endswith("fine-tuned")), None)
    base = "T-Net fc7, fine-tuned"
    return [
        ("finetune_pool5", find("T-Net pool5, fine-tuned"), find("T-Net pool5, no fine-tuning")),
        ("finetune_fc6", find("T-Net fc6, fine-tuned"), find("T-Net fc6, no fine-tuning")),
        ("finetune_fc7", find(base), find("T-Net fc7, no fine-tuning")),
        ("fc7_over_pool5_ft", find(base), find("T-Net pool5, fine-tuned")),
        ("bbox_regression", find("T-Net fc7, fine-tuned + bbox reg"), find(base)),
        ("onet_over_tnet", onet, find(base)),
        # the configured threshold is the base row; the claims are about 0.3
        *(
            [
                ("neg_iou_0.3_over_0", find(base), find(f"{base}, svm.neg_iou=0")),
                ("neg_iou_0.3_over_0.5", find(base), find(f"{base}, svm.neg_iou=0.5")),
            ]
            if neg_iou == 0.3
            else []
        ),
    ]
