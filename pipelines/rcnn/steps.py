"""R-CNN's step graph: ``steps(cfg)`` turns the config into the dataset and proposal steps, then
one of the two graphs built from the step factories (``_Builder``): the detector of the paper's main
result or the Table 2 study."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from cluster.resources import Resources
from pipelines.config import ConfigError, data_paths_are_local
from pipelines.engine import Step

# the adaptor modules under aliases: the step factories below have arguments named `detect`, ...
from pipelines.rcnn import detect as rcnn_detect
from pipelines.rcnn import features as rcnn_features
from pipelines.rcnn import report as rcnn_report
from pipelines.rcnn import train as rcnn_train
from pipelines.rcnn.config import CNNConfig, DataConfig, RCNNConfig
from pipelines.rcnn.data import HOLDOUT_SPLIT, extract_proposals, make_dataset, report_proposals


# ----------------------------------------------------------------------------------------------
def _warp_param(c: CNNConfig) -> dict:
    # only when not the default, so that keys of runs made before the option existed stay valid
    return {} if c.warp == "warp" else {"warp": c.warp}


def feature_actors(requested: int, *, cluster_gpus: float, cpus: int, shards: int) -> int:
    """``features.num_actors``: a number is kept; 0 ("auto") gives one actor per GPU of the
    cluster (each actor holds one, ``gpus="auto"``), else a pool of all CPUs but one (left to
    the driver and Ray Data's reads and writes), never more actors than shards to process. The
    count schedules work only: it is bound outside the step's key and never changes the bytes."""
    if requested:
        return requested
    pool = int(cluster_gpus) if cluster_gpus >= 1 else cpus - 1
    return max(1, min(pool, shards))


def _extract_features_sized(ctx, *, num_actors: int, images_per_shard: int, **params) -> None:
    """``extract_features`` with ``features.num_actors=0`` resolved on the cluster the step runs
    on: its GPUs (an executor that has ``cluster_gpus``, i.e. Ray), else this node's CPUs."""
    import os

    import pyarrow.parquet as pq

    images = pq.ParquetFile(ctx.input_dir("dataset") / "images.parquet").metadata.num_rows
    num_actors = feature_actors(
        num_actors,
        cluster_gpus=getattr(ctx.executor, "cluster_gpus", lambda: 0.0)(),
        cpus=len(os.sched_getaffinity(0)),
        shards=-(-images // images_per_shard),
    )
    rcnn_features.extract_features(
        ctx, num_actors=num_actors, images_per_shard=images_per_shard, **params
    )


class _Builder:
    """Step factories for the detector; variants (Table 2) reuse them with other names/inputs."""

    def __init__(self, cfg: RCNNConfig, test_split: str):
        self.cfg, self.test_split = cfg, test_split

    def pretrain(self, name: str = "pretrain", cnn: CNNConfig | None = None) -> list[Step]:
        """The pretraining step, after the step writing its crops (``pretrain_crops<suffix>``)
        unless it loads ImageNet weights."""
        c, pt = cnn or self.cfg.cnn, self.cfg.pretrain
        crops = name.replace("pretrain", "pretrain_crops", 1)
        crop_step = Step(
            crops,
            rcnn_train.pretrain_crops,
            kind="task",
            inputs=("dataset",),
            params=dict(
                model=c.model,
                model_kwargs=c.model_kwargs(),
                padding=c.padding,
                backgrounds_per_image=pt.backgrounds_per_image,
                seed=pt.seed,
                **_warp_param(c),
                **({"image_folder": pt.image_folder} if pt.image_folder else {}),
            ),
            stage="pretrain_crops",
            description="pretraining crops (objects + distractors) → .npy shards",
        )
        params = dict(
            model=c.model,
            model_kwargs=c.model_kwargs(),
            weights_path=pt.weights_path,
            epochs=pt.epochs,
            batch_size=pt.batch_size,
            lr=pt.lr,
            seed=pt.seed,
            # data-parallel workers change the result (issue 22): in the key when not 1
            **({"num_workers": pt.num_workers} if pt.num_workers != 1 else {}),
        )
        step = Step(
            name,
            rcnn_train.pretrain,
            kind="train",
            # the workers read the crops through a reference to their artifact (issue 19)
            inputs=() if pt.weights_path else (f"crops={crops}",),
            resources=Resources(cpus=pt.cpus_per_worker, gpus="auto", torch_threads=pt.threads),
            params=params,
            # 2: torchvision weights get their input preprocessing folded into conv1 (a model.pt
            # made from them before is wrong)
            version="2" if pt.weights_path else "1",
            stage="pretrain",
            description="supervised pretraining (image-level labels)",
        )
        return [step] if pt.weights_path else [crop_step, step]

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
            **({"num_workers": ft.num_workers} if ft.num_workers != 1 else {}),
        )
        return Step(
            name,
            rcnn_train.finetune,
            kind="train",
            inputs=("dataset", "proposals", f"pretrain={pretrain}"),
            resources=Resources(
                cpus=ft.cpus_per_worker, gpus="auto", torch_threads=ft.threads if enabled else 0
            ),
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
            _extract_features_sized,
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
                # only when set, so that keys of runs made before the option existed stay valid
                **({"amp": f.amp} if f.amp != "none" else {}),
            ),
            description="CNN features of every box → Parquet feature cache",
        )

    def svm(
        self,
        name: str = "svm",
        features: str = "features",
        layer: str | None = None,
        finetune: str = "finetune",
        neg_iou: float | None = None,
    ) -> Step:
        s = self.cfg.svm
        params = dict(
            layer=layer or s.layer,
            neg_iou=s.neg_iou,
            C=s.C,
            pos_weight=s.pos_weight,
            bias_value=s.bias_value,
            mode=s.mode,
            gt_negatives=s.gt_negatives,
            norm_sample_rows=s.norm_sample_rows,
            seed=s.seed,
            round_shards=s.round_shards,
        )
        if neg_iou is not None:  # a Table 2 study row of §2.3's grid search
            params["neg_iou"] = neg_iou
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
            resources=self._head_resources(layer or s.layer),
            description="per-class linear SVMs with hard negative mining",
        )

    def _head_resources(self, layer: str) -> Resources:
        """A GPU for each map task when fc6/fc7 are recomputed from cached pool5 (`Pool5Head`)
        and the cluster has or can start one (issue 19); one CPU otherwise."""
        recompute = self.cfg.features.cache == "pool5" and layer != "pool5"
        return Resources(cpus=1, gpus="auto") if recompute else Resources(cpus=1)

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
            # 2: a proposal trains only the class of the gt it overlaps most (App. C); 3: gt rows
            # train too, as rcnn_train_bbox_regressor.m (issue 21)
            version="3",
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
                max_per_set_per_image=det.max_per_set_per_image,
            ),
            resources=self._head_resources(layer or self.cfg.svm.layer),
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
        *b.pretrain(),
        b.finetune(),
        b.features(),
        b.svm(),
        *([b.bbox()] if bbox else []),
        b.detect(bbox="bbox_regression" if bbox else None),
        # the same detector without box regression: the report's paired App. C claim
        *([b.detect("detect-nobb")] if bbox else []),
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
            inputs=("dataset", "detect", "evaluate", "proposal_report", "region_features")
            + (("detect_nobb=detect-nobb",) if bbox else ()),
            params=dict(layer=cfg.svm.layer, finetuned=cfg.finetune.enabled, bbox_regression=bbox),
            # 2: first line says when the data is generated; §5 may be skipped; 3: claims.json;
            # 4: detections grid with ground truth and true/false positives (issue 22)
            version="4",
            publish=(
                "report.md",
                "claims.json",
                "detections.parquet",
                "precision_recall.png",
                "detections.png",
                "proposal_recall.png",
            ),
            description="report.md with tables and figures",
        ),
    ]


