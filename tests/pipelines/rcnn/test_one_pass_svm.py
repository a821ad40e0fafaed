"""R-CNN's SVMs and box regressors from a fixed number of passes over the feature cache, whatever
the number of classes (issue 19): the same models as one pass per class, and a count of reads."""

from __future__ import annotations

import os
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

import stages.detection.features as feature_cache
from cluster.resources import Resources
from pipelines.rcnn.detect import (
    _map,
    _memory_mb,
    _train_class_regressor,
    _train_class_svm,
    fit_box_regressors,
    in_process_actors,
    mine_svms,
    solver_memory_mb,
)
from stages.detection.boxes import box_iou_voc
from stages.detection.features import (
    feature_norm_scale,
    norm_sample_plan,
    sample_rows_for_norm,
    write_feature_shard,
)
from stages.detection.svm import HardNegativeSVM, negative_mask, positive_mask

DIM = 16
SVM = dict(neg_iou=0.3, C=0.001, pos_weight=2.0, bias_value=10.0, gt_negatives=True)


def _cache(directory, *, num_classes, shards, images_per_shard, seed=0, proposals=40):
    """Shards of images with 1-3 objects of random classes; proposals are gt boxes jittered by
    varying amounts (every IoU range) plus random boxes; features lean towards the class of the gt
    a box overlaps, by its IoU. ``max_iou`` is computed from the boxes as FeatureWriter does.
    Returns (sorted paths, rows per shard, {image_id: {"boxes", "cls"}})."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=(num_classes, DIM)) * 2
    paths, rows, gt = [], [], {}
    for k in range(shards):
        cols = {n: [] for n in ("image_ids", "box_index", "is_gt", "boxes", "gt_class", "max_iou")}
        feats = []
        for i in range(images_per_shard):
            image_id = f"{k:03d}-{i}"
            n_gt = int(rng.integers(1, 4))
            xy = rng.uniform(1, 120, size=(n_gt, 2))
            gt_boxes = np.hstack([xy, xy + rng.uniform(30, 80, size=(n_gt, 2))]).astype(np.float32)
            cls = rng.integers(0, num_classes, n_gt)
            gt[image_id] = {"boxes": gt_boxes, "cls": cls, "difficult": np.zeros(n_gt, bool)}
            src = gt_boxes[rng.integers(0, n_gt, proposals // 2)]
            jitter = rng.normal(size=src.shape) * rng.uniform(1, 25, size=(len(src), 1))
            xy = rng.uniform(1, 150, size=(proposals // 2, 2))
            rand = np.hstack([xy, xy + rng.uniform(10, 60, size=xy.shape)])
            props = np.concatenate([src + jitter, rand]).astype(np.float32)
            props[:, 2:] = np.maximum(props[:, 2:], props[:, :2] + 2)
            boxes = np.concatenate([gt_boxes, props])
            iou = box_iou_voc(boxes, gt_boxes)
            max_iou = np.zeros((len(boxes), num_classes), np.float32)
            for c in np.unique(cls):
                max_iou[:, c] = iou[:, cls == c].max(1)
            lean = iou.max(1, keepdims=True) * direction[cls[iou.argmax(1)]]
            feats.append(rng.normal(size=(len(boxes), DIM)) + lean)
            cols["image_ids"] += [image_id] * len(boxes)
            cols["box_index"].append(np.arange(len(boxes), dtype=np.int32))
            cols["is_gt"].append(np.arange(len(boxes)) < n_gt)
            cols["boxes"].append(boxes)
            cols["gt_class"].append(np.concatenate([cls, -np.ones(len(props), np.int64)]))
            cols["max_iou"].append(max_iou)
        arrays = {n: v if n == "image_ids" else np.concatenate(v) for n, v in cols.items()}
        path = directory / f"{k:03d}.parquet"
        write_feature_shard(path, **arrays, features=np.concatenate(feats).astype(np.float32))
        paths.append(str(path))
        rows.append(len(arrays["image_ids"]))
    return paths, rows, gt


def _out(tmp_path):
    """Where box regression writes its pairs: a local store's staging directory."""
    from data.store import OutputRef

    (tmp_path / "staging").mkdir(parents=True, exist_ok=True)
    return OutputRef(str(tmp_path / "store"), str(tmp_path / "staging"))


