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


def _generated_note(dataset_dir: Path) -> list[str]:
    """The report's first line when the run used the generated set (issue 20: no result on
    generated data may pass for the paper's); nothing for a real VOC-format set."""
    if not (dataset_dir / "voc").is_dir():  # make_dataset generates into <artifact>/voc
        return []
    return [
        "**Generated data**: shapes over photos in VOC format (`data.source=synthetic`), not "
        "PASCAL VOC — the paper's numbers below are a reference point, not a target.",
        "",
    ]


def _match_detections(dets: list[dict], gt: dict, classes: list[str], iou: float = 0.5) -> list:
    """Each detection of one image as "tp", "fp" or "ignored" (matched a difficult object), by the
    devkit's rule: in descending score, a detection is a true positive when its best-overlapping
    ground truth of its class has IoU >= 0.5 and was not taken by a higher-scored one."""
    from stages.detection.boxes import box_iou_voc

    taken = np.zeros(len(gt["boxes"]), bool)
    out = [""] * len(dets)
    for i in sorted(range(len(dets)), key=lambda i: -dets[i]["score"]):
        d = dets[i]
        same = np.flatnonzero(gt["cls"] == classes.index(d["class"]))
        if not len(same):
            out[i] = "fp"
            continue
        box = np.array([[d["x1"], d["y1"], d["x2"], d["y2"]]], np.float32)
        overlaps = box_iou_voc(box, gt["boxes"][same])[0]
        j = same[int(overlaps.argmax())]
        if overlaps.max() < iou:
            out[i] = "fp"
        elif gt["difficult"][j]:
            out[i] = "ignored"
        elif taken[j]:
            out[i] = "fp"  # a duplicate of a detected object
        else:
            taken[j], out[i] = True, "tp"
    return out


# colours (matplotlib names) of the detections grid, legend order
GRID_COLOURS = {
    "ground truth": "gold",
    "true positive": "limegreen",
    "false positive": "red",
    "difficult (not scored)": "silver",
}


def _draw_grid(
    dataset_dir: Path,
    det: pa.Table,
    out: Path,
    *,
    images: int = 6,
    min_score: float = 0.0,
    max_per_image: int = 6,
) -> dict[str, int]:
    """The first ``images`` test images with their ground truth (dashed) and their detections
    scored above ``min_score`` (at most ``max_per_image``, best first), coloured true/false
    positive by the VOC rule (IoU >= 0.5). Returns the counts drawn, by kind."""
    import matplotlib

    matplotlib.use("Agg")
    import cv2
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    from data.voc import load_image

    classes = _classes(dataset_dir)
    test_split = _splits(dataset_dir)[1]
    rows = read_images(dataset_dir, test_split)[:images]
    gt_by_image = _objects_by_image(dataset_dir, test_split, classes)
    by_image: dict[str, list[dict]] = {}
    for d in det.to_pylist():
        by_image.setdefault(d["image_id"], []).append(d)
    counts = {"gt": 0, "tp": 0, "fp": 0, "ignored": 0}
    colour = {
        "tp": GRID_COLOURS["true positive"],
        "fp": GRID_COLOURS["false positive"],
        "ignored": GRID_COLOURS["difficult (not scored)"],
    }
    ncols = 3
    nrows = max(1, math.ceil(len(rows) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.6 * nrows + 1.1), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, rows, strict=False):
        ax.imshow(cv2.cvtColor(load_image(r["path"]), cv2.COLOR_BGR2RGB))
        ax.set_title(r["image_id"], fontsize=9)
        gt = gt_by_image[r["image_id"]]
        for (x1, y1, x2, y2), difficult in zip(gt["boxes"], gt["difficult"], strict=True):
            # VOC boxes are 1-based inclusive pixels: the box covers x1-1 .. x2 in 0-based
            ax.add_patch(
                Rectangle(
                    (x1 - 1.5, y1 - 1.5), x2 - x1 + 1, y2 - y1 + 1, fill=False, lw=1.6, ls="--",
                    ec=GRID_COLOURS["difficult (not scored)" if difficult else "ground truth"],
                )
            )  # fmt: skip
            counts["gt"] += 1
        dets = by_image.get(r["image_id"], [])
        kinds = _match_detections(dets, gt, classes)
        shown = sorted(
            (p for p in zip(dets, kinds, strict=True) if p[0]["score"] > min_score),
            key=lambda p: -p[0]["score"],
        )[:max_per_image]
        for d, kind in shown:
            ax.add_patch(
                Rectangle(
                    (d["x1"] - 1.5, d["y1"] - 1.5), d["x2"] - d["x1"] + 1, d["y2"] - d["y1"] + 1,
                    fill=False, lw=2, ec=colour[kind],
                )
            )  # fmt: skip
            ax.text(
                d["x1"] - 1.5, d["y1"] - 2.5, f"{d['class']} {d['score']:.2f}", fontsize=8,
                color="black", va="bottom",
                bbox=dict(facecolor=colour[kind], edgecolor="none", pad=1.0, alpha=0.85),
            )  # fmt: skip
            counts[kind] += 1
    fig.legend(
        handles=[
            Line2D([], [], color=c, lw=2, ls="--" if name == "ground truth" else "-", label=name)
            for name, c in GRID_COLOURS.items()
        ],
        loc="lower center",
        ncol=len(GRID_COLOURS),
        fontsize=9,
        frameon=False,
    )
    fig.suptitle(
        f"Test images: detections with SVM score > {min_score:g} (label: class, score; at most "
        f"{max_per_image} per image)\ntrue positive: IoU ≥ 0.5 with an object of its class "
        "that no higher-scored detection took (VOC rule)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 0.94))
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return counts


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
        *_generated_note(dataset_dir),
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
    lines += ["", "## Region features (§5)", ""]
    if "region_features_skipped" in regions:
        lines.append(f"Skipped: {regions['region_features_skipped']}.")
    else:
        lines += [
            f"Object regions classified from fine-tuned fc7 features "
            f"({regions['region_objects_train']} training / {regions['region_objects_test']} "
            'test objects, linear SVM): "full" = the warped box, "fg" = background '
            'replaced by the mean, "full+fg" = both concatenated.',
            "",
            "| features | accuracy | " + " | ".join(classes) + " |",
            "|---|---:|" + "---:|" * len(classes),
        ]
    for mode in () if "region_features_skipped" in regions else ("full", "fg", "full+fg"):
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
        "",
        *_detector_claims(ctx, det, bbox_regression),
    ]
    (ctx.out_dir / "report.md").write_text("\n".join(lines))


