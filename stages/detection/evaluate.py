"""PASCAL VOC detection AP, following the devkit's ``VOCevaldet.m`` / ``VOCap.m`` (REFERENCE §1).

Boxes are ``(N, 4)`` xyxy in VOC 1-based inclusive pixels; IoU is the devkit's (``box_iou_voc``).

Per class:

- Positives are the class's non-difficult objects (``npos``).
- Detections are sorted by decreasing score. The devkit's ``sort(-confidence)`` is stable, so tied
  scores keep their input order; ours is a stable sort too.
- Each detection takes the max-IoU object of its class in its image (ties: the first object). With
  IoU >= 0.5: a difficult object -> ignored (neither TP nor FP, the detection stays in the list as
  a repeated point of the curve); an object not yet matched -> TP and the object is marked; an
  already matched object -> FP (duplicate). IoU < 0.5, or no object of the class in the image
  (images absent from ``gt`` included; the devkit errors on unknown image ids) -> FP.
- ``rec = cumsum(tp) / npos``, ``prec = cumsum(tp) / (cumsum(tp) + cumsum(fp))``. If the first
  detections are all ignored, ``prec`` there is 0/0 = NaN, exactly as in the devkit; MATLAB's
  ``max`` skips NaN and so do both AP formulas here.

AP: VOC2007 uses the 11-point interpolated AP, VOC2010+ the area under the monotone precision
envelope (``VOCap``). A class with no positives would divide by zero in the devkit; it gets AP NaN
here and is left out of the mAP, which averages the classes that have positives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from stages.detection.boxes import max_iou_assign


def voc_ap(recall: np.ndarray, precision: np.ndarray, *, use_07_metric: bool) -> float:
    """AP from a ``(D,)`` recall/precision curve (detections sorted by decreasing score)."""
    rec = np.asarray(recall, dtype=np.float64).reshape(-1)
    prec = np.asarray(precision, dtype=np.float64).reshape(-1)
    if rec.shape != prec.shape:
        raise ValueError(f"recall {rec.shape} and precision {prec.shape} must match")
    if use_07_metric:
        # t = k / 10 exactly: MATLAB's 0:0.1:1 and an accumulated float range drift (3 * 0.1 =
        # 0.30000000000000004 > 0.3 would drop a recall of exactly 0.3).
        ap = 0.0
        for t in np.arange(11) / 10:
            p = prec[(rec >= t) & ~np.isnan(prec)]
            ap += (p.max() if p.size else 0.0) / 11
        return float(ap)
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[0.0], prec, [0.0]])
    mpre = np.fmax.accumulate(mpre[::-1])[::-1]  # envelope; fmax skips NaN like MATLAB's max
    i = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1  # points where recall changes
    return float(np.sum((mrec[i] - mrec[i - 1]) * mpre[i]))


def _detection_columns(detections) -> tuple[list, np.ndarray, np.ndarray]:
    """Either a tuple ``(image_ids (D,), scores (D,), boxes ndarray (D, 4))`` or a sequence of
    ``(image_id, score, box (4,))`` records -> ``(ids, scores (D,), boxes (D, 4))``."""
    if isinstance(detections, tuple) and len(detections) == 3:
        if isinstance(detections[2], np.ndarray) and detections[2].ndim == 2:
            ids, scores, boxes = detections
            return list(ids), np.asarray(scores, dtype=np.float64), boxes.astype(np.float64)
    ids = [d[0] for d in detections]
    scores = np.array([d[1] for d in detections], dtype=np.float64)
    boxes = np.array([np.asarray(d[2], dtype=np.float64).reshape(4) for d in detections])
    return ids, scores, boxes.reshape(-1, 4)


def evaluate_class(
    detections,
    gt: Mapping[str, tuple[np.ndarray, np.ndarray]],
    iou_threshold: float = 0.5,  # VOCopts.minoverlap
) -> dict:
    """Devkit AP of one class.

    ``detections``: ``(image_ids, scores, boxes)`` columns (``boxes`` an ndarray ``(D, 4)``) or a
    sequence of ``(image_id, score, box)``. ``gt``: image id -> ``(boxes (G, 4), difficult (G,))``
    of this class, for every evaluated image. Returns ``ap_voc07``, ``ap_area``, ``recall (D,)``,
    ``precision (D,)``, per-detection ``tp``/``fp`` flags ``(D,)`` and ``order (D,)`` (input row
    of each sorted position), all in score order, and ``num_pos``.
    """
    ids, scores, boxes = _detection_columns(detections)
    if scores.shape != (len(ids),) or boxes.shape != (len(ids), 4):
        raise ValueError(
            f"detections need one id, score and (4,) box each, got {len(ids)} ids, "
            f"scores {scores.shape}, boxes {boxes.shape}"
        )
    gt_boxes, difficult = {}, {}
    for image_id, (b, diff) in gt.items():
        gt_boxes[image_id] = np.asarray(b, dtype=np.float64).reshape(-1, 4)
        difficult[image_id] = np.asarray(diff, dtype=bool).reshape(-1)
        if len(difficult[image_id]) != len(gt_boxes[image_id]):
            raise ValueError(
                f"gt[{image_id!r}]: {len(gt_boxes[image_id])} boxes but "
                f"{len(difficult[image_id])} difficult flags"
            )
    num_pos = int(sum((~d).sum() for d in difficult.values()))

    # The best object of each detection does not depend on the matching, so compute it per image
    # in one go; only the TP/FP bookkeeping below is sequential.
    best_iou = np.zeros(len(ids))
    best_gt = np.full(len(ids), -1, dtype=np.int64)
    rows_by_image: dict = {}
    for row, image_id in enumerate(ids):
        rows_by_image.setdefault(image_id, []).append(row)
    for image_id, rows in rows_by_image.items():
        if image_id in gt_boxes:
            best_iou[rows], best_gt[rows] = max_iou_assign(boxes[rows], gt_boxes[image_id])

    order = np.argsort(-scores, kind="stable")  # (D,)
    tp = np.zeros(len(ids), dtype=np.int64)
    fp = np.zeros(len(ids), dtype=np.int64)
    matched = {image_id: np.zeros(len(d), dtype=bool) for image_id, d in difficult.items()}
    for pos, row in enumerate(order):
        j = best_gt[row]
        if j < 0 or best_iou[row] < iou_threshold:
            fp[pos] = 1
            continue
        image_id = ids[row]
        if difficult[image_id][j]:
            continue  # ignored
        if matched[image_id][j]:
            fp[pos] = 1  # duplicate detection
        else:
            tp[pos] = 1
            matched[image_id][j] = True

    cum_tp, cum_fp = np.cumsum(tp), np.cumsum(fp)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = cum_tp / (cum_tp + cum_fp)  # NaN while only ignored detections seen
    if num_pos == 0:
        recall = np.full(len(ids), np.nan)
        ap_07 = ap_area = float("nan")
    else:
        recall = cum_tp / num_pos
        ap_07 = voc_ap(recall, precision, use_07_metric=True)
        ap_area = voc_ap(recall, precision, use_07_metric=False)
    return {
        "ap_voc07": ap_07,
        "ap_area": ap_area,
        "recall": recall,
        "precision": precision,
        "tp": tp,
        "fp": fp,
        "order": order,
        "num_pos": num_pos,
    }


def _columns(table, names: Sequence[str], what: str) -> dict[str, list | np.ndarray]:
    """Columns of a ``pyarrow.Table`` or a dict of sequences; ids/classes as lists."""
    available = table.column_names if hasattr(table, "column_names") else list(table)
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(f"{what} lacks columns {missing}; it has {list(available)}")
    out = {}
    for name in names:
        col = table.column(name).to_pylist() if hasattr(table, "column_names") else table[name]
        out[name] = list(col) if name in ("image_id", "class") else np.asarray(col)
    return out


def evaluate_detections(
    det_table,
    gt_table,
    classes: Sequence[str],
    *,
    iou_threshold: float = 0.5,
) -> dict:
    """Devkit AP for every class and the mAP over classes with positives.

    ``det_table``: columns ``image_id, class, score, x1, y1, x2, y2``; ``gt_table``: the objects
    table (``data.voc.OBJECTS_SCHEMA``: ``image_id, class, x1, y1, x2, y2, difficult``) of exactly
    the evaluated images. Either a ``pyarrow.Table`` or a dict of columns. Ground truth of classes
    outside ``classes`` is ignored; detections of such classes are an error. Returns ``mAP_voc07``,
    ``mAP_area``, ``AP_voc07`` and ``AP_area`` (class -> AP, NaN without positives) and ``curves``
    (class -> ``(recall, precision)``).
    """
    det = _columns(det_table, ("image_id", "class", "score", "x1", "y1", "x2", "y2"), "det_table")
    gt = _columns(gt_table, ("image_id", "class", "x1", "y1", "x2", "y2", "difficult"), "gt_table")
    unknown = sorted(set(det["class"]) - set(classes), key=str)
    if unknown:
        raise ValueError(f"det_table has classes {unknown} not in classes={list(classes)}")
    det_boxes = np.stack([det[k] for k in ("x1", "y1", "x2", "y2")], 1).astype(np.float64)
    gt_boxes = np.stack([gt[k] for k in ("x1", "y1", "x2", "y2")], 1).astype(np.float64)
    gt_difficult = gt["difficult"].astype(bool)
    det_class, gt_class = np.array(det["class"], dtype=object), np.array(gt["class"], dtype=object)
    det_ids, gt_ids = (
        np.array(det["image_id"], dtype=object),
        np.array(gt["image_id"], dtype=object),
    )

    ap_07, ap_area, curves = {}, {}, {}
    for cls in classes:
        rows = np.flatnonzero(gt_class == cls)
        per_image: dict = {}
        for r in rows:
            per_image.setdefault(gt_ids[r], []).append(r)
        cls_gt = {i: (gt_boxes[r], gt_difficult[r]) for i, r in per_image.items()}
        d = np.flatnonzero(det_class == cls)
        result = evaluate_class(
            (list(det_ids[d]), det["score"][d].astype(np.float64), det_boxes[d]),
            cls_gt,
            iou_threshold,
        )
        ap_07[cls], ap_area[cls] = result["ap_voc07"], result["ap_area"]
        curves[cls] = (result["recall"], result["precision"])

    def mean_over_positives(aps: dict) -> float:
        finite = [v for v in aps.values() if not np.isnan(v)]
        return float(np.mean(finite)) if finite else float("nan")

    return {
        "mAP_voc07": mean_over_positives(ap_07),
        "mAP_area": mean_over_positives(ap_area),
        "AP_voc07": ap_07,
        "AP_area": ap_area,
        "curves": curves,
    }