def local_map(fn, items, memory_mb, desc):
    return [fn(item) for item in items]


@pytest.fixture(scope="module")
def one_image_shards(tmp_path_factory):
    return _cache(tmp_path_factory.mktemp("one"), num_classes=3, shards=24, images_per_shard=1)


@pytest.fixture(scope="module")
def three_image_shards(tmp_path_factory):
    return _cache(tmp_path_factory.mktemp("three"), num_classes=3, shards=9, images_per_shard=3)


def test_norm_sample_plan_takes_the_rows_sample_rows_for_norm_reads(three_image_shards):
    paths, rows, _ = three_image_shards
    plan = norm_sample_plan(rows, 100, seed=3)
    assert sum(len(p) for p in plan) == 100 and all(np.all(np.diff(p) > 0) for p in plan)
    taken = [feature_cache.read_feature_shard(p, ["features"])["features"][r] for p, r in
             zip(paths, plan, strict=True)]  # fmt: skip
    np.testing.assert_array_equal(np.concatenate(taken), sample_rows_for_norm(paths, 100, 3))


@pytest.mark.parametrize("mode", ["hnm", "all"])
def test_one_image_per_round_gives_the_per_class_svms_bit_for_bit(one_image_shards, mode,
                                                                   tmp_path):  # fmt: skip
    """With one image per shard and one shard per round, the shared pass is R-CNN's per-image
    schedule: every class's weights, cache and number of trainings equal one pass per class
    (retrain_after = 40 so that classes retrain many times mid-pass)."""
    paths, rows, _ = one_image_shards
    got, scale = mine_svms(paths, rows, num_classes=3, map_fn=local_map, mode=mode,
                           out=_out(tmp_path), norm_sample_rows=300, seed=1, retrain_after=40,
                           **SVM)  # fmt: skip
    assert scale == feature_norm_scale(sample_rows_for_norm(paths, 300, 1))
    for c, g in enumerate(got):
        ref = _train_class_svm(c, shards=paths, scale=scale, mode=mode, retrain_after=40, **SVM)
        np.testing.assert_array_equal(g["coef"], ref["coef"])
        assert g["intercept"] == ref["intercept"]
        assert {k: g[k] for k in ("positives", "cache", "retrains", "trained")} == {
            k: ref[k] for k in ("positives", "cache", "retrains", "trained")
        }
    retrains = [g["retrains"] for g in got]
    assert retrains == [1, 1, 1] if mode == "all" else min(retrains) >= 3


def _per_class_in_rounds(paths, c, scale, round_ends, retrain_after):
    """One class mined alone, image by image, retraining only after the images in
    ``round_ends`` (global image numbers) and at the end: the rounds' schedule, written plainly."""
    m = HardNegativeSVM(retrain_after=retrain_after)
    shards = [feature_cache.read_feature_shard(p) for p in paths]
    m.start_mining(np.concatenate([
        s["features"][positive_mask(s["gt_class"], s["is_gt"], c)] * scale for s in shards
    ]))  # fmt: skip
    n = 0
    for s in shards:
        neg = negative_mask(s["max_iou"][:, c], s["is_gt"], SVM["neg_iou"], SVM["gt_negatives"])
        for image_id in dict.fromkeys(s["image_ids"]):
            rows = np.flatnonzero((s["image_ids"] == image_id) & neg)
            m.mine_image(n * 1000 + rows, s["features"][rows] * scale, end_of_round=n in round_ends)
            n += 1
    m.finish_mining()
    return m


