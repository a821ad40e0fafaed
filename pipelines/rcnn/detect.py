"""R-CNN detector steps after the features: per-class SVMs with hard negative mining, bbox
regression, detection (scoring, NMS) and VOC evaluation. Config lives in ``config.py``; every
function here takes explicit arguments."""

from __future__ import annotations

import functools

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
from pipelines.rcnn.features import _identity, feature_shards, layer_source


# ----------------------------------------------------------------------------------------------
# svm: one linear SVM per class with hard negative mining (§2.3, App. B), a map over classes
def _train_class_svm(
    class_index: int,
    *,
    shards: list[str],
    scale: float,
    neg_iou: float,
    C: float,
    pos_weight: float,
    bias_value: float,
    mode: str,
    gt_negatives: bool = False,
    transform=_identity,
) -> dict:
    from stages.detection.features import iter_feature_shards
    from stages.detection.svm import HardNegativeSVM, negative_mask, positive_mask

    cols = ["image_ids", "box_index", "is_gt", "gt_class", "max_iou", "features"]
    positives = [
        transform(s["features"][positive_mask(s["gt_class"], s["is_gt"], class_index)]) * scale
        for s in iter_feature_shards(shards, cols)
    ]
    positives = np.concatenate(positives)
    if not len(positives):  # e.g. data.max_images left no object of this class in training:
        # no SVM, so no detections of the class (its AP is 0 where the test set has some)
        dim = positives.shape[1]
        return {"coef": np.zeros(dim, np.float32), "intercept": 0.0, "positives": 0, "cache": 0,
                "retrains": 0, "trained": False}  # fmt: skip

    def negatives():  # streamed shard by shard: memory stays bounded by the mining cache
        image_number = 0
        for s in iter_feature_shards(shards, cols):
            neg = negative_mask(s["max_iou"][:, class_index], s["is_gt"], neg_iou, gt_negatives)
            ids = s["image_ids"]
            for image_id in dict.fromkeys(ids):
                rows = np.nonzero((ids == image_id) & neg)[0]
                keys = image_number * (1 << 20) + s["box_index"][rows].astype(np.int64)
                yield keys, transform(s["features"][rows]) * scale
                image_number += 1

    svm = HardNegativeSVM(C=C, pos_weight=pos_weight, bias_value=bias_value, mode=mode)
    svm.fit_stream(positives, negatives())
    return {
        "coef": svm.coef_.astype(np.float32),
        "intercept": float(svm.intercept_),
        "positives": len(positives),
        "cache": int(svm.n_negatives_cache_),
        "retrains": len(svm.history_),
        "trained": True,
    }


def train_svms(
    ctx: StepContext,
    *,
    layer: str,
    scorer: str = "svm",
    # SVM training settings (not used, and not in the key, for scorer=softmax)
    neg_iou: float = 0.3,
    C: float = 0.001,
    pos_weight: float = 2.0,
    bias_value: float = 10.0,
    mode: str = "hnm",
    gt_negatives: bool = False,
    norm_sample_rows: int = 40_000,
    seed: int = 0,
) -> None:
    from stages.detection.features import feature_norm_scale, sample_rows_for_norm

    if scorer == "softmax":  # §3.2 / App. B: the fine-tuned softmax instead of SVMs (50.9 vs 54.2)
        if layer != "fc7":
            raise ValueError(
                "svm.scorer=softmax scores with fc8 on fc7 features: set svm.layer=fc7"
            )
        net = load_model(ctx.input_dir("finetune") / "model.pt")
        np.savez(
            ctx.out_dir / "svm.npz",
            coef=net.fc8.weight.detach().numpy(),
            intercept=net.fc8.bias.detach().numpy(),
            scale=np.float32(1.0),
            softmax=1,
        )
        return
    classes = _classes(ctx.input_dir("dataset"))
    train_split, _ = _splits(ctx.input_dir("dataset"))
    shards, transform = layer_source(ctx, layer, train_split)
    # mean feature norm 20 on a fixed random sample of training rows (App. B, code)
    scale = feature_norm_scale(transform(sample_rows_for_norm(shards, norm_sample_rows, seed)))
    fn = functools.partial(
        _train_class_svm,
        shards=shards,
        scale=scale,
        transform=transform,
        neg_iou=neg_iou,
        C=C,
        pos_weight=pos_weight,
        bias_value=bias_value,
        mode=mode,
        gt_negatives=gt_negatives,
    )
    results = ctx.map(fn, list(range(len(classes))), desc="svm per class")
    np.savez(
        ctx.out_dir / "svm.npz",
        coef=np.stack([r["coef"] for r in results]),
        intercept=np.array([r["intercept"] for r in results], np.float32),
        scale=np.float32(scale),
        trained=np.array([r["trained"] for r in results]),
    )
    ctx.write_json(
        "svm_stats.json",
        {
            c: {k: r[k] for k in ("positives", "cache", "retrains", "trained")}
            for c, r in zip(classes, results, strict=True)
        },
    )


