"""R-CNN outputs: the report (per-class table beside the paper, PR plot, detections drawn), the
Table 2 study table and §5's region features."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.engine import StepContext
from pipelines.rcnn.common import (
    _classes,
    _objects_by_image,
    _splits,
    load_model,
    read_images,
)

# ----------------------------------------------------------------------------------------------
# report: per-class table with the paper's numbers beside ours, PR plot, detections drawn


def _pct(value) -> str:
    """A fraction as a percentage with one decimal; "–" where it is undefined (AP of a class
    without positives, accuracy of a class without objects), never "nan"."""
    if value is None or math.isnan(float(value)):
        return "–"
    return f"{100 * value:.1f}"


def _draw_grid(
    dataset_dir: Path, det: pa.Table, out: Path, *, images: int = 6, min_score: float = 0.0
) -> None:
    import cv2

    from data.voc import load_image

    rows = read_images(dataset_dir, _splits(dataset_dir)[1])[:images]
    det_rows = det.to_pylist()
    tiles = []
    for r in rows:
        img = load_image(r["path"])
        for d in det_rows:
            if d["image_id"] == r["image_id"] and d["score"] > min_score:
                p1 = (int(d["x1"]) - 1, int(d["y1"]) - 1)
                p2 = (int(d["x2"]) - 1, int(d["y2"]) - 1)
                cv2.rectangle(img, p1, p2, (0, 255, 0), 2)
                cv2.putText(
                    img,
                    f"{d['class']} {d['score']:.1f}",
                    (p1[0], max(p1[1] - 3, 10)),
                    cv2.FONT_HERSHEY_SIMPLEX,
                    0.4,
                    (0, 255, 0),
                    1,
                )
        tiles.append(cv2.resize(img, (320, 240)))
    while len(tiles) % 3:
        tiles.append(np.zeros_like(tiles[0]))
    grid = np.vstack([np.hstack(tiles[i : i + 3]) for i in range(0, len(tiles), 3)])
    cv2.imwrite(str(out), grid)


def write_report(ctx: StepContext, *, layer: str, finetuned: bool, bbox_regression: bool) -> None:
    dataset_dir = ctx.input_dir("dataset")
    classes = _classes(dataset_dir)
    ev = ctx.input_dir("evaluate")
    metrics = json.loads((ev / "metrics.json").read_text())
    det = pq.read_table(ctx.input_dir("detect") / "detections.parquet")
    pq.write_table(det, ctx.out_dir / "detections.parquet")
    import shutil

    shutil.copy2(ev / "precision_recall.png", ctx.out_dir / "precision_recall.png")
    _draw_grid(dataset_dir, det, ctx.out_dir / "detections.png")
    proposals_md = (ctx.input_dir("proposal_report") / "report.md").read_text()
    shutil.copy2(
        ctx.input_dir("proposal_report") / "proposal_recall.png",
        ctx.out_dir / "proposal_recall.png",
    )
    row = f"{layer}, {'fine-tuned' if finetuned else 'no fine-tuning'}" + (
        " + bbox reg" if bbox_regression else ""
    )
    paper = PAPER_TABLE2.get(f"T-Net {row}")  # defined below; every AlexNet row of Table 2
    lines = [
        "# R-CNN — detection results",
        "",
        f"Configuration: **{row}**; test split of the dataset in `config.json`.",
        "",
        "| | mAP (VOC2007 11-point) | mAP (area) |",
        "|---|---:|---:|",
        f"| this run | {100 * metrics['mAP_voc07']:.1f} | {100 * metrics['mAP_area']:.1f} |",
    ]
    if paper is not None:
        lines.append(f"| paper, VOC2007 test, AlexNet | {paper:.1f} | — |")
    lines += [
        "",
        "The paper's numbers are for real VOC2007 with AlexNet; on the generated set "
        "they are a reference point, not a target.",
        "",
        "| class | AP (11-point) | AP (area) |",
        "|---|---:|---:|",
    ]
    for cls in classes:
        lines.append(
            f"| {cls} | {_pct(metrics['AP_voc07'][cls])} | {_pct(metrics['AP_area'][cls])} |"
        )
    if any(_pct(metrics["AP_voc07"][c]) == "–" for c in classes):
        lines += ["", "– : no non-difficult test object of the class; mAP averages the others."]
    regions = json.loads((ctx.input_dir("region_features") / "metrics.json").read_text())
    lines += [
        "",
        "## Region features (§5)",
        "",
        f"Object regions classified from fine-tuned fc7 features "
        f"({regions['region_objects_train']} training / {regions['region_objects_test']} "
        'test objects, linear SVM): "full" = the warped box, "fg" = background '
        'replaced by the mean, "full+fg" = both concatenated.',
        "",
        "| features | accuracy | " + " | ".join(classes) + " |",
        "|---|---:|" + "---:|" * len(classes),
    ]
    for mode in ("full", "fg", "full+fg"):
        per = regions[f"region_accuracy_{mode}_per_class"]
        lines.append(
            f"| {mode} | {100 * regions[f'region_accuracy_{mode}']:.1f} | "
            + " | ".join(_pct(per.get(c)) for c in classes)
            + " |"
        )
    lines += [
        "",
        "![precision-recall](precision_recall.png)",
        "",
        "![detections](detections.png)",
        "",
        proposals_md.replace("# R-CNN — ", "## "),
    ]
    (ctx.out_dir / "report.md").write_text("\n".join(lines))


# ----------------------------------------------------------------------------------------------
# table2: the paper's Table 2 rows side by side (VOC2007 test mAP, AlexNet/VGG16)
PAPER_TABLE2 = {
    "T-Net pool5, no fine-tuning": 44.2,
    "T-Net fc6, no fine-tuning": 46.2,
    "T-Net fc7, no fine-tuning": 44.7,
    "T-Net pool5, fine-tuned": 47.3,
    "T-Net fc6, fine-tuned": 53.1,
    "T-Net fc7, fine-tuned": 54.2,
    "T-Net fc7, fine-tuned + bbox reg": 58.5,
    "O-Net fc7, fine-tuned": 62.2,
    "O-Net fc7, fine-tuned + bbox reg": 66.0,
}


def write_table2(ctx: StepContext, *, rows: list[str]) -> None:
    results = {}
    for i, label in enumerate(rows):
        m = json.loads((ctx.input_dir(f"row{i}") / "metrics.json").read_text())
        results[label] = {
            "mAP_voc07": m["mAP_voc07"],
            "mAP_area": m["mAP_area"],
            "AP_voc07": m["AP_voc07"],
        }
    classes = list(next(iter(results.values()))["AP_voc07"])
    lines = [
        "# R-CNN — Table 2 on this dataset",
        "",
        "| row | mAP (11-point) | " + " | ".join(classes) + " | paper (VOC07) |",
        "|---|---:|" + "---:|" * len(classes) + "---:|",
    ]
    for label, r in results.items():
        paper = PAPER_TABLE2.get(label.replace("O-Net*", "O-Net"))
        aps = " | ".join(_pct(r["AP_voc07"][c]) for c in classes)
        lines.append(
            f"| {label} | {100 * r['mAP_voc07']:.1f} | {aps} | "
            f"{'' if paper is None else f'{paper:.1f}'} |"
        )
    lines += [
        "",
        "The paper's column is VOC2007 test with AlexNet (T-Net) / VGG16 (O-Net); the CPU "
        "presets use the small CNN on the generated set, so compare the *shape* of the "
        "table (fine-tuning helps fc6/fc7 most; bbox regression adds a few points), not "
        "the values. O-Net* = the small CNN at twice the widths, standing in for VGG16 on CPU.",
    ]
    (ctx.out_dir / "table2.md").write_text("\n".join(lines) + "\n")
    ctx.write_json("table2.json", results)
    ctx.write_json(
        "metrics.json", {"table2_mAP_voc07": {k: v["mAP_voc07"] for k, v in results.items()}}
    )


# ----------------------------------------------------------------------------------------------
# region_features: §5 "full" / "fg" / "full+fg" features of object regions, classified per class
def region_features(ctx: StepContext, *, padding: int, C: float) -> None:
    import torch

    from data.errors import DatasetError
    from data.voc import load_image, load_instance_mask
    from stages.detection.regions import (
        REGION_MODES,
        combine_region_features,
        region_accuracy,
        region_inputs,
    )

    dataset_dir = ctx.input_dir("dataset")
    classes = _classes(dataset_dir)
    net = load_model(ctx.input_dir("finetune") / "model.pt")
    data = {}
    for split in _splits(dataset_dir):
        objects = _objects_by_image(dataset_dir, split, classes)
        full, fg, labels = [], [], []
        for row in read_images(dataset_dir, split):
            obj = objects[row["image_id"]]
            if not len(obj["boxes"]):
                continue
            voc_root = Path(row["path"]).parent.parent
            try:  # real VOC has masks for a subset of images only
                inst = load_instance_mask(
                    voc_root, row["image_id"], expected_shape=(row["height"], row["width"])
                )
            except DatasetError:
                continue
            masks = np.stack([inst == k + 1 for k in range(len(obj["boxes"]))])
            keep = masks.reshape(len(masks), -1).any(1)  # objects without mask pixels
            if not keep.any():
                continue
            crops = region_inputs(
                load_image(row["path"]),
                obj["boxes"][keep],
                masks[keep],
                size=net.input_size,
                padding=padding,
            )
            with torch.inference_mode():
                for name, out in (("full", full), ("fg", fg)):
                    x = torch.from_numpy(crops[name]).permute(0, 3, 1, 2).contiguous()
                    out.append(net.features(x, "fc7").numpy())
            labels.append(obj["cls"][keep])
        if not labels:
            raise ValueError(
                f"region_features: no object masks found for split {split!r} "
                "(SegmentationObject/*.png)"
            )
        data[split] = (np.concatenate(full), np.concatenate(fg), np.concatenate(labels))
    (train_full, train_fg, train_y), (test_full, test_fg, test_y) = (
        data[s] for s in _splits(dataset_dir)
    )
    metrics = {}
    for mode in REGION_MODES:
        r = region_accuracy(
            combine_region_features(train_full, train_fg, mode),
            train_y,
            combine_region_features(test_full, test_fg, mode),
            test_y,
            C=C,
            num_classes=len(classes),
        )
        metrics[f"region_accuracy_{mode}"] = r["accuracy"]
        metrics[f"region_accuracy_{mode}_per_class"] = {
            classes[int(k)]: v for k, v in r["per_class"].items()
        }
    metrics["region_objects_train"], metrics["region_objects_test"] = len(train_y), len(test_y)
    ctx.write_json("metrics.json", metrics)