def test_rounds_of_shards_equal_per_class_mining_that_retrains_at_the_rounds_ends(
    three_image_shards, tmp_path
):
    """Nine shards of three images, two shards per round: round 0 is image 0; the next rounds are
    the rest of shard 0 with shard 1 (images 1-5), shards 2-3 (6-11), 4-5, 6-7, 8 (24-26). Each
    class's SVM equals mining that class alone with retraining allowed only after those rounds;
    and differs from R-CNN's per-image schedule, which retrains mid-round."""
    paths, rows, _ = three_image_shards
    got, scale = mine_svms(paths, rows, num_classes=3, map_fn=local_map, round_shards=2,
                           out=_out(tmp_path), norm_sample_rows=300, retrain_after=40,
                           **SVM)  # fmt: skip
    round_ends = {0, 5, 11, 17, 23, 26}
    differs = 0
    for c, g in enumerate(got):
        ref = _per_class_in_rounds(paths, c, scale, round_ends, retrain_after=40)
        np.testing.assert_array_equal(g["coef"], ref.coef_.astype(np.float32))
        assert g["intercept"] == float(ref.intercept_)
        assert (g["cache"], g["retrains"]) == (ref.n_negatives_cache_, len(ref.history_))
        assert {h["image_index"] for h in ref.history_} <= round_ends
        per_image = _train_class_svm(c, shards=paths, scale=scale, mode="hnm", retrain_after=40,
                                     **SVM)  # fmt: skip
        differs += not np.array_equal(per_image["coef"], g["coef"])
    assert differs >= 1  # the rounds change something here; the test above pins that 1 = none


def test_mining_tasks_return_counts_and_their_negatives_go_through_files(
    three_image_shards, tmp_path
):
    """A mining task writes its shard's hard negatives (a row group per class, the scaled
    features bit for bit) and returns a few hundred bytes whatever their number; the step
    deletes each round's files once read: nothing is left beside the artifact."""
    import pickle

    import pyarrow.parquet as pq

    from pipelines.rcnn.detect import _read_class

    paths, rows, _ = three_image_shards
    out = _out(tmp_path)
    seen = []

    def spying_map(fn, items, memory_mb, desc):
        results = [fn(item) for item in items]
        if desc.startswith("svm: mining round"):
            for item, r in zip(items, results, strict=True):
                f = tmp_path / "staging" / r["name"]
                meta = pq.ParquetFile(f).metadata
                stats = [meta.row_group(g).column(0).statistics for g in range(meta.num_row_groups)]
                per_class = [
                    _read_class(out, [r], c, ("image", "key", "features")) for c in range(3)
                ]
                seen.append({
                    "shard": item[0], "returned": len(pickle.dumps(r)), "rows": meta.num_rows,
                    "bytes": f.stat().st_size, "counts": r["counts"].tolist(),
                    "groups": [(st.min, st.max) for st in stats], "images": r["images"],
                    "per_class": per_class,
                })  # fmt: skip
        return results

    got, scale = mine_svms(paths, rows, num_classes=3, map_fn=spying_map, round_shards=2,
                           out=out, norm_sample_rows=300, retrain_after=40, **SVM)  # fmt: skip
    assert [s["shard"] for s in seen] == list(range(9))  # shard 0 from its second image on
    assert [s["images"] for s in seen] == [[1, 2]] + [[0, 1, 2]] * 8
    for s in seen:
        assert s["rows"] == sum(s["counts"]) and s["returned"] < 1000
        present = [c for c in range(3) if s["counts"][c]]
        assert s["groups"] == [(c, c) for c in present]  # one row group per class, in order
    assert sum(s["rows"] for s in seen) > 100 and max(s["bytes"] for s in seen) > 3000
    assert not list((tmp_path / "staging").rglob("*.parquet"))  # scratch deleted
    # the largest class's rows of one shard: the shard's features × the scale, bit for bit, its
    # images in order, negatives of that class only
    s, c = max(((s, c) for s in seen for c in range(3)), key=lambda sc: sc[0]["counts"][sc[1]])
    got_rows = s["per_class"][c]
    shard = feature_cache.read_feature_shard(paths[s["shard"]])
    assert s["counts"][c] == len(got_rows["key"]) > 20 and np.all(np.diff(got_rows["image"]) >= 0)
    box = (got_rows["key"] & ((1 << 20) - 1)).astype(np.int64)
    image = (got_rows["key"] >> 20) & ((1 << 12) - 1)
    np.testing.assert_array_equal(image, got_rows["image"])
    ids = shard["image_ids"]
    at = [
        np.flatnonzero(ids == list(dict.fromkeys(ids))[j])[b]
        for j, b in zip(image, box, strict=True)
    ]
    np.testing.assert_array_equal(got_rows["features"], shard["features"][at] * scale)
    assert np.all(shard["max_iou"][at, c] < SVM["neg_iou"])
    reference, _ = mine_svms(paths, rows, num_classes=3, map_fn=local_map, round_shards=2,
                             out=_out(tmp_path / "ref"), norm_sample_rows=300, retrain_after=40,
                             **SVM)  # fmt: skip
    for a, b in zip(got, reference, strict=True):
        np.testing.assert_array_equal(a["coef"], b["coef"])


