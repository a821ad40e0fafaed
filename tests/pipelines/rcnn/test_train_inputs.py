"""R-CNN's training inputs (issue 19): pretraining crops reach the workers as a store artifact,
not in the training config; fine-tuning windows are warped from once-decoded images, ahead of the
model, into the very crops ``warp_regions`` makes."""

from __future__ import annotations

import pickle

import cv2
import numpy as np
import pytest
import torch

from cluster.local import LocalExecutor
from cluster.resources import pinned_threads
from data.voc import DatasetError
from pipelines import runner
from pipelines.rcnn.common import WarpedWindows
from pipelines.rcnn.train import _crops_and_distractors
from stages.detection.warp import warp_regions
from stages.training.context import LocalTrainContext
from stages.training.rcnn import (
    CropShards,
    ImageWindows,
    prefetch,
    pretrain_train_fn,
    write_crop_shards,
)


def test_pretraining_reads_crop_shards_and_trains_the_model_of_in_memory_crops(
    tmp_path, monkeypatch
):
    """The pretrain step's Train config holds a reference (a few hundred bytes, not the crops),
    the shards hold the crops the driver used to build, and the model is bit-identical to the
    one trained on those crops in memory (the path before issue 19)."""
    configs = []
    real = LocalExecutor.train

    def recording(self, train_fn, config, **kw):
        configs.append(pickle.dumps(config))
        return real(self, train_fn, config, **kw)

    monkeypatch.setattr(LocalExecutor, "train", recording)
    kw = dict(store=str(tmp_path / "store"), runs=tmp_path / "runs", progress=False, log=print)
    result = runner.run(
        "rcnn", "ci", {"pretrain.epochs": "3"}, executor="local", until="pretrain", **kw
    )
    assert result.computed() == ["dataset", "pretrain_crops", "pretrain"]
    (payload,) = configs
    assert len(payload) < 4000 and b"ArtifactFile" in payload  # ≈ 0.5 KB (a path-length store)

    dataset = result.artifacts["dataset"].local_dir()
    chunks = list(
        _crops_and_distractors(dataset, 64, padding=4, warp="warp", backgrounds_per_image=4, seed=0)
    )
    crops = np.concatenate([c for c, _ in chunks]).transpose(0, 3, 1, 2)  # (N, 3, S, S)
    labels = np.concatenate([y for _, y in chunks])
    shards = CropShards(result.artifacts["pretrain_crops"].local_dir())
    assert len(shards) == len(crops) > 100 and shards.labels.tolist() == labels.tolist()
    for i in (0, 1, len(crops) // 2, len(crops) - 1):
        assert torch.equal(shards[i][0], torch.from_numpy(crops[i])), i
        assert int(shards[i][1]) == labels[i]

    in_memory = LocalTrainContext()
    with pinned_threads(2):  # pretrain.threads on ci, as the executor pins them
        pretrain_train_fn(
            in_memory,
            {
                "model": "rcnn_small",
                "model_kwargs": {"input_size": 64, "widths": (16, 32, 64, 128)},
                "num_classes": 5,  # 4 generated classes + distractors
                "images": crops,
                "labels": labels,
                "epochs": 3,
                "batch_size": 64,
                "lr": 0.05,
                "seed": 0,
                "checkpoint_every_epochs": 1,
            },
        )
    saved = torch.load(result.artifacts["pretrain"].local_dir() / "model.pt", weights_only=True)
    want = in_memory.last_checkpoint["model"]
    assert saved["model"].keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(saved["model"][k], v), k
    assert result.metrics["pretrain_examples"] == len(crops)


def test_crop_shards_round_trip_and_name_a_bad_file(tmp_path):
    rng = np.random.default_rng(0)
    crops = rng.normal(size=(7, 5, 5, 3)).astype(np.float32)  # (N, S, S, 3), as warp_regions
    labels = np.array([0, 1, 2, 0, 1, 2, 3])
    chunks = [(crops[:2], labels[:2]), (crops[2:6], labels[2:6]), (crops[6:], labels[6:])]
    index = write_crop_shards(chunks, tmp_path / "c", crops_per_shard=3)
    assert [s["rows"] for s in index["shards"]] == [3, 3, 1] and index["count"] == 7
    shards = CropShards(tmp_path / "c")
    assert len(shards) == 7 and shards.labels.tolist() == labels.tolist()
    for i in range(7):
        x, y = shards[i]
        assert x.shape == (3, 5, 5) and torch.equal(x, torch.from_numpy(crops[i]).permute(2, 0, 1))
        assert int(y) == labels[i]
    # a pickled dataset carries the folder only, never the opened memory maps
    assert pickle.loads(pickle.dumps(shards))._open is None
    np.save(tmp_path / "c" / "crops-00001.npy", np.zeros((3, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"crops-00001\.npy: expected \(K, 3, 5, 5\)"):
        len(CropShards(tmp_path / "c"))
    with pytest.raises(ValueError, match="not a crop-shard folder"):
        len(CropShards(tmp_path / "missing"))


def _hand_made_image(path) -> np.ndarray:
    """A 90x120 BGR image with gradients, a bright square and noise, stored losslessly."""
    yy, xx = np.mgrid[0:90, 0:120]
    image = np.stack([xx * 2, yy * 2, (xx + yy) % 256], axis=2).astype(np.uint8)
    image[20:50, 30:70] = (250, 10, 128)
    image ^= np.random.default_rng(3).integers(0, 16, image.shape, dtype=np.uint8)
    cv2.imwrite(str(path), image)
    return image


BOXES = np.array(
    [
        [1, 1, 120, 90],  # the whole image
        [31, 21, 70, 50],  # the square
        [1, 1, 10, 60],  # at the left/top edge: context falls outside
        [100, 70, 120, 90],  # at the right/bottom edge
        [50, 40, 50, 41],  # one pixel wide
        [12, 5, 95, 33],
    ],
    np.float32,
)


@pytest.mark.parametrize("mode", ["warp", "square_context", "square_mean"])
@pytest.mark.parametrize("padding", [0, 4])
def test_image_windows_are_the_crops_of_warp_regions(tmp_path, mode, padding):
    """Pixel-equal to warping each box alone (and to the source used before issue 19), whatever
    the order of the windows and with windows of two images in one batch."""
    first = _hand_made_image(tmp_path / "a.png")
    second = np.ascontiguousarray(first[::-1, ::-1])
    cv2.imwrite(str(tmp_path / "b.png"), second)
    paths = [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    index = np.repeat([0, 1], len(BOXES))
    boxes, labels = np.concatenate([BOXES, BOXES]), np.arange(2 * len(BOXES)) % 3
    kw = dict(size=32, padding=padding, warp=mode)
    windows = ImageWindows(paths, [(120, 90), (120, 90)], index, boxes, labels, **kw)
    order = np.array([7, 0, 11, 3, 3, 8, 1, 5, 2, 10, 4, 6, 9])
    got = windows.get(order)
    assert got.shape == (len(order), 3, 32, 32) and got.dtype == torch.float32
    for row, w in enumerate(order):
        image = first if index[w] == 0 else second
        want = warp_regions(image, boxes[w : w + 1], size=32, padding=padding, mode=mode)[0]
        np.testing.assert_array_equal(got[row].permute(1, 2, 0).numpy(), want)
    before = WarpedWindows(paths, index, boxes, labels, **kw).get(order)
    assert torch.equal(got, before)
    # warp_regions itself: all boxes at once (they cover more than the image: converted to float
    # once) gives the bytes of one box per call (only that window converted)
    together = warp_regions(first, BOXES, size=32, padding=padding, mode=mode)
    alone = [warp_regions(first, b[None], size=32, padding=padding, mode=mode)[0] for b in BOXES]
    np.testing.assert_array_equal(together, np.stack(alone))


def test_image_windows_check_boxes_and_images_up_front(tmp_path):
    _hand_made_image(tmp_path / "a.png")
    path = str(tmp_path / "a.png")
    outside = np.array([[1, 1, 10, 10], [100, 80, 121, 90]], np.float32)
    with pytest.raises(ValueError, match=r"a\.png: box 1 = \[100.0, 80.0, 121.0, 90.0\]"):
        ImageWindows([path], [(120, 90)], [0, 0], outside, [0, 1], size=16, padding=0)
    wrong_size = ImageWindows([path], [(100, 90)], [0], BOXES[4:5], [1], size=16, padding=0)
    with pytest.raises(DatasetError, match=r"a\.png"):
        wrong_size.get(np.array([0]))
    # decoded images stay in the process that decoded them
    good = ImageWindows([path], [(120, 90)], [0], BOXES[:1], [1], size=16, padding=0)
    good.get(np.array([0]))
    assert len(good._cache) == 1 and pickle.loads(pickle.dumps(good))._cache == {}


def test_stored_windows_travel_as_a_reference_and_come_back_bit_for_bit(tmp_path):
    """After `store`, pickling (what Ray Train does with the config) carries the reference, not
    the windows nor their images: 300 windows of 200 images pickle to the size of 3 windows of
    one image; unpickled, windows, paths (references into an artifact as references, plain paths
    as they were) and sizes are the same bit for bit, and warp the same crops."""
    import dataclasses

    from data.store import Artifact, ArtifactFile, OutputRef

    _hand_made_image(tmp_path / "a.png")
    store = str(tmp_path / "store")
    dataset = ArtifactFile(Artifact(store, "rcnn/dataset/k"))
    rng = np.random.default_rng(0)
    n, images = 300, 200
    xy = rng.uniform(1, 60, (n, 2))
    boxes = np.hstack([xy, xy + rng.uniform(5, 29, (n, 2))]).astype(np.float32)
    labels = rng.integers(0, 5, n)
    # image 0 is the real one; the others alternate references into the artifact and plain paths
    paths = [str(tmp_path / "a.png")] + [
        dataset / f"JPEGImages/{i:06d}.jpg" if i % 2 else f"/data/voc/{i:06d}.jpg"
        for i in range(1, images)
    ]
    sizes = [(120, 90)] * images

    def windows(k, m):
        index = np.zeros(k, np.int64)
        index[1::2] = np.arange(1, k, 2) % m  # windows spread over the m images
        return ImageWindows(paths[:m], sizes[:m], index, boxes[:k], labels[:k], size=16,
                            padding=2)  # fmt: skip

    (tmp_path / "staging").mkdir()
    ref = OutputRef(store, str(tmp_path / "staging"))
    big, small = windows(n, images), windows(3, 1)
    entries = big.store(ref)
    assert sorted(entries) == ["window_images.parquet", "windows.parquet"]
    for name, entry in entries.items():
        assert entry["size"] == (tmp_path / "staging" / name).stat().st_size
    assert entries["windows.parquet"]["size"] > 300 * 16  # the boxes
    sent = pickle.dumps(big)
    assert len(sent) < len(pickle.dumps(small)) + 500 < len(pickle.dumps(windows(n, images)))
    back = pickle.loads(sent)
    for name in ("image_index", "boxes", "labels", "sizes"):
        a, b = getattr(back, name), getattr(big, name)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    assert back.paths == big.paths
    assert all(dataclasses.is_dataclass(p) == (i % 2 == 1) for i, p in enumerate(back.paths))
    order = np.arange(0, n, 14)  # the windows of image 0
    assert torch.equal(back.get(order), big.get(order))


def test_prefetch_keeps_the_order_and_the_values_whatever_the_threads():
    def slow_square(i):
        import time

        time.sleep(0.002 * (i % 3))  # later items may finish first
        return i * i

    want = [i * i for i in range(20)]
    for threads in (0, 1, 3):
        assert list(prefetch(slow_square, range(20), threads=threads)) == want
    # the consumer stopping early leaves no work running and raises nothing
    batches = prefetch(slow_square, range(1000), threads=2)
    assert next(batches) == 0
    batches.close()
    with pytest.raises(ZeroDivisionError):
        list(prefetch(lambda i: 1 // (3 - i), range(5), threads=2))


def test_feature_actors_auto_sizes_the_pool_and_stays_out_of_the_key(tmp_path, monkeypatch):
    import os
    import types

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.engine import step_key
    from pipelines.rcnn import features as rcnn_features
    from pipelines.rcnn.config import PRESETS, DataConfig, FeatureConfig, RCNNConfig
    from pipelines.rcnn.steps import feature_actors
    from pipelines.rcnn.steps import steps as rcnn_steps

    assert FeatureConfig().num_actors == 0  # auto unless a preset or --set says otherwise
    assert feature_actors(3, cluster_gpus=8, cpus=64, shards=100) == 3  # a number is kept
    assert feature_actors(0, cluster_gpus=4, cpus=64, shards=100) == 4  # one per GPU
    assert feature_actors(0, cluster_gpus=0, cpus=16, shards=100) == 15  # CPUs but one
    assert feature_actors(0, cluster_gpus=0, cpus=16, shards=6) == 6  # no idle actors
    assert feature_actors(0, cluster_gpus=0, cpus=1, shards=6) == 1

    def features_step(num_actors: int):
        cfg = RCNNConfig(
            data=DataConfig(source="synthetic"), features=FeatureConfig(num_actors=num_actors)
        )
        return next(s for s in rcnn_steps(cfg) if s.name == "features")

    keys = {step_key(features_step(n), {"dataset": "d", "proposals": "p", "finetune": "f"})
            for n in (0, 1, 7)}  # fmt: skip
    assert len(keys) == 1
    assert PRESETS["ci"]["features.num_actors"] == 2

    # resolved where the step runs: 10 images in shards of 4 on a 2-GPU cluster, then on CPUs
    pq.write_table(pa.table({"image_id": [str(i) for i in range(10)]}), tmp_path / "images.parquet")
    seen = []
    monkeypatch.setattr(rcnn_features, "extract_features", lambda ctx, **kw: seen.append(kw))
    fn = features_step(0).fn
    for executor in (types.SimpleNamespace(cluster_gpus=lambda: 2.0), object()):
        ctx = types.SimpleNamespace(input_dir=lambda _: tmp_path, executor=executor)
        fn(ctx, layers=("fc7",))
    assert seen[0]["num_actors"] == 2 and seen[0]["images_per_shard"] == 8
    assert seen[1]["num_actors"] == max(1, min(len(os.sched_getaffinity(0)) - 1, 2))


@pytest.mark.ray
def test_train_workers_read_their_inputs_and_train_the_in_process_models(tmp_path, ray_session):
    """Under Ray Train the workers resolve the crop shards, the images and the pretrained model
    from references, and both models are bit-identical to the in-process ones (same key, same
    bytes)."""
    short = {"pretrain.epochs": "2", "finetune.iterations": "6", "finetune.lr_step": "4"}
    models = []
    for executor in ("local", "ray"):
        result = runner.run(
            "rcnn",
            "ci",
            short,
            executor=executor,
            until="finetune",
            store=str(tmp_path / executor),
            runs=tmp_path / f"{executor}-runs",
            progress=False,
            log=lambda _: None,
        )
        assert {"pretrain_crops", "pretrain", "finetune"} <= set(result.computed())
        models.append(
            {
                step: torch.load(result.artifacts[step].local_dir() / "model.pt")["model"]
                for step in ("pretrain", "finetune")
            }
        )
    local, ray = models
    for step in ("pretrain", "finetune"):
        for k, v in local[step].items():
            assert torch.equal(ray[step][k], v), (step, k)
