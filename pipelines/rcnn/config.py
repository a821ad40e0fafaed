"""R-CNN's configuration: the frozen config dataclasses, whose defaults are the paper's setting
(section cited beside each field), and the named presets (small deltas of them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipelines.config import check


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
    # object classes of a data.root set (issue 20): ("auto",) = the names its split annotations
    # use (the devkit's order when they are all VOC classes, else sorted); ("voc",) = the 20 VOC
    # classes (the paper's, VOC2007); or an explicit list. A name outside an explicit list or
    # "voc" is an error naming the annotation file; metrics cover exactly these classes.
    classes: tuple[str, ...] = ("auto",)
    # > 0: no test split file needed; this fraction of train_split's images (drawn with data.seed)
    # becomes the test split "holdout" and data.test_split is not read
    holdout_fraction: float = 0.0
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
        check(len(self.classes) >= 1, "data.classes: expected auto, voc or a list of class names")
        check(
            len(self.classes) == 1 or not {"auto", "voc"} & set(self.classes),
            f"data.classes: auto and voc stand alone, got {','.join(self.classes)}",
        )
        dup = sorted({c for c in self.classes if self.classes.count(c) > 1})
        check(not dup, f"data.classes: {', '.join(dup)} listed more than once")
        check(  # as ssl/generalization: a key the source does not read is refused (issue 22)
            not self.root or self.source == "voc",
            f"data.root is only read by data.source=voc; data.source={self.source} would ignore "
            f"{self.root!r} (set data.source=voc to read it)",
        )
        check(
            0 <= self.holdout_fraction < 1,
            f"data.holdout_fraction must be in [0, 1), got {self.holdout_fraction}",
        )


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
            f"cnn.input_size must be {fixed.get(self.model)} for {self.model}, got "
            f"{self.input_size} (the CPU presets set 64 for rcnn_small: add "
            f"--set cnn.input_size={fixed.get(self.model)})",
        )
        check(0 <= self.padding < self.input_size // 2, "cnn.padding must be in [0, size/2)")
        check(
            len(self.small_widths) == 4 and all(w >= 1 for w in self.small_widths),
            f"cnn.small_widths must be 4 positive block widths, got {self.small_widths}",
        )

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
    num_workers: int = 1  # Ray Train workers (DDP); in the key: a gradient averaged over 2
    # workers' half batches rounds differently from one worker's whole batch
    # CPUs each worker holds on Ray (scheduling only, not in the key; capped at the largest
    # node's free CPUs)
    cpus_per_worker: float = 1
    # torch threads per worker: in the key, since float reductions split over threads round
    # differently (issue 22: 1 vs 2 threads moved tiny's mAP by 5 points)
    threads: int = 1
    seed: int = 0

    def __post_init__(self):
        check(self.epochs >= 1 and self.batch_size >= 1, "pretrain.epochs/batch_size must be >= 1")
        check(self.lr > 0, f"pretrain.lr must be > 0, got {self.lr}")
        check(self.num_workers >= 1, "pretrain.num_workers must be >= 1")
        check(self.cpus_per_worker >= 1, "pretrain.cpus_per_worker must be >= 1")
        check(self.threads >= 1, f"pretrain.threads must be >= 1, got {self.threads}")


@dataclass(frozen=True)
class FinetuneConfig:
    enabled: bool = True  # False: the "no fine-tuning" rows of Table 2
    iterations: int = 70_000  # released nets at 70k (code); gains saturate ≈40k
    batch_size: int = 128  # 32 foreground + 96 background windows (§2.3)
    lr: float = 0.001  # 1/10 of pretraining (§2.3)
    lr_step: int = 20_000  # ÷10 every 20k iterations (code)
    num_workers: int = 1
    cpus_per_worker: float = 1  # as pretrain.cpus_per_worker
    threads: int = 1  # as pretrain.threads
    seed: int = 0

    def __post_init__(self):
        check(self.iterations >= 1 and self.lr_step >= 1, "finetune.iterations/lr_step >= 1")
        check(self.cpus_per_worker >= 1, "finetune.cpus_per_worker must be >= 1")
        check(self.threads >= 1, f"finetune.threads must be >= 1, got {self.threads}")
        check(self.lr > 0, f"finetune.lr must be > 0, got {self.lr}")
        check(self.batch_size >= 4, "finetune.batch_size must be >= 4")
        check(self.num_workers >= 1, "finetune.num_workers must be >= 1")


@dataclass(frozen=True)
class FeatureConfig:
    images_per_shard: int = 8  # one Parquet shard per this many images, read alone
    dtype: Literal["float32", "float16"] = "float32"  # float16 halves the cache, slower reads
    # "pool5": cache pool5 only and recompute fc6/fc7 from it with the fine-tuned weights when
    # the SVMs / detection read them, as R-CNN's code did (VOC07 AlexNet, trainval + test, ≈2000
    # proposals per image: ≈740 GB instead of ≈1.07 TB for pool5 + fc7; the ≈200 GB this said
    # before was 3.7x off. `paperline plan rcnn --preset voc2007` computes it from the writer)
    cache: Literal["layers", "pool5"] = "layers"
    # Ray Data actors, each holding one CNN (one GPU each when present); 0 = auto: one per GPU of
    # the cluster, else all CPUs of the node but one (scheduling only, not in the key)
    num_actors: int = 0
    # crops per forward pass; 0 = 16 on a CPU in float32 (activations stay in cache: the CPU CNN
    # runs ~2.5x faster at 16 than at 256, benchmarks/bench_features.py), 64 on a CPU in bf16,
    # 256 on a GPU
    chunk: int = 0
    # "bf16": the CNN's forward pass under bfloat16 autocast (features still cached as float32):
    # on a GPU, and on CPUs with native bf16 (AVX512-BF16 / AMX) ≈1.5x the float32 step;
    # elsewhere on a CPU it is emulated and slower. Changes the features, so it is part of the key.
    amp: Literal["none", "bf16"] = "none"

    def __post_init__(self):
        check(
            self.images_per_shard >= 1 and self.num_actors >= 0 and self.chunk >= 0,
            "features.images_per_shard must be >= 1, features.num_actors >= 0 (0 = auto) and "
            "features.chunk >= 0",
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
    # other classes' gt boxes are negatives too, as R-CNN's sample_negative_features (it tests
    # only the overlap; the paper says "proposals"); false = proposals only (issue 21)
    gt_negatives: bool = True
    norm_sample_rows: int = 40_000  # rows sampled to measure the mean feature norm (code)
    seed: int = 0
    # feature shards mined in parallel per round against the models of the previous round; a
    # class retrains only at a round's end (code: after any image), so 1 is closest to the code
    round_shards: int = 1

    def __post_init__(self):
        check(self.round_shards >= 1, f"svm.round_shards must be >= 1, got {self.round_shards}")
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
    # rcnn_test.m: at most ceil(100000/2500) = 40 boxes per image of the test set per class before
    # NMS (the per-class score threshold that keeps the set's best 40·N); 0 = no cap
    max_per_set_per_image: int = 40

    def __post_init__(self):
        check(self.top_k >= 1 and 0 < self.nms_iou <= 1, "detect.top_k >= 1, nms_iou in (0, 1]")
        check(self.max_per_set_per_image >= 0, "detect.max_per_set_per_image must be >= 0")


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
    "pretrain.threads": 2,
    "finetune.threads": 2,
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
    "voc2007": {"data.source": "voc", "data.classes": ("voc",), "features.cache": "pool5"},
}