def test_the_solvers_hold_the_caches_and_their_number_changes_nothing(three_image_shards,
                                                                     tmp_path):  # fmt: skip
    """The classes' miners live in `ClassSolvers` (Ray actors in the step), dealt round-robin:
    one, two or three of them (or as many as the capacity function allows) give the same SVMs
    bit for bit; what comes back from them each round is the classes' models, a few hundred
    bytes, never the caches; the solvers get their memory estimate."""
    import pickle

    paths, rows, _ = three_image_shards
    kw = dict(num_classes=3, map_fn=local_map, round_shards=2, norm_sample_rows=300,
              retrain_after=40, **SVM)  # fmt: skip
    calls = []

    def spying_actors(num):
        def start(factory, kwargs, memory_mb):
            group = in_process_actors(factory, kwargs, memory_mb)
            real = group.call

            def call(method, args):
                out = real(method, args)
                calls.append((num, method, len(pickle.dumps(out)), memory_mb,
                              [k["classes"] for k in kwargs]))  # fmt: skip
                return out

            group.call = call
            return group

        return start

    runs = {}
    shards = [feature_cache.read_feature_shard(p) for p in paths]
    pos = max(sum(int(((s["gt_class"] == c) & s["is_gt"]).sum()) for s in shards) for c in range(3))
    for name, n in ((1, 1), (2, 2), (3, 3), ("capacity", lambda mb: 2 if mb ==
                    solver_memory_mb(1, pos, DIM, 160) else 0)):  # fmt: skip
        runs[name], _ = mine_svms(paths, rows, out=_out(tmp_path / str(name)),
                                  actors_fn=spying_actors(name), num_solvers=n, **kw)  # fmt: skip
    for name in (2, 3, "capacity"):
        for a, b in zip(runs[1], runs[name], strict=True):
            np.testing.assert_array_equal(a["coef"], b["coef"])
            assert (a["intercept"], a["cache"], a["retrains"]) == (
                b["intercept"], b["cache"], b["retrains"]
            )  # fmt: skip
    groups = {name: g for name, _, _, _, g in calls}
    assert groups == {1: [[0, 1, 2]], 2: [[0, 2], [1]], 3: [[0], [1], [2]],
                      "capacity": [[0, 2], [1]]}  # fmt: skip
    methods = [m for name, m, _, _, _ in calls if name == 1]
    assert methods[0] == "first_round" and methods[-1] == "finish"
    assert methods.count("add_round") == 5  # the rounds of the schedule above
    assert max(size for _, m, size, _, _ in calls if m != "finish") < 3 * (4 * DIM + 200)
    caches = max(r["cache"] for r in runs[1])
    assert caches * 4 * DIM > 3 * (4 * DIM + 200)  # what did not come back is bigger than that
    assert {mb for name, _, _, mb, _ in calls if name == 1} == {solver_memory_mb(3, pos, DIM, 160)}


def test_solver_memory_by_hand():
    # 2 classes × (10 positives + 90 cached rows) × 1024 × 4 B held, one solve of 100 rows at 7×
    # that, 256 MiB for the interpreter: 819,200 + 2,867,200 B = 3.52 MiB -> 4
    assert solver_memory_mb(2, 10, 1024, 90) == 256 + 4
    # 8000 cached fc7 rows: held once and solved at 7×, 8 × 8000 × 16 KiB = 1000 MiB
    assert solver_memory_mb(1, 0, 4096, 8000) == 256 + 1000


