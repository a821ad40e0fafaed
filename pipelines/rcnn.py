"""R-CNN — Girshick, Donahue, Darrell, Malik, "Rich feature hierarchies for accurate object detection
and semantic segmentation", CVPR 2014 (arXiv 1311.2524).

Steps: ``dataset`` → ``proposals`` (§2.1 selective search, fast mode) → ``proposal_report`` (recall
vs number of proposals) → ``pretrain`` → ``finetune`` (§2.3) → ``features`` (pool5/fc6/fc7 Parquet
cache) → ``svm`` (per class, hard negative mining, App. B) → ``bbox_regression`` (App. C) →
``detect`` (§2.2: top 100, NMS 0.3) → ``evaluate`` (VOC devkit AP) → ``region_features`` (§5) →
``report``. Config and the step graph live here; the step adaptors in ``rcnn_train.py``,
``rcnn_features.py``, ``rcnn_detect.py`` and ``rcnn_report.py``.

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

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.resources import Resources
from pipelines import rcnn_detect, rcnn_features, rcnn_report, rcnn_train
from pipelines.config import check
from pipelines.engine import Step, StepContext
from pipelines.rcnn_common import read_images
from pipelines.registry import PipelineSpec


# ----------------------------------------------------------------------------------------------
# Config: defaults are the paper's setting; presets are small deltas.
@dataclass(frozen=True)
class DataConfig:
    source: Literal["voc", "synthetic"] = "voc"  # §4.1: PASCAL VOC 2007
    root: str = ""  # VOC directory holding Annotations/, JPEGImages/, ImageSets/ (source=voc)
    train_split: str = "trainval"  # §4.1: train on VOC2007 trainval
    test_split: str = "test"
    max_images: int = 0  # per split, 0 = all; a slice for quick looks at a real dataset
    download: bool = False  # fetch VOC2007 via torchvision into data.root (needs internet)
    # generated set (source=synthetic): VOC-format shapes over natural-image backgrounds
    num_train: int = 40
    num_test: int = 20
    width_px: int = 320
    height_px: int = 240
    max_objects: int = 4
    seed: int = 0

    def __post_init__(self):
        check(self.max_images >= 0, f"data.max_images must be >= 0, got {self.max_images}")
        check(
            self.num_train > 0 and self.num_test > 0,
            f"data.num_train and data.num_test must be > 0, got {self.num_train}, {self.num_test}",
        )
        check(
            self.width_px >= 64 and self.height_px >= 64,
            f"data.width_px/height_px must be >= 64, got {self.width_px}x{self.height_px}",
        )
        check(self.max_objects >= 1, f"data.max_objects must be >= 1, got {self.max_objects}")


@dataclass(frozen=True)
class ProposalConfig:
    method: Literal["selective_search", "precomputed"] = "selective_search"  # §2.1
    # §2.1 selective search "fast mode" as R-CNN ran it: HSV + Lab, k ∈ {50, 100} with min size k,
    # two strategies. OpenCV's own "fast" differs (k ∈ {50, 100, 150}, min size 100): see
    # stages/detection/proposals.py.
    mode: Literal["rcnn", "fast", "quality", "single"] = "rcnn"
    base_k: int = 50
    inc_k: int = 50
    sigma: float = 0.8
    min_width_px: int = 20  # boxes narrower than 20 px are dropped (R-CNN code)
    resize_width_px: int = 0  # 0 = search at native size (PASCAL); 500 for ILSVRC-like images
    max_per_image: int = 0  # 0 = keep all (≈2000 per VOC image)
    precomputed_path: str = ""  # Parquet or selective-search .mat (method=precomputed)
    images_per_task: int = (
        4  # map-step shard size: small enough to balance, large enough to amortise
    )

    def __post_init__(self):
        check(self.base_k > 0 and self.inc_k >= 0, "proposals.base_k must be > 0, inc_k >= 0")
        check(self.sigma > 0, f"proposals.sigma must be > 0, got {self.sigma}")
        check(
            self.min_width_px >= 1, f"proposals.min_width_px must be >= 1, got {self.min_width_px}"
        )
        check(self.resize_width_px >= 0, "proposals.resize_width_px must be >= 0 (0 = none)")
        check(self.max_per_image >= 0, "proposals.max_per_image must be >= 0 (0 = all)")
        check(self.images_per_task >= 1, "proposals.images_per_task must be >= 1")


@dataclass(frozen=True)
class ReportConfig:
    recall_top_ns: tuple[int, ...] = (10, 50, 100, 200, 500, 1000, 2000)
    recall_ious: tuple[float, ...] = (0.5, 0.7)

    def __post_init__(self):
        check(all(n > 0 for n in self.recall_top_ns), "report.recall_top_ns must be positive")
        check(all(0 < t <= 1 for t in self.recall_ious), "report.recall_ious must be in (0, 1]")


@dataclass(frozen=True)
class CNNConfig:
    model: Literal["rcnn_alexnet", "rcnn_vgg16", "rcnn_small"] = "rcnn_alexnet"  # T-Net, §2.1
    input_size: int = 227  # AlexNet 227, VGG16 224 (fixed by the net); rcnn_small: multiple of 16
    padding: int = 16  # App. A: 16 warped pixels of context around each box
    # App. A: anisotropic "warp" (best, +3-5 mAP over the squares) or the tightest square with
    # context / with the mean outside the box
    warp: Literal["warp", "square_context", "square_mean"] = "warp"
    # rcnn_small only (not in the paper): conv block widths; narrow enough for a 2-core CPU
    small_widths: tuple[int, ...] = (16, 32, 64, 128)

    def __post_init__(self):
        fixed = {"rcnn_alexnet": 227, "rcnn_vgg16": 224}
        check(
            self.model not in fixed or self.input_size == fixed[self.model],
            f"cnn.input_size must be {fixed.get(self.model)} for {self.model}",
        )
        check(0 <= self.padding < self.input_size // 2, "cnn.padding must be in [0, size/2)")

    def model_kwargs(self) -> dict:
        if self.model == "rcnn_small":
            return {"input_size": self.input_size, "widths": self.small_widths}
        return {}


@dataclass(frozen=True)
class PretrainConfig:
    # §2.3: supervised pretraining on ILSVRC2012. Offline default: image-level classification of
    # the training split's object crops plus distractor background windows (class N).
    # local ImageNet weights for the net (a path, or "torchvision" = torchvision's weight cache
    # when the file is already there): skip our pretraining. Never downloaded.
    weights_path: str = ""
    image_folder: str = ""  # an ImageFolder (root/<class>/<image>) to pretrain on instead
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.01
    backgrounds_per_image: int = 4
    num_workers: int = 1  # Ray Train workers (DDP)
    # CPUs (= torch threads) each worker holds on Ray; capped at the largest node's CPUs
    cpus_per_worker: float = 1
    seed: int = 0

    def __post_init__(self):
        check(self.epochs >= 1 and self.batch_size >= 1, "pretrain.epochs/batch_size must be >= 1")
        check(self.lr > 0, f"pretrain.lr must be > 0, got {self.lr}")
        check(self.num_workers >= 1, "pretrain.num_workers must be >= 1")
        check(self.cpus_per_worker >= 1, "pretrain.cpus_per_worker must be >= 1")


@dataclass(frozen=True)
class FinetuneConfig:
    enabled: bool = True  # False: the "no fine-tuning" rows of Table 2
    iterations: int = 70_000  # released nets at 70k (code); gains saturate ≈40k
    batch_size: int = 128  # 32 foreground + 96 background windows (§2.3)
    lr: float = 0.001  # 1/10 of pretraining (§2.3)
    lr_step: int = 20_000  # ÷10 every 20k iterations (code)
    num_workers: int = 1
    cpus_per_worker: float = 1  # as pretrain.cpus_per_worker
    seed: int = 0

    def __post_init__(self):
        check(self.iterations >= 1 and self.lr_step >= 1, "finetune.iterations/lr_step >= 1")
        check(self.cpus_per_worker >= 1, "finetune.cpus_per_worker must be >= 1")
        check(self.lr > 0, f"finetune.lr must be > 0, got {self.lr}")
        check(self.batch_size >= 4, "finetune.batch_size must be >= 4")
        check(self.num_workers >= 1, "finetune.num_workers must be >= 1")


@dataclass(frozen=True)
class FeatureConfig:
    images_per_shard: int = 8  # one Parquet shard per this many images, read alone
    dtype: Literal["float32", "float16"] = "float32"  # float16 halves the cache, slower reads
    # "pool5": cache pool5 only and recompute fc6/fc7 from it with the fine-tuned weights when
    # the SVMs / detection read them, as R-CNN's code did (VOC07 AlexNet: ≈200 GB instead of
    # ≈1 TB for pool5 + fc7)
    cache: Literal["layers", "pool5"] = "layers"
    num_actors: int = 1  # Ray Data actors, each holding one CNN (one GPU each when present)
    # crops per forward pass; 0 = 16 on a CPU (activations stay in cache: the CPU CNN runs
    # ~2.5x faster at 16 than at 256, benchmarks/bench_features.py), 256 on a GPU
    chunk: int = 0

    def __post_init__(self):
        check(
            self.images_per_shard >= 1 and self.num_actors >= 1 and self.chunk >= 0,
            "features.images_per_shard/num_actors must be >= 1 and features.chunk >= 0",
        )


@dataclass(frozen=True)
class SVMConfig:
    layer: Literal["pool5", "fc6", "fc7"] = "fc7"  # §2.3: one linear SVM per class on fc7
    neg_iou: float = 0.3  # negatives: IoU < 0.3 with every gt of the class (grid-searched, §2.3)
    C: float = 0.001  # liblinear, features scaled to mean norm 20 (code)
    pos_weight: float = 2.0  # (code)
    bias_value: float = 10.0  # (code)
    mode: Literal["hnm", "all"] = "hnm"  # hard negative mining (App. B) or all negatives
    # "softmax": score with the fine-tuned net's (N+1)-way softmax instead (App. B comparison)
    scorer: Literal["svm", "softmax"] = "svm"
    norm_sample_rows: int = 40_000  # rows sampled to measure the mean feature norm (code)
    seed: int = 0

    def __post_init__(self):
        check(0 <= self.neg_iou <= 1, f"svm.neg_iou must be in [0, 1], got {self.neg_iou}")
        check(self.C > 0 and self.pos_weight > 0, "svm.C and svm.pos_weight must be > 0")
        check(self.norm_sample_rows >= 1, "svm.norm_sample_rows must be >= 1")


@dataclass(frozen=True)
class BBoxConfig:
    enabled: bool = True  # App. C: +3-4 mAP
    alpha: float = 1000.0  # ridge λ (App. C)
    min_iou: float = 0.6  # training pairs: proposals with IoU > 0.6 (App. C)

    def __post_init__(self):
        check(self.alpha > 0 and 0 <= self.min_iou < 1, "bbox.alpha > 0, bbox.min_iou in [0, 1)")


@dataclass(frozen=True)
class DetectConfig:
    top_k: int = 100  # per class per image before NMS (code)
    nms_iou: float = 0.3  # §2.2 greedy NMS threshold

    def __post_init__(self):
        check(self.top_k >= 1 and 0 < self.nms_iou <= 1, "detect.top_k >= 1, nms_iou in (0, 1]")


@dataclass(frozen=True)
class RCNNConfig:
    data: DataConfig = field(default_factory=DataConfig)
    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    cnn: CNNConfig = field(default_factory=CNNConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    svm: SVMConfig = field(default_factory=SVMConfig)
    bbox: BBoxConfig = field(default_factory=BBoxConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    # "table2": every row of the paper's Table 2 in one run, sharing common steps
    study: Literal["none", "table2"] = "none"
    table2_onet: bool = True  # the study's O-Net rows (a bigger net: VGG16, or rcnn_small ×2)


_SMALL_CPU = {  # the small CNN and short schedules that fit a 2-core CPU
    "cnn.model": "rcnn_small",
    "cnn.input_size": 64,
    "cnn.padding": 4,  # 16/227 of the warped side, scaled to 64 px
    "pretrain.epochs": 30,
    "pretrain.lr": 0.05,
    "pretrain.batch_size": 64,
    "finetune.iterations": 400,
    "finetune.lr": 0.01,
    "finetune.lr_step": 300,
    "svm.norm_sample_rows": 5000,
    "proposals.max_per_image": 300,  # "a few hundred proposals per image"
    "features.num_actors": 2,
    # a training worker uses both cores of a small machine: 1 thread made Ray's fine-tuning
    # ~2x slower than in-process (benchmarks/bench_engine.py)
    "pretrain.cpus_per_worker": 2,
    "finetune.cpus_per_worker": 2,
}
PRESETS = {
    # generated VOC-format set; a few minutes on 2 cores (`make demo`)
    "tiny": {**_SMALL_CPU, "data.source": "synthetic", "data.num_train": 40, "data.num_test": 20},
    # the same at the size the test suite affords
    "ci": {
        **_SMALL_CPU,
        "data.source": "synthetic",
        "data.num_train": 16,
        "data.num_test": 8,
        "data.width_px": 240,
        "data.height_px": 180,
        "proposals.images_per_task": 2,
        "proposals.max_per_image": 150,
        "pretrain.epochs": 20,
        "finetune.iterations": 150,
        "finetune.lr_step": 100,
        "features.images_per_shard": 4,
    },
    # Table 2's rows (pool5/fc6/fc7 × fine-tuning, + bbox regression) on the tiny set, one table
    "table2": {
        **_SMALL_CPU,
        "data.source": "synthetic",
        "data.num_train": 40,
        "data.num_test": 20,
        "study": "table2",
    },
    # real VOC2007 at --set data.root=...; AlexNet as in the paper, on a GPU cluster
    "voc2007": {"data.source": "voc", "features.cache": "pool5"},
}


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
) -> None:
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
        voc_root, classes = ctx.out_dir / "voc", SHAPE_CLASSES
    else:
        if not root:
            raise ValueError("data.root: set it to a VOC directory (…/VOCdevkit/VOC2007)")
        voc_root, classes = Path(root).expanduser().resolve(), voc.VOC_CLASSES
        if download and not (voc_root / "Annotations").exists():
            _download_voc2007(voc_root)
    image_rows, tables = [], []
    for split in (train_split, test_split):
        images = voc.read_voc(voc_root, split, classes=classes)
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
        image = load_image(row["path"])
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
    from stages.detection.proposals import proposals_table

    images = read_images(ctx.input_dir("dataset"))
    ids = [r["image_id"] for r in images]
    if method == "precomputed":
        if not precomputed_path:
            raise ValueError(
                "proposals.precomputed_path: required when proposals.method=precomputed"
            )
        by_id = read_precomputed_proposals(precomputed_path, image_ids=ids)
        boxes = [by_id[i][: max_per_image or None] for i in ids]
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
        results = [r for shard in ctx.map(fn, shards, desc="selective search") for r in shard]
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
    rows = proposal_recall(
        gt,
        {k: proposals.get(k, np.zeros((0, 4))) for k in gt},
        iou_thresholds=recall_ious,
        top_ns=recall_top_ns,
    )
    mabo = mean_best_overlap(gt, proposals)
    pq.write_table(pa.Table.from_pylist(rows), ctx.out_dir / "recall.parquet")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for iou in recall_ious:
        pts = [(r["top_n"], r["recall"]) for r in rows if r["iou"] == iou and r["top_n"]]
        ax.plot(*zip(*pts, strict=True), marker="o", label=f"IoU ≥ {iou}")
    ax.set(
        xscale="log",
        xlabel="proposals kept per image",
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
    for n in [*recall_top_ns, None]:
        vals = [next(r["recall"] for r in rows if r["top_n"] == n and r["iou"] == t) for t in ious]
        label = "all" if n is None else str(n)
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    lines += ["", "![recall vs proposals](proposal_recall.png)", ""]
    (ctx.out_dir / "report.md").write_text("\n".join(lines))
    (ctx.out_dir / "proposal_report.md").write_text("\n".join(lines))  # published by name


# ----------------------------------------------------------------------------------------------
def _warp_param(c: CNNConfig) -> dict:
    # only when not the default, so that keys of runs made before the option existed stay valid
    return {} if c.warp == "warp" else {"warp": c.warp}


class _Builder:
    """Step factories for the detector; variants (Table 2) reuse them with other names/inputs."""

    def __init__(self, cfg: RCNNConfig, test_split: str):
        self.cfg, self.test_split = cfg, test_split

    def pretrain(self, name: str = "pretrain", cnn: CNNConfig | None = None) -> Step:
        c, pt = cnn or self.cfg.cnn, self.cfg.pretrain
        params = dict(
            model=c.model,
            model_kwargs=c.model_kwargs(),
            padding=c.padding,
            weights_path=pt.weights_path,
            epochs=pt.epochs,
            batch_size=pt.batch_size,
            lr=pt.lr,
            backgrounds_per_image=pt.backgrounds_per_image,
            seed=pt.seed,
            **_warp_param(c),
            **({"image_folder": pt.image_folder} if pt.image_folder else {}),
        )
        return Step(
            name,
            functools.partial(rcnn_train.pretrain, num_workers=pt.num_workers),
            kind="train",
            inputs=("dataset",),
            resources=Resources(cpus=pt.cpus_per_worker, gpus="auto"),
            params=params,
            stage="pretrain",
            description="supervised pretraining (image-level labels)",
        )

    def finetune(
        self, name: str = "finetune", pretrain: str = "pretrain", enabled: bool | None = None
    ) -> Step:
        c, ft = self.cfg.cnn, self.cfg.finetune
        enabled = ft.enabled if enabled is None else enabled
        params = dict(
            enabled=True,
            padding=c.padding,
            iterations=ft.iterations,
            batch_size=ft.batch_size,
            lr=ft.lr,
            lr_step=ft.lr_step,
            seed=ft.seed,
            **_warp_param(c),
        )
        return Step(
            name,
            functools.partial(rcnn_train.finetune, num_workers=ft.num_workers),
            kind="train",
            inputs=("dataset", "proposals", f"pretrain={pretrain}"),
            resources=Resources(cpus=ft.cpus_per_worker, gpus="auto"),
            stage="finetune",
            params=params if enabled else dict(enabled=False),
            description="(N+1)-way fine-tuning on warped proposals, 32 fg + 96 bg",
        )

    def features(
        self,
        name: str = "features",
        finetune: str = "finetune",
        layers: tuple[str, ...] | None = None,
    ) -> Step:
        f, s, b = self.cfg.features, self.cfg.svm, self.cfg.bbox
        if f.cache == "pool5":
            layers = ("pool5",)
        layers = layers or tuple(sorted({s.layer, "pool5"} if b.enabled else {s.layer}))
        fn = functools.partial(
            rcnn_features.extract_features,
            images_per_shard=f.images_per_shard,
            num_actors=f.num_actors,
            chunk=f.chunk,
        )
        return Step(
            name,
            fn,
            kind="infer",
            stage="features",
            inputs=("dataset", "proposals", f"finetune={finetune}"),
            resources=Resources(cpus=1, gpus="auto"),
            params=dict(
                layers=layers,
                padding=self.cfg.cnn.padding,
                dtype=f.dtype,
                **_warp_param(self.cfg.cnn),
            ),
            description="CNN features of every box → Parquet feature cache",
        )

    def svm(
        self,
        name: str = "svm",
        features: str = "features",
        layer: str | None = None,
        finetune: str = "finetune",
    ) -> Step:
        s = self.cfg.svm
        params = dict(
            layer=layer or s.layer,
            neg_iou=s.neg_iou,
            C=s.C,
            pos_weight=s.pos_weight,
            bias_value=s.bias_value,
            mode=s.mode,
            norm_sample_rows=s.norm_sample_rows,
            seed=s.seed,
        )
        inputs: tuple[str, ...] = ("dataset", f"features={features}")
        if s.scorer == "softmax":  # no SVM training: fc8 of the fine-tuned net scores
            params = dict(layer=layer or s.layer, scorer="softmax")
        if s.scorer == "softmax" or self.cfg.features.cache == "pool5":
            inputs += (f"finetune={finetune}",)  # its fc6/fc7/fc8 weights are needed
        return Step(
            name,
            rcnn_detect.train_svms,
            kind="map",
            stage="svm",
            inputs=inputs,
            params=params,
            description="per-class linear SVMs with hard negative mining",
        )

    def bbox(self, name: str = "bbox_regression", features: str = "features") -> Step:
        b, s = self.cfg.bbox, self.cfg.svm
        return Step(
            name,
            rcnn_detect.train_box_regressors,
            kind="map",
            stage="bbox_regression",
            inputs=("dataset", f"features={features}"),
            params=dict(
                alpha=b.alpha, min_iou=b.min_iou, norm_sample_rows=s.norm_sample_rows, seed=s.seed
            ),
            description="per-class ridge regression of box corrections",
        )

    def detect(
        self,
        name: str = "detect",
        features: str = "features",
        svm: str = "svm",
        bbox: str | None = None,
        layer: str | None = None,
        finetune: str = "finetune",
    ) -> Step:
        det = self.cfg.detect
        inputs = ("dataset", f"features={features}", f"svm={svm}")
        if bbox:
            inputs += (f"bbox_regression={bbox}",)
        if self.cfg.features.cache == "pool5":  # fc6/fc7 recomputed from pool5
            inputs += (f"finetune={finetune}",)
        return Step(
            name,
            rcnn_detect.detect,
            kind="map",
            stage="detect",
            inputs=inputs,
            params=dict(
                layer=layer or self.cfg.svm.layer,
                use_bbox_regression=bool(bbox),
                top_k=det.top_k,
                nms_iou=det.nms_iou,
            ),
            description="score proposals, top-k, bbox regression, per-class NMS",
        )

    def evaluate(self, name: str = "evaluate", detect: str = "detect") -> Step:
        return Step(
            name,
            rcnn_detect.evaluate,
            kind="task",
            stage="evaluate",
            inputs=("dataset", f"detect={detect}"),
            params=dict(test_split=self.test_split),
            description="VOC devkit AP",
        )


def detector_steps(cfg: RCNNConfig, test_split: str) -> list[Step]:
    """The detector of the paper's main result: fc7 SVMs (+ bbox regression)."""
    b = _Builder(cfg, test_split)
    bbox = cfg.bbox.enabled
    return [
        b.pretrain(),
        b.finetune(),
        b.features(),
        b.svm(),
        *([b.bbox()] if bbox else []),
        b.detect(bbox="bbox_regression" if bbox else None),
        b.evaluate(),
        Step(
            "region_features",
            rcnn_report.region_features,
            kind="task",
            inputs=("dataset", "finetune"),
            params=dict(padding=cfg.cnn.padding, C=1.0),
            description="§5: full / fg / full+fg region features, per-class accuracy",
        ),
        Step(
            "report",
            rcnn_report.write_report,
            kind="task",
            inputs=("dataset", "detect", "evaluate", "proposal_report", "region_features"),
            params=dict(layer=cfg.svm.layer, finetuned=cfg.finetune.enabled, bbox_regression=bbox),
            publish=(
                "report.md",
                "detections.parquet",
                "precision_recall.png",
                "detections.png",
                "proposal_recall.png",
            ),
            description="report.md with tables and figures",
        ),
    ]