TABLE2_LAYERS = ("pool5", "fc6", "fc7")
NEG_IOU_GRID = (0.0, 0.5)  # §2.3 / App. B: the grid's ends, beside the configured svm.neg_iou


def table2_steps(cfg: RCNNConfig, test_split: str) -> list[Step]:
    """Table 2 of the paper on this dataset: pool5/fc6/fc7 without and with fine-tuning, fc7 +
    bbox regression (and O-Net rows when the net is AlexNet). Proposals, pretraining and each
    feature cache are computed once and shared by every row."""
    b = _Builder(cfg, test_split)
    out = [
        *b.pretrain(),
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
    if cfg.svm.scorer == "svm":  # §2.3's grid search: 0.3 chosen, 0 costs ≈4 mAP, 0.5 ≈5
        for neg in (v for v in NEG_IOU_GRID if v != cfg.svm.neg_iou):
            tag = f"fc7-ft-neg{neg:g}"
            out += [
                b.svm(f"svm-{tag}", "features-ft", "fc7", finetune="finetune", neg_iou=neg),
                b.detect(f"detect-{tag}", "features-ft", f"svm-{tag}", layer="fc7"),
                b.evaluate(f"evaluate-{tag}", f"detect-{tag}"),
            ]
            rows.append((f"T-Net fc7, fine-tuned, svm.neg_iou={neg:g}", f"evaluate-{tag}"))
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
            *b.pretrain("pretrain-onet", onet),
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
            inputs=(
                "dataset",
                *(f"row{i}={e}" for i, (_, e) in enumerate(rows)),
                *(
                    f"det{i}={e.replace('evaluate-', 'detect-', 1)}"
                    for i, (_, e) in enumerate(rows)
                ),
            ),
            params=dict(neg_iou=cfg.svm.neg_iou),
            version="2",  # claims with image-bootstrap intervals, §2.3's neg_iou rows
            publish=("table2.md", "table2.json", "claims.json"),
            description="one table: mAP per row, next to the paper's",
        )
    )
    return out