def test_box_regressors_from_one_pass_equal_one_pass_per_class(three_image_shards, tmp_path):
    """The pairs go through files (one per shard, a row group per class) and come back bit for
    bit: the regressors equal the per-class reference's; each file holds its shard's pairs."""
    import pyarrow.parquet as pq

    paths, rows, gt = three_image_shards
    kw = dict(alpha=1000.0, min_iou=0.6)
    got, scale, files = fit_box_regressors(paths, rows, num_classes=3, gt=gt, map_fn=local_map,
                                           out=_out(tmp_path), norm_sample_rows=300, seed=0,
                                           **kw)  # fmt: skip
    assert scale == feature_norm_scale(sample_rows_for_norm(paths, 300, 0))
    for c, g in enumerate(got):
        ref = _train_class_regressor(c, shards=paths, scale=scale, gt=gt, **kw)
        assert g["n"] == ref["n"] > 5
        np.testing.assert_array_equal(g["coef"], ref["coef"])
        np.testing.assert_array_equal(g["intercept"], ref["intercept"])
    assert sorted(files) == [f"pairs/part-{i:05d}.parquet" for i in range(len(paths))]
    total = 0
    for name, entry in files.items():
        f = tmp_path / "staging" / name
        assert entry["size"] == f.stat().st_size
        meta = pq.ParquetFile(f).metadata
        classes = [meta.row_group(g).column(0).statistics for g in range(meta.num_row_groups)]
        assert all(st.min == st.max for st in classes)  # one class per row group
        assert [st.min for st in classes] == sorted({st.min for st in classes})
        total += meta.num_rows
    assert total == sum(g["n"] for g in got)  # every pair kept (the regressor filters none here)


@pytest.mark.parametrize("num_classes", [4, 20])
def test_shard_reads_do_not_grow_with_the_classes(tmp_path, monkeypatch, num_classes):
    """SVMs: two reads of each training shard (positives and norm sample; mining); box
    regression: one. Before issue 19 both read every shard once or twice per class."""
    paths, rows, gt = _cache(tmp_path, num_classes=num_classes, shards=6, images_per_shard=4)
    reads: list[str] = []
    real = feature_cache.read_feature_shard

    def counting(path, columns=None):
        reads.append(str(path))
        return real(path, columns)

    monkeypatch.setattr(feature_cache, "read_feature_shard", counting)
    svms, _ = mine_svms(paths, rows, num_classes=num_classes, map_fn=local_map, round_shards=2,
                        out=_out(tmp_path / "svm"), norm_sample_rows=200, **SVM)  # fmt: skip
    assert sorted(reads) == sorted(paths * 2)
    assert sum(s["trained"] for s in svms) == len({c for o in gt.values() for c in o["cls"]}) >= 4
    reads.clear()
    fit_box_regressors(paths, rows, num_classes=num_classes, gt=gt, map_fn=local_map,
                       out=_out(tmp_path), alpha=1000.0, min_iou=0.6, norm_sample_rows=200,
                       seed=0)  # fmt: skip
    assert sorted(reads) == sorted(paths)


def _ctx(resources, executor, tmp_path):
    from pipelines.engine import StepContext

    return StepContext(pipeline="rcnn", step="svm", key="k", inputs={}, out_dir=tmp_path,
                       resources=resources, work_uri=str(tmp_path), executor=executor)  # fmt: skip


def test_map_requests_its_own_memory_estimate(tmp_path):
    seen = []
    executor = SimpleNamespace(map=lambda fn, items, resources, desc: seen.append(resources) or [])
    ctx = _ctx(Resources(cpus=1, torch_threads=2, memory_mb=500), executor, tmp_path)
    # 2 × 1000 rows × 1 MiB + 3 MiB of weights + 256 MiB for the worker
    mb = _memory_mb(1000, 1 << 20, 3 << 20)
    assert mb == 256 + 2000 + 3
    _map(ctx, len, [1], mb, "x")
    _map(ctx, len, [1], 100, "x")  # below the step's own request: the step's stands
    assert seen == [Resources(cpus=1, torch_threads=2, memory_mb=2259),
                    Resources(cpus=1, torch_threads=2, memory_mb=500)]  # fmt: skip