TABLE2_LAYERS = ("pool5", "fc6", "fc7")


def table2_steps(cfg: RCNNConfig, test_split: str) -> list[Step]:
    """Table 2 of the paper on this dataset: pool5/fc6/fc7 without and with fine-tuning, fc7 +
    bbox regression (and O-Net rows when the net is AlexNet). Proposals, pretraining and each
    feature cache are computed once and shared by every row."""
    b = _Builder(cfg, test_split)
    out = [
        b.pretrain(),
        b.finetune("finetune", enabled=True),
        b.finetune("finetune-none", enabled=False),
    ]
    rows: list[tuple[str, str]] = []  # (row label, evaluate step)
    for ft, label in (("none", "no fine-tuning"), ("ft", "fine-tuned")):
        feats = f"features-{ft}"
        out.append(b.features(feats, "finetune" if ft == "ft" else "finetune-none", TABLE2_LAYERS))
        tuned = "finetune" if ft == "ft" else "finetune-none"
        for layer in TABLE2_LAYERS:
            tag = f"{layer}-{ft}"
            out += [
                b.svm(f"svm-{tag}", feats, layer, finetune=tuned),
                b.detect(f"detect-{tag}", feats, f"svm-{tag}", layer=layer, finetune=tuned),
                b.evaluate(f"evaluate-{tag}", f"detect-{tag}"),
            ]
            rows.append((f"T-Net {layer}, {label}", f"evaluate-{tag}"))
    out += [
        b.bbox("bbox_regression-ft", "features-ft"),
        b.detect("detect-fc7-ft-bb", "features-ft", "svm-fc7-ft", "bbox_regression-ft", "fc7"),
        b.evaluate("evaluate-fc7-ft-bb", "detect-fc7-ft-bb"),
    ]
    rows.append(("T-Net fc7, fine-tuned + bbox reg", "evaluate-fc7-ft-bb"))
    onet, star = None, ""
    if cfg.table2_onet and cfg.cnn.model == "rcnn_alexnet":  # O-Net = VGG16 (§3.3)
        onet = CNNConfig(model="rcnn_vgg16", input_size=224, padding=cfg.cnn.padding)
    elif cfg.table2_onet and cfg.cnn.model == "rcnn_small":
        # VGG16 is far too slow for a CPU preset: the bigger net is rcnn_small at twice the widths
        # (marked O-Net* in the table)
        widths = tuple(2 * w for w in cfg.cnn.small_widths)
        onet = dataclasses.replace(cfg.cnn, small_widths=widths)
        star = "*"
    if onet is not None:
        out += [
            b.pretrain("pretrain-onet", onet),
            b.finetune("finetune-onet", "pretrain-onet", enabled=True),
            b.features("features-onet", "finetune-onet", ("fc7", "pool5")),
            b.svm("svm-fc7-onet", "features-onet", "fc7", finetune="finetune-onet"),
            b.detect(
                "detect-fc7-onet",
                "features-onet",
                "svm-fc7-onet",
                layer="fc7",
                finetune="finetune-onet",
            ),
            b.evaluate("evaluate-fc7-onet", "detect-fc7-onet"),
            b.bbox("bbox_regression-onet", "features-onet"),
            b.detect(
                "detect-fc7-onet-bb",
                "features-onet",
                "svm-fc7-onet",
                "bbox_regression-onet",
                "fc7",
                finetune="finetune-onet",
            ),
            b.evaluate("evaluate-fc7-onet-bb", "detect-fc7-onet-bb"),
        ]
        rows += [
            (f"O-Net{star} fc7, fine-tuned", "evaluate-fc7-onet"),
            (f"O-Net{star} fc7, fine-tuned + bbox reg", "evaluate-fc7-onet-bb"),
        ]
    out.append(
        Step(
            "table2",
            functools.partial(rcnn_report.write_table2, rows=[r for r, _ in rows]),
            kind="task",
            inputs=tuple(f"row{i}={e}" for i, (_, e) in enumerate(rows)),
            publish=("table2.md", "table2.json"),
            description="one table: mAP per row, next to the paper's",
        )
    )
    return out