def require_voc_root(d: DataConfig) -> None:
    """A real VOC-format source needs its directory before any step runs (the `voc2007` preset
    never falls back to generated data): `paperline run` exits 2 naming data.root."""
    if d.download:
        return
    if not d.root:
        raise ConfigError(
            "data.root is not set: data.source=voc reads a VOC-format directory (Annotations/, "
            "JPEGImages/, ImageSets/Main/) — set data.root=/path/VOCdevkit/VOC2007 (or your own "
            "set), or use --preset tiny for the generated set"
        )
    root = Path(d.root).expanduser()
    if not data_paths_are_local():
        return
    if not root.is_dir():
        raise ConfigError(f"data.root: {d.root} is not a directory; expected a VOC-format set")
    main = root / "ImageSets" / "Main"
    needed = [("data.train_split", d.train_split)]
    if d.holdout_fraction == 0:
        needed.append(("data.test_split", d.test_split))
    for key, split in needed:
        if not (main / f"{split}.txt").is_file():
            found = sorted(p.stem for p in main.glob("*.txt") if "_" not in p.stem)
            raise ConfigError(
                f"{key}={split}: {main / f'{split}.txt'} not found (splits present: "
                f"{', '.join(found) or 'none'}); a set without a test split can take "
                "data.test_split=val or data.holdout_fraction=0.2 (seeded by data.seed)"
            )


def voc_fingerprint(root: str) -> str:
    """sha256 of what the dataset step reads from a VOC directory: every split file and annotation
    (bytes), and every image and instance mask (name, size, mtime — hashing JPEG bytes would cost
    seconds per run on VOC2007). The dataset step's key holds it, so an edited annotation, split
    or image gives new tables instead of the stale ones of the same root (issue 21)."""
    import hashlib

    h = hashlib.sha256()
    base = Path(root).expanduser()
    for sub, content in (("ImageSets/Main", True), ("Annotations", True),
                         ("JPEGImages", False), ("SegmentationObject", False)):  # fmt: skip
        folder = base / sub
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            if not f.is_file():
                continue
            h.update(f"{sub}/{f.name}\0".encode())
            if content:
                h.update(f.read_bytes())
            else:
                st = f.stat()
                h.update(f"{st.st_size}:{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def _make_dataset_keyed(ctx, *, fingerprint: str = "", **params) -> None:
    """``make_dataset``; ``fingerprint`` is only there to key the step on the files' contents."""
    make_dataset(ctx, **params)


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
        require_voc_root(d)
        holdout = d.holdout_fraction > 0
        data_params = dict(
            source=d.source,
            root=d.root,
            train_split=d.train_split,
            test_split=HOLDOUT_SPLIT if holdout else d.test_split,
            max_images=d.max_images,
            download=d.download,
            num_train=0,
            num_test=0,
            width_px=0,
            height_px=0,
            max_objects=0,
            seed=d.seed if holdout else 0,
            classes=d.classes,
            **({"holdout_fraction": d.holdout_fraction} if holdout else {}),
        )
    if d.source != "synthetic" and d.root and data_paths_are_local() and Path(d.root).is_dir():
        data_params["fingerprint"] = voc_fingerprint(d.root)
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
            _make_dataset_keyed,
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
            # 2: precomputed proposals de-duplicated (issue 21); selective search keys unchanged
            version="2" if p.method == "precomputed" else "1",
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
            version="2",  # 2: recall only up to the proposals kept per image (issue 22)
            description="recall vs number of proposals, timing",
        ),
        *(table2_steps if cfg.study == "table2" else detector_steps)(
            cfg, data_params["test_split"]
        ),
    ]