@pytest.mark.ray
def test_on_ray_the_same_svms_and_regressors(three_image_shards, ray_executor, tmp_path):
    """Mining and gathering tasks on Ray (with their memory requests) and the class solvers as
    two Ray actors give the in-process bytes."""
    paths, rows, gt = three_image_shards
    ctx = _ctx(Resources(cpus=1), ray_executor, tmp_path)

    def ray_map(fn, items, memory_mb, desc):
        return _map(ctx, fn, items, memory_mb, desc)

    def ray_actors(factory, kwargs, memory_mb):
        return ctx.actors(factory, kwargs, memory_mb=memory_mb)

    kw = dict(num_classes=3, round_shards=2, norm_sample_rows=300, retrain_after=40, **SVM)
    on_ray, s1 = mine_svms(paths, rows, map_fn=ray_map, out=_out(tmp_path / "ray-svm"),
                           actors_fn=ray_actors, num_solvers=2, **kw)  # fmt: skip
    local, s2 = mine_svms(paths, rows, map_fn=local_map, out=_out(tmp_path / "local-svm"), **kw)
    assert s1 == s2
    for a, b in zip(on_ray, local, strict=True):
        np.testing.assert_array_equal(a["coef"], b["coef"])
        assert a["intercept"] == b["intercept"] and a["cache"] == b["cache"]
    bkw = dict(num_classes=3, gt=gt, alpha=1000.0, min_iou=0.6, norm_sample_rows=300, seed=0)
    ray_boxes, _, _ = fit_box_regressors(paths, rows, map_fn=ray_map, out=_out(tmp_path), **bkw)
    local_boxes, _, _ = fit_box_regressors(paths, rows, map_fn=local_map,
                                           out=_out(tmp_path / "local"), **bkw)  # fmt: skip
    for a, b in zip(ray_boxes, local_boxes, strict=True):
        np.testing.assert_array_equal(a["coef"], b["coef"])


def test_fc7_from_cached_pool5_once_per_shard(one_image_shards, tmp_path):
    """features.cache=pool5: the shared pass runs `Pool5Head` once per shard read (not once per
    class); its SVMs match per-class mining through the head to float tolerance (the head's
    products see other row blocks); a task's memory counts pool5, fc6, fc7 and the weights."""
    import torch

    from pipelines.rcnn.detect import _row_bytes
    from pipelines.rcnn.features import Pool5Head

    paths, rows, _ = one_image_shards
    torch.manual_seed(0)
    net = SimpleNamespace(fc6=torch.nn.Linear(DIM, 24), fc7=torch.nn.Linear(24, 20))
    head = Pool5Head(net, "fc7")
    calls = []

    def counted(x):
        calls.append(len(x))
        return head(x)

    got, scale = mine_svms(paths, rows, num_classes=3, map_fn=local_map, transform=counted,
                           out=_out(tmp_path), norm_sample_rows=300, retrain_after=40,
                           **SVM)  # fmt: skip
    # pass 1 (its needed rows only) and the mining pass; shard 0's one image was round 0
    assert len(calls) == 2 * len(paths) - 1
    for c, g in enumerate(got):
        ref = _train_class_svm(c, shards=paths, scale=scale, mode="hnm", transform=head,
                               retrain_after=40, **SVM)  # fmt: skip
        assert g["coef"].shape == (20,) and g["positives"] == ref["positives"] > 0
        np.testing.assert_allclose(g["coef"], ref["coef"], rtol=1e-3, atol=1e-5)
    assert _row_bytes(None, "fc7", head) == (
        4 * (DIM + 24 + 20 + 20),
        4 * (24 * DIM + 24 + 20 * 24 + 20),
    )


def _head_net(d_in=64, d6=48, d7=32):
    import torch

    torch.manual_seed(0)
    return SimpleNamespace(fc6=torch.nn.Linear(d_in, d6), fc7=torch.nn.Linear(d6, d7))