# ----------------------------------------------------------------------------------------------
# bbox_regression: per class ridge from scaled pool5 to (tx, ty, tw, th) (App. C)
def _train_class_regressor(
    class_index: int,
    *,
    shards: list[str],
    scale: float,
    gt: dict[str, dict],
    alpha: float,
    min_iou: float,
) -> dict:
    from stages.detection.bbox_regression import BoxRegressor
    from stages.detection.boxes import box_iou_voc
    from stages.detection.features import iter_feature_shards

    feats, props, targets, ious = [], [], [], []
    cols = ["image_ids", "is_gt", "boxes", "max_iou", "features"]
    for s in iter_feature_shards(shards, cols):
        # overlapping this class's gt by > min_iou is necessary, not sufficient: App. C assigns a
        # proposal to the one gt box it overlaps most, of any class, and only that box's class
        # regressor trains on it (a rider's box near both the person and the horse goes to one).
        # Ground-truth rows train too (IoU 1 with themselves, target tx = ty = tw = th = 0), as in
        # rcnn_train_bbox_regressor.m, which keeps every row of the roidb with overlap >= 0.6
        keep = s["max_iou"][:, class_index] > min_iou
        for r in np.nonzero(keep)[0]:
            obj = gt[s["image_ids"][r]]
            iou = box_iou_voc(s["boxes"][r : r + 1], obj["boxes"])[0]
            j = int(iou.argmax())
            if obj["cls"][j] != class_index:
                continue
            feats.append(s["features"][r] * scale)
            props.append(s["boxes"][r])
            targets.append(obj["boxes"][j])
            ious.append(iou[j])
    if not feats:
        return {"coef": None, "intercept": None, "n": 0}
    reg = BoxRegressor(alpha=alpha, min_iou=min_iou).fit(
        np.stack(feats), np.stack(props), np.stack(targets), np.asarray(ious)
    )
    return {
        "coef": reg.coef_.astype(np.float32),
        "intercept": reg.intercept_.astype(np.float32),
        "n": reg.n_train_,
    }


def train_box_regressors(
    ctx: StepContext, *, alpha: float, min_iou: float, norm_sample_rows: int, seed: int
) -> None:
    from stages.detection.features import feature_norm_scale, sample_rows_for_norm

    features_dir, dataset_dir = ctx.input_dir("features"), ctx.input_dir("dataset")
    classes = _classes(dataset_dir)
    train_split, _ = _splits(dataset_dir)
    shards = feature_shards(features_dir, "pool5", train_split, ctx.input_file("features"))
    scale = feature_norm_scale(sample_rows_for_norm(shards, norm_sample_rows, seed))
    gt = _objects_by_image(dataset_dir, train_split, classes)
    fn = functools.partial(
        _train_class_regressor, shards=shards, scale=scale, gt=gt, alpha=alpha, min_iou=min_iou
    )
    results = ctx.map(fn, list(range(len(classes))), desc="bbox regression per class")
    dim = next((r["coef"].shape[1] for r in results if r["coef"] is not None), 0)
    coef = np.stack(
        [r["coef"] if r["coef"] is not None else np.zeros((4, dim), np.float32) for r in results]
    )
    intercept = np.stack(
        [r["intercept"] if r["intercept"] is not None else np.zeros(4, np.float32) for r in results]
    )
    np.savez(
        ctx.out_dir / "bbox_regression.npz",
        coef=coef,
        intercept=intercept,
        scale=np.float32(scale),
        trained=np.array([r["n"] > 0 for r in results]),
    )
    ctx.write_json("bbox_stats.json", {c: r["n"] for c, r in zip(classes, results, strict=True)})