def _detector_claims(ctx: StepContext, det: pa.Table, bbox_regression: bool) -> list[str]:
    """App. C's box-regression gain, paired with the same detector without it (issue 21)."""
    from pipelines import claims as core
    from pipelines.rcnn.claims import evaluate_pairs

    tables = {"fc7 ft + bbox reg": det} if bbox_regression else {"fc7 ft": det}
    if bbox_regression:
        tables["fc7 ft"] = pq.read_table(ctx.input_dir("detect_nobb") / "detections.parquet")
    results = evaluate_pairs(
        [("bbox_regression", "fc7 ft + bbox reg", "fc7 ft")],
        tables,
        ctx.input_dir("dataset"),
        why_missing="bbox.enabled=false; `--preset table2` tests every Table 2 claim",
    )
    core.write(ctx.out_dir, results, pipeline="rcnn")
    return core.markdown_section(results)


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


def write_table2(ctx: StepContext, *, rows: list[str], neg_iou: float = 0.3) -> None:
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
        *_generated_note(ctx.input_dir("dataset")),
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
        "table, not the values. O-Net* = the small CNN at twice the widths, standing in for "
        "VGG16 on CPU. Rows `svm.neg_iou=…` are §2.3's grid ends on the fine-tuned fc7 detector.",
        "",
        *_table2_claims(ctx, rows, neg_iou),
    ]
    (ctx.out_dir / "table2.md").write_text("\n".join(lines) + "\n")
    ctx.write_json("table2.json", results)
    ctx.write_json(
        "metrics.json", {"table2_mAP_voc07": {k: v["mAP_voc07"] for k, v in results.items()}}
    )


def _table2_claims(ctx: StepContext, rows: list[str], neg_iou: float) -> list[str]:
    """Table 2's and §2.3's differences, each with a paired bootstrap over the test images."""
    from pipelines import claims as core
    from pipelines.rcnn.claims import evaluate_pairs, table2_pairs

    tables = {
        label: pq.read_table(ctx.input_dir(f"det{i}") / "detections.parquet")
        for i, label in enumerate(rows)
    }
    results = evaluate_pairs(
        table2_pairs(rows, neg_iou),
        tables,
        ctx.input_dir("dataset"),
        why_missing="a row it compares was not run (O-Net rows: table2_onet=true)",
    )
    core.write(ctx.out_dir, results, pipeline="rcnn")
    return core.markdown_section(results)


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
        if not labels:  # §5 needs instance masks; a detection-only set has none (issue 20)
            _skip_regions(
                ctx,
                f"no instance masks (SegmentationObject/<id>.png) for the objects of split "
                f"{split!r}; §5's fg features need them",
            )
            return
        data[split] = (np.concatenate(full), np.concatenate(fg), np.concatenate(labels))
    if len(np.unique(data[_splits(dataset_dir)[0]][2])) < 2:
        _skip_regions(ctx, "the masked training objects span fewer than 2 classes")
        return
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


def _skip_regions(ctx: StepContext, reason: str) -> None:
    """§5's region features cannot be computed on this set: say why instead of failing the run
    (the detector's results stand without them); the report prints the reason."""
    ctx.write_json("metrics.json", {"region_features_skipped": reason})
