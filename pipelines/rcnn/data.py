"""R-CNN's first steps: the dataset index tables, selective-search proposals (§2.1) as a map over
image shards, and the proposal report (recall vs number of proposals). Config lives in
``pipelines/rcnn/config.py``; every function here takes explicit arguments."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.errors import DatasetError
from pipelines.engine import StepContext
from pipelines.rcnn.common import (
    map_with_memory,
    memory_request_mb,
    proposals_task_bytes,
    read_images,
    search_pixels,
)

HOLDOUT_SPLIT = "holdout"  # the test split's name under data.holdout_fraction

# ----------------------------------------------------------------------------------------------
# dataset: the index tables every later step reads
IMAGES_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("split", pa.string()),
        (
            "path",
            pa.string(),
        ),  # relative to the dataset artifact, or absolute for an external VOC dir
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)


def make_dataset(
    ctx: StepContext,
    *,
    source: str,
    root: str,
    train_split: str,
    test_split: str,
    max_images: int,
    download: bool,
    num_train: int,
    num_test: int,
    width_px: int,
    height_px: int,
    max_objects: int,
    seed: int,
    classes: tuple[str, ...] = ("voc",),
    holdout_fraction: float = 0.0,
) -> None:
    """Index tables of a VOC-format set: ``images.parquet``, ``objects.parquet``,
    ``classes.json`` (the classes every later step and metric covers) and ``splits.json``.

    ``classes``: ``("auto",)`` = the names the annotations use, ``("voc",)`` = the 20 VOC
    classes, or an explicit list (a name outside it is a DatasetError naming the file).
    ``holdout_fraction`` > 0: a seeded fraction of ``train_split`` becomes the test split
    ``"holdout"`` (for sets without a test split file); ``test_split`` is then not read."""
    from data import voc
    from data.synthetic_voc import SHAPE_CLASSES, generate_voc

    if source == "synthetic":
        generate_voc(
            ctx.out_dir / "voc",
            num_train=num_train,
            num_test=num_test,
            seed=seed,
            image_size=(width_px, height_px),
            max_objects=max_objects,
        )
        voc_root, wanted = ctx.out_dir / "voc", SHAPE_CLASSES
    else:
        if not root:
            raise ValueError("data.root: set it to a VOC directory (…/VOCdevkit/VOC2007)")
        voc_root = Path(root).expanduser().resolve()
        wanted = {"voc": voc.VOC_CLASSES, "auto": None}.get(classes[0], classes)
        if download and not (voc_root / "Annotations").exists():
            _download_voc2007(voc_root)
    by_split = {}
    if holdout_fraction > 0:
        ids = voc.read_split_ids(voc_root, train_split)
        n_test = max(1, round(holdout_fraction * len(ids)))
        if n_test >= len(ids):
            raise DatasetError(
                voc_root / "ImageSets" / "Main" / f"{train_split}.txt",
                f"data.holdout_fraction={holdout_fraction} of {len(ids)} image(s) leaves no "
                "training image; expected a larger split or a smaller fraction",
            )
        held = set(np.random.default_rng(seed).choice(len(ids), n_test, replace=False).tolist())
        images = voc.read_voc(voc_root, train_split, classes=wanted)
        test_split = HOLDOUT_SPLIT
        by_split[train_split] = [im for i, im in enumerate(images) if i not in held]
        by_split[test_split] = [im for i, im in enumerate(images) if i in held]
    else:
        # Both split files are checked (non-empty, disjoint) before any annotation is parsed.
        # The check covers the whole splits, not the data.max_images slices: overlapping splits
        # are a config mistake whatever the slice, and a slice of a non-empty split is never empty.
        voc.read_train_test_ids(voc_root, train_split, test_split)
        for split in (train_split, test_split):
            by_split[split] = voc.read_voc(voc_root, split, classes=wanted)
    if wanted is None:  # data.classes=auto: the classes the set's annotations name
        names = {o.name for ims in by_split.values() for im in ims for o in im.objects}
        if not names:
            raise DatasetError(
                voc_root / "Annotations",
                f"no <object> in any annotation of {train_split!r} / {test_split!r}; "
                "expected at least one object (or set data.classes to a list)",
            )
        vocab = [c for c in voc.VOC_CLASSES if c in names]  # devkit order for VOC names
        wanted = vocab if len(vocab) == len(names) else sorted(names)
    classes = tuple(wanted)
    image_rows, tables = [], []
    for split in (train_split, test_split):
        images = by_split[split]
        if max_images:
            images = images[:max_images]
        for im in images:
            path = Path(im.image_path)
            rel = path.relative_to(ctx.out_dir) if source == "synthetic" else path
            image_rows.append(
                {
                    "image_id": im.image_id,
                    "split": split,
                    "path": str(rel),
                    "width": im.width,
                    "height": im.height,
                }
            )
        objects = voc.objects_table(images)
        tables.append(objects.append_column("split", pa.array([split] * objects.num_rows)))
    pq.write_table(
        pa.Table.from_pylist(image_rows, schema=IMAGES_SCHEMA), ctx.out_dir / "images.parquet"
    )
    pq.write_table(pa.concat_tables(tables), ctx.out_dir / "objects.parquet")
    ctx.write_json("classes.json", list(classes))
    ctx.write_json("splits.json", {"train": train_split, "test": test_split})
    if holdout_fraction > 0:
        ctx.write_json("holdout.json", {"fraction": holdout_fraction, "seed": seed})


def _download_voc2007(root: Path) -> None:  # pragma: no cover - needs internet
    import torchvision

    for image_set in ("trainval", "test"):
        torchvision.datasets.VOCDetection(
            str(root.parent.parent), year="2007", image_set=image_set, download=True
        )


def gt_boxes_by_image(
    dataset_dir: Path, split: str, *, include_difficult: bool = False
) -> dict[str, np.ndarray]:
    """Ground-truth boxes (G, 4) xyxy 1-based per image of ``split`` (every image has an entry)."""
    objects = pq.read_table(dataset_dir / "objects.parquet").to_pylist()
    out = {r["image_id"]: [] for r in read_images(dataset_dir, split)}
    for o in objects:
        if o["split"] == split and (include_difficult or not o["difficult"]):
            out[o["image_id"]].append([o["x1"], o["y1"], o["x2"], o["y2"]])
    return {k: np.asarray(v, dtype=np.float32).reshape(-1, 4) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# proposals: selective search as a map over image shards
def propose_shard(
    shard: list[dict],
    *,
    mode: str,
    base_k: int,
    inc_k: int,
    sigma: float,
    min_width_px: int,
    resize_width_px: int,
    max_per_image: int,
) -> list[tuple]:
    """Selective search on each image of a shard -> [(image_id, boxes (N, 4), seconds)]."""
    from data.voc import load_image
    from stages.detection.proposals import selective_search_isolated

    out = []
    for row in shard:
        image = load_image(row["path"], (row["width"], row["height"]))
        t0 = time.perf_counter()
        boxes = selective_search_isolated(
            image,
            mode=mode,
            base_k=base_k,
            inc_k=inc_k,
            sigma=sigma,
            resize_width=resize_width_px or None,
            min_width_px=min_width_px,
            max_boxes=max_per_image or None,
        )
        out.append((row["image_id"], boxes, time.perf_counter() - t0))
    return out


def extract_proposals(
    ctx: StepContext,
    *,
    method: str,
    mode: str,
    base_k: int,
    inc_k: int,
    sigma: float,
    min_width_px: int,
    resize_width_px: int,
    max_per_image: int,
    precomputed_path: str,
    images_per_task: int,
) -> None:
    from data.proposals import read_precomputed_proposals
    from stages.detection.boxes import dedupe_boxes
    from stages.detection.proposals import proposals_table

    images = read_images(ctx.input_dir("dataset"), ref=ctx.input_file("dataset"))
    ids = [r["image_id"] for r in images]
    if method == "precomputed":
        if not precomputed_path:
            raise ValueError(
                "proposals.precomputed_path: required when proposals.method=precomputed"
            )
        sizes = {r["image_id"]: (r["width"], r["height"]) for r in images}
        # every box of the file is checked, not only the max_per_image kept: a box at 0 anywhere
        # means a 0-based file, whose kept boxes would be off by one pixel.
        by_id = read_precomputed_proposals(precomputed_path, image_ids=ids, image_sizes=sizes)
        # exact duplicates removed, best-ranked copy kept, as R-CNN's BoxRemoveDuplicates does
        # for its own proposals (a file may repeat a box; issue 21)
        boxes = [by_id[i][dedupe_boxes(by_id[i])][: max_per_image or None] for i in ids]
        seconds = [0.0] * len(ids)
    else:
        shards = [images[i : i + images_per_task] for i in range(0, len(images), images_per_task)]
        fn = functools.partial(
            propose_shard,
            mode=mode,
            base_k=base_k,
            inc_k=inc_k,
            sigma=sigma,
            min_width_px=min_width_px,
            resize_width_px=resize_width_px,
            max_per_image=max_per_image,
        )
        # memory: the helper process searching each task's largest image (issue 19)
        pixels = max(search_pixels(r["width"], r["height"], resize_width_px) for r in images)
        mb = memory_request_mb(proposals_task_bytes(pixels))
        done = map_with_memory(ctx, fn, shards, mb, "selective search")
        results = [r for shard in done for r in shard]
        by_id = {image_id: (b, s) for image_id, b, s in results}
        boxes = [by_id[i][0] for i in ids]
        seconds = [by_id[i][1] for i in ids]
    pq.write_table(proposals_table(ids, boxes), ctx.out_dir / "proposals.parquet")
    timing = pa.table(
        {
            "image_id": ids,
            "seconds": pa.array(seconds, pa.float64()),
            "num_proposals": pa.array([len(b) for b in boxes], pa.int32()),
        }
    )
    pq.write_table(timing, ctx.out_dir / "timing.parquet")


# ----------------------------------------------------------------------------------------------
# proposal_report: recall vs number of proposals (table + plot), proposals/image, s/image
def report_proposals(
    ctx: StepContext,
    *,
    test_split: str,
    recall_top_ns: tuple[int, ...],
    recall_ious: tuple[float, ...],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stages.detection.proposals import boxes_by_image
    from stages.detection.recall import mean_best_overlap, proposal_recall

    dataset_dir, prop_dir = ctx.input_dir("dataset"), ctx.input_dir("proposals")
    proposals = boxes_by_image(pq.read_table(prop_dir / "proposals.parquet"))
    timing = pq.read_table(prop_dir / "timing.parquet").to_pydict()
    gt = gt_boxes_by_image(dataset_dir, test_split)
    # only the counts an image can have: with 300 kept (proposals.max_per_image), recall "at
    # 500/1000/2000" repeated recall at 300 and drew a flat line to 2000 (issue 22)
    kept = max((len(proposals.get(k, ())) for k in gt), default=0)
    top_ns = tuple(n for n in recall_top_ns if n < kept) + ((kept,) if kept else ())
    rows = proposal_recall(
        gt,
        {k: proposals.get(k, np.zeros((0, 4))) for k in gt},
        iou_thresholds=recall_ious,
        top_ns=top_ns,
    )
    mabo = mean_best_overlap(gt, proposals)
    pq.write_table(pa.Table.from_pylist(rows), ctx.out_dir / "recall.parquet")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for iou in recall_ious:
        pts = [(r["top_n"], r["recall"]) for r in rows if r["iou"] == iou and r["top_n"]]
        ax.plot(*zip(*pts, strict=True), marker="o", label=f"IoU ≥ {iou}")
    ax.set(
        xscale="log",
        xlim=(min(top_ns, default=1) / 1.3, max(top_ns, default=1) * 1.3),
        xlabel=f"top proposals per image (all kept: up to {kept})",
        ylabel="recall of ground truth",
        ylim=(0, 1.02),
        title=f"Selective search recall ({test_split})",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(ctx.out_dir / "proposal_recall.png", dpi=120)
    plt.close(fig)

    secs = np.asarray(timing["seconds"], dtype=float)
    counts = np.asarray(timing["num_proposals"], dtype=float)
    metrics = {
        "proposals_per_image": float(counts.mean()) if len(counts) else 0.0,
        "proposal_seconds_per_image": float(secs.mean()) if len(secs) else 0.0,
        "proposal_mabo": mabo,
    }
    for r in rows:
        if r["top_n"] is None:
            metrics[f"proposal_recall_iou{r['iou']:g}"] = r["recall"]
    ctx.write_json("metrics.json", metrics)

    ious = sorted(set(recall_ious))
    lines = [
        "# R-CNN — region proposals",
        "",
        f"Selective search on the `{test_split}` split: {len(gt)} images, "
        f"{sum(len(v) for v in gt.values())} non-difficult ground-truth boxes.",
        "",
        f"- proposals per image: {metrics['proposals_per_image']:.0f} (paper: ≈2000 on VOC)",
        f"- seconds per image: {metrics['proposal_seconds_per_image']:.2f} "
        "(paper: ≈2 s per VOC image on a CPU)",
        f"- mean best overlap (MABO): {mabo:.3f}",
        "",
        "| proposals kept | " + " | ".join(f"recall @ IoU {t:g}" for t in ious) + " |",
        "|---:|" + "---:|" * len(ious),
    ]
    for n in [*top_ns, None]:
        vals = [next(r["recall"] for r in rows if r["top_n"] == n and r["iou"] == t) for t in ious]
        label = "all" if n is None else str(n)
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    lines += ["", "![recall vs proposals](proposal_recall.png)", ""]
    (ctx.out_dir / "report.md").write_text("\n".join(lines))
    (ctx.out_dir / "proposal_report.md").write_text("\n".join(lines))  # published by name