# ----------------------------------------------------------------------------------------------
# detect: score every proposal (one matrix product per shard), top 100 per class, bbox regression,
# clip, per-class greedy NMS at 0.3 (§2.2)
DETECTIONS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("class", pa.string()),
        ("score", pa.float32()),
        ("x1", pa.float32()),
        ("y1", pa.float32()),
        ("x2", pa.float32()),
        ("y2", pa.float32()),
    ]
)


def _detect_shard(
    pair: tuple[str, str],
    *,
    classes: list[str],
    svm: dict,
    bbox: dict | None,
    sizes: dict[str, tuple[int, int]],
    top_k: int,
    nms_iou: float,
    transform=_identity,
    min_scores: np.ndarray | None = None,
    scores_only: bool = False,
) -> pa.Table | list[np.ndarray]:
    """Detections of one feature shard; with ``scores_only``, the scores of each class's
    per-image top-k candidates (``list`` over classes), from which ``detect`` sets the set-wide
    per-class thresholds ``min_scores (C,)`` of rcnn_test.m."""
    from stages.detection.bbox_regression import decode_boxes
    from stages.detection.boxes import clip_boxes_voc
    from stages.detection.features import read_feature_shard
    from stages.detection.nms import nms_per_class, top_k_per_class

    feat_path, pool5_path = pair
    s = read_feature_shard(feat_path, ["image_ids", "is_gt", "boxes", "features"])
    keep = ~s["is_gt"]  # leak guard: ground-truth rows are never scored at test time
    ids, boxes = s["image_ids"][keep], s["boxes"][keep]
    feats = transform(s["features"][keep]) * svm["scale"]
    scores = feats @ svm["coef"].T + svm["intercept"]  # (N, C)
    if int(svm.get("softmax", 0)):  # fine-tuned net's own classifier: P(class), drop background
        z = scores - scores.max(1, keepdims=True)
        scores = (np.exp(z) / np.exp(z).sum(1, keepdims=True))[:, 1:]
    if scores_only:
        per_class = [[] for _ in classes]
        for image_id in dict.fromkeys(ids):
            rows = np.nonzero(ids == image_id)[0]
            flat = scores[rows].ravel()
            labels = np.tile(np.arange(len(classes)), len(rows))
            cand = top_k_per_class(flat, labels, top_k)
            for k in range(len(classes)):
                per_class[k].append(flat[cand][labels[cand] == k])
        return [np.concatenate(p) if p else np.zeros(0) for p in per_class]
    pool5 = None
    if bbox is not None:
        p5 = read_feature_shard(pool5_path, ["is_gt", "features"])
        pool5 = p5["features"][~p5["is_gt"]] * bbox["scale"]
    out = []
    for image_id in dict.fromkeys(ids):
        rows = np.nonzero(ids == image_id)[0]
        n, c = len(rows), len(classes)
        labels = np.repeat(np.arange(c)[None, :], n, 0).ravel()
        flat_scores = scores[rows].ravel()
        cand = top_k_per_class(flat_scores, labels, top_k)
        if "trained" in svm:  # a class without training positives has no SVM: no detections
            cand = cand[svm["trained"][labels[cand]]]
        if min_scores is not None:  # rcnn_test.m drops boxes below the set-wide threshold
            cand = cand[flat_scores[cand] >= min_scores[labels[cand]]]
        box_rows, cls = rows[cand // c], labels[cand]
        det = boxes[box_rows].astype(np.float64)
        if pool5 is not None:
            for k in np.unique(cls):
                if bbox["trained"][k]:
                    m = cls == k
                    deltas = pool5[box_rows[m]] @ bbox["coef"][k].T + bbox["intercept"][k]
                    det[m] = decode_boxes(det[m], deltas)
        width, height = sizes[image_id]
        det = clip_boxes_voc(det, width, height)
        ok = (det[:, 2] >= det[:, 0]) & (det[:, 3] >= det[:, 1])
        det, cls, sc = det[ok], cls[ok], flat_scores[cand][ok]
        kept = nms_per_class(det, sc, cls, nms_iou)
        out.append(
            pa.table(
                {
                    "image_id": [image_id] * len(kept),
                    "class": [classes[k] for k in cls[kept]],
                    "score": sc[kept].astype(np.float32),
                    **{
                        name: det[kept, i].astype(np.float32)
                        for i, name in enumerate(("x1", "y1", "x2", "y2"))
                    },
                },
                schema=DETECTIONS_SCHEMA,
            )
        )
    return pa.concat_tables(out) if out else DETECTIONS_SCHEMA.empty_table()


def set_thresholds(per_class_scores: list[np.ndarray], cap: int) -> np.ndarray:
    """``(C,)`` per-class score thresholds keeping each class's ``cap`` best candidates of the
    whole test set (ties at the threshold kept), as ``thresh(j)`` in rcnn_test.m; ``-inf`` where a
    class has no more than ``cap`` candidates."""
    out = np.full(len(per_class_scores), -np.inf)
    for k, s in enumerate(per_class_scores):
        if len(s) > cap:
            out[k] = np.sort(s)[::-1][cap - 1]
    return out


def detect(
    ctx: StepContext,
    *,
    layer: str,
    use_bbox_regression: bool,
    top_k: int,
    nms_iou: float,
    max_per_set_per_image: int = 0,
) -> None:
    dataset_dir, features_dir = ctx.input_dir("dataset"), ctx.input_dir("features")
    classes = _classes(dataset_dir)
    svm = dict(np.load(ctx.input_dir("svm") / "svm.npz"))
    bbox = (
        dict(np.load(ctx.input_dir("bbox_regression") / "bbox_regression.npz"))
        if (use_bbox_regression)
        else None
    )
    _, test_split = _splits(dataset_dir)
    sizes = {r["image_id"]: (r["width"], r["height"]) for r in read_images(dataset_dir, test_split)}
    feats, transform = layer_source(ctx, layer, test_split)
    pool5 = (
        feature_shards(features_dir, "pool5", test_split, ctx.input_file("features"))
        if bbox is not None
        else feats
    )
    fn = functools.partial(
        _detect_shard,
        classes=classes,
        svm=svm,
        bbox=bbox,
        sizes=sizes,
        top_k=top_k,
        nms_iou=nms_iou,
        transform=transform,
    )
    pairs = list(zip(feats, pool5, strict=True))  # references: each task resolves its own
    thresholds = None
    if max_per_set_per_image:  # rcnn_test.m: max_per_set = 40 × #images per class, before NMS
        parts = ctx.map(functools.partial(fn, scores_only=True), pairs, desc="detect: caps")
        per_class = [np.concatenate([p[k] for p in parts]) for k in range(len(classes))]
        thresholds = set_thresholds(per_class, max_per_set_per_image * len(sizes))
        fn = functools.partial(fn, min_scores=thresholds)
    tables = ctx.map(fn, pairs, desc="detect")
    table = pa.concat_tables([t for t in tables if t.num_rows] or [DETECTIONS_SCHEMA.empty_table()])
    pq.write_table(table, ctx.out_dir / "detections.parquet")
    info = {"detections": table.num_rows}
    if thresholds is not None:
        info["detect_set_thresholds"] = {
            c: float(t) if np.isfinite(t) else None
            for c, t in zip(classes, thresholds, strict=True)
        }
    ctx.write_json("metrics.json", info)


# ----------------------------------------------------------------------------------------------
# evaluate: VOC devkit semantics, 11-point (VOC2007) and area (VOC2010+) AP
def evaluate(ctx: StepContext, *, test_split: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stages.detection.evaluate import evaluate_detections

    dataset_dir = ctx.input_dir("dataset")
    classes = _classes(dataset_dir)
    objects = pq.read_table(dataset_dir / "objects.parquet")
    objects = objects.filter(pa.compute.equal(objects["split"], test_split))
    det = pq.read_table(ctx.input_dir("detect") / "detections.parquet")
    result = evaluate_detections(det, objects, classes)
    metrics = {
        "mAP_voc07": result["mAP_voc07"],
        "mAP_area": result["mAP_area"],
        "AP_voc07": result["AP_voc07"],
        "AP_area": result["AP_area"],
    }
    ctx.write_json("metrics.json", metrics)
    fig, ax = plt.subplots(figsize=(5, 4))
    for cls in classes:
        recall, precision = result["curves"][cls]
        if len(recall):
            ax.plot(recall, precision, label=f"{cls} (AP {result['AP_voc07'][cls]:.2f})")
    ax.set(
        xlabel="recall",
        ylabel="precision",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title=f"Precision-recall ({test_split})",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ctx.out_dir / "precision_recall.png", dpi=120)
    plt.close(fig)