@pytest.mark.parametrize("layer", ["fc6", "fc7"])
def test_pool5_head_in_torch_matches_numpy_and_auto_stays_numpy_without_a_gpu(layer, monkeypatch):
    """Issue 19: fc6/fc7 from pool5 on a GPU when the task has one. The torch path (here on the
    CPU) agrees with numpy to float32 tolerance; "auto" in a task without a GPU is numpy, bit for
    bit, so a CPU's bytes never depend on the cluster; the pickled head carries no device copy."""
    import pickle

    from pipelines.rcnn.features import Pool5Head

    net = _head_net()
    x = np.random.default_rng(0).standard_normal((37, 64)).astype(np.float32)
    ref = Pool5Head(net, layer, device="numpy")(x)
    assert ref.shape == (37, 48 if layer == "fc6" else 32) and (ref >= 0).all() and ref.any()
    head = Pool5Head(net, layer, device="cpu")
    np.testing.assert_allclose(head(x), ref, rtol=1e-5, atol=1e-5)
    assert head._on_device is not None and pickle.loads(pickle.dumps(head))._on_device is None
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    auto = Pool5Head(net, layer)
    np.testing.assert_array_equal(auto(x), ref)
    assert auto._on_device is None


def test_a_stored_pool5_head_travels_as_its_reference_and_reads_once_per_process(tmp_path):
    """Issue 19: the head svm and detect recompute fc6/fc7 with pickles as the reference to the
    fine-tuned model's file, not its weights (AlexNet's ≈ 218 MB went into the object store once
    per mining round); a task reads them once per process and file version, and computes what
    the head built from the net does, bit for bit."""
    import pickle

    import torch

    from pipelines.rcnn import features as f
    from pipelines.rcnn.common import _save_model
    from stages.models.registry import create

    torch.manual_seed(0)
    kw = {"num_classes": 5, "input_size": 32}
    net = create("rcnn_small", **kw).eval()
    _save_model(tmp_path / "model.pt", net.state_dict(), model="rcnn_small", model_kwargs=kw,
                num_outputs=5)  # fmt: skip
    by_value = f.Pool5Head(net, "fc7", device="numpy")
    weights = sum(getattr(by_value, w).nbytes for w in f.Pool5Head._WEIGHTS)
    assert weights == 4 * (512 * 512 * 2 + 512 * 2) and len(pickle.dumps(by_value)) > weights
    f._head_weights_at.cache_clear()
    head = f.Pool5Head.stored(tmp_path / "model.pt", "fc7", device="numpy")
    sent = pickle.dumps(head)
    assert len(sent) < 2000
    x = np.abs(np.random.default_rng(0).standard_normal((9, 512))).astype(np.float32)
    got = [pickle.loads(sent)(x) for _ in range(3)]
    for g in got:
        np.testing.assert_array_equal(g, by_value(x))
    assert f._head_weights_at.cache_info()[:2] == (2, 1)  # (hits, misses): one read per process
    torch.manual_seed(1)  # a new model written at the same path is read again
    _save_model(tmp_path / "model.pt", create("rcnn_small", **kw).state_dict(), model="rcnn_small",
                model_kwargs=kw, num_outputs=5)  # fmt: skip
    os.utime(tmp_path / "model.pt", ns=(1, 1))
    assert not np.array_equal(pickle.loads(sent)(x), got[0])


def test_svm_and_detect_ask_for_a_gpu_only_when_they_recompute_fc7():
    from pipelines.rcnn.config import RCNNConfig
    from pipelines.rcnn.steps import _Builder

    for cache, want in (("pool5", "auto"), ("layers", 0)):
        cfg = RCNNConfig()
        cfg = replace(cfg, features=replace(cfg.features, cache=cache))
        b = _Builder(cfg, "test")
        assert b.svm().resources.gpus == want and b.detect().resources.gpus == want
        assert b.svm(layer="pool5").resources.gpus == 0  # pool5 SVMs need no head


@pytest.mark.gpu
def test_pool5_head_on_the_gpu_within_float32_tolerance_of_numpy():
    from pipelines.rcnn.features import Pool5Head

    net = _head_net(9216, 4096, 4096)  # AlexNet's sizes
    x = np.abs(np.random.default_rng(1).standard_normal((512, 9216))).astype(np.float32)
    ref = Pool5Head(net, "fc7", device="numpy")(x)
    np.testing.assert_allclose(Pool5Head(net, "fc7", device="cuda")(x), ref, rtol=1e-3, atol=1e-4)