def steps(cfg: RCNNConfig) -> list[Step]:
    d, p, r = cfg.data, cfg.proposals, cfg.report
    if d.source == "synthetic":  # fields that don't change the generated set's bytes stay out
        data_params = dict(
            source=d.source,
            root="",
            train_split="trainval",
            test_split="test",
            max_images=d.max_images,
            download=False,
            num_train=d.num_train,
            num_test=d.num_test,
            width_px=d.width_px,
            height_px=d.height_px,
            max_objects=d.max_objects,
            seed=d.seed,
        )
    else:
        data_params = dict(
            source=d.source,
            root=d.root,
            train_split=d.train_split,
            test_split=d.test_split,
            max_images=d.max_images,
            download=d.download,
            num_train=0,
            num_test=0,
            width_px=0,
            height_px=0,
            max_objects=0,
            seed=0,
        )
    proposal_params = dict(
        method=p.method,
        mode=p.mode,
        base_k=p.base_k,
        inc_k=p.inc_k,
        sigma=p.sigma,
        min_width_px=p.min_width_px,
        resize_width_px=p.resize_width_px,
        max_per_image=p.max_per_image,
        precomputed_path=p.precomputed_path,
    )
    if p.method == "precomputed":
        proposal_params.update(mode="", base_k=0, inc_k=0, sigma=0.0, resize_width_px=0)
    return [
        Step(
            "dataset",
            make_dataset,
            kind="task",
            params=data_params,
            description="read (or generate) the VOC-format dataset; index tables",
        ),
        # shard size changes scheduling, not results: kept out of the hashed params
        Step(
            "proposals",
            functools.partial(extract_proposals, images_per_task=p.images_per_task),
            kind="map",
            inputs=("dataset",),
            params=proposal_params,
            resources=Resources(cpus=1),
            description="selective search, one task per image shard",
        ),
        Step(
            "proposal_report",
            report_proposals,
            kind="task",
            inputs=("dataset", "proposals"),
            params=dict(
                test_split=data_params["test_split"],
                recall_top_ns=r.recall_top_ns,
                recall_ious=r.recall_ious,
            ),
            publish=("proposal_recall.png", "recall.parquet", "proposal_report.md"),
            description="recall vs number of proposals, timing",
        ),
        *(table2_steps if cfg.study == "table2" else detector_steps)(
            cfg, data_params["test_split"]
        ),
    ]


PIPELINE = PipelineSpec(
    name="rcnn",
    summary="R-CNN (Girshick et al. 2014): selective search → CNN features → SVMs → VOC mAP",
    config=RCNNConfig,
    presets=PRESETS,
    default_preset="tiny",
    steps=steps,
    metric="mAP_voc07",
)
