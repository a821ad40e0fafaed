"""The R-CNN `features` step's writer: one pass over both splits, shards that never mix them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from data.store import OutputRef
from pipelines import runner
from pipelines.rcnn.common import _save_model, read_images
from pipelines.rcnn.features import FeatureWriter
from stages.detection.features import read_feature_shard
from stages.models.registry import create

COLS = ("image_id", "path", "split", "width", "height")  # the rows the features step sends


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rcnn-features")
    kw = dict(store=str(tmp / "store"), runs=tmp / "runs", progress=False, log=lambda _: None)
    result = runner.run("rcnn", "ci", executor="local", until="proposals", **kw)
    torch.manual_seed(0)
    net = create("rcnn_small", num_classes=21, input_size=32).eval()
    for m in net.modules():  # running statistics that folding must carry over
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    _save_model(
        tmp / "model.pt",
        net.state_dict(),
        model="rcnn_small",
        model_kwargs={"num_classes": 21, "input_size": 32},
        num_outputs=21,
    )
    dataset = result.artifacts["dataset"].local_dir()
    return tmp, net, dataset, result.artifacts["proposals"].local_dir()


def _writer(tmp, dataset, proposals, out, chunk, amp="none"):
    return FeatureWriter(
        model_path=str(tmp / "model.pt"),
        dataset_dir=str(dataset),
        proposals_dir=str(proposals),
        out=OutputRef(str(tmp / "store"), str(out)),  # a local store's staging directory
        layers=("fc7", "pool5"),
        padding=4,
        chunk=chunk,
        dtype="float32",
        amp=amp,
    )


def test_bf16_features_are_float32_and_close_to_float32_ones(inputs):
    """features.amp=bf16: the CNN runs under bfloat16 autocast (8-bit mantissa: relative errors
    of ~1e-2 that float32 cannot produce), the cache still holds float32 of the same boxes."""
    tmp, _, dataset, proposals = inputs
    rows = [r for r in read_images(dataset) if r["split"] == "test"][:2]
    batch = pa.Table.from_pylist([{k: r[k] for k in COLS} for r in rows])
    shard = _writer(tmp, dataset, proposals, tmp / "fp32", 0)(batch).to_pylist()[0]["shard"]
    bf16_writer = _writer(tmp, dataset, proposals, tmp / "bf16", 0, amp="bf16")
    assert bf16_writer.chunk == 64  # the CPU's bf16 default (16 in float32)
    bf16_writer(batch)
    for layer in ("fc7", "pool5"):
        a = read_feature_shard(tmp / "fp32" / layer / shard)
        b = read_feature_shard(tmp / "bf16" / layer / shard)
        np.testing.assert_array_equal(a["boxes"], b["boxes"])
        assert b["features"].dtype == np.float32
        err = np.abs(a["features"] - b["features"]).max() / np.abs(a["features"]).max()
        assert 1e-4 < err < 0.05, (layer, err)  # bf16 rounding, not float32 noise nor garbage
        cos = (a["features"] * b["features"]).sum(1) / (
            np.linalg.norm(a["features"], axis=1) * np.linalg.norm(b["features"], axis=1) + 1e-12
        )
        assert cos.min() > 0.99, (layer, cos.min())
    with pytest.raises(ValueError, match="amp must be"):
        _writer(tmp, dataset, proposals, tmp / "bad", 0, amp="fp8")(batch)


def test_a_batch_straddling_two_splits_becomes_one_shard_per_split(inputs):
    tmp, net, dataset, proposals = inputs
    images = read_images(dataset)
    train = [r for r in images if r["split"] != "test"][-2:]
    test = [r for r in images if r["split"] == "test"][:1]
    cols = COLS
    batch = pa.Table.from_pylist([{k: r[k] for k in cols} for r in train + test])
    manifest = _writer(tmp, dataset, proposals, tmp / "mixed", 0)(batch).to_pylist()
    assert [m["split"] for m in manifest] == [train[0]["split"], "test"]
    assert [m["shard"] for m in manifest] == [f"{train[0]['image_id']}.parquet",
                                              f"{test[0]['image_id']}.parquet"]  # fmt: skip
    for m, rows in zip(manifest, (train, test), strict=True):
        shard = read_feature_shard(tmp / "mixed" / "fc7" / m["shard"])
        assert m["rows"] == len(shard["image_ids"]) > len(rows)  # gt boxes + proposals
        assert set(shard["image_ids"]) == {r["image_id"] for r in rows}
    # the same images one split at a time, one crop per pass, unfolded BatchNorm: same features
    for m, rows in zip(manifest, (train, test), strict=True):
        alone = pa.Table.from_pylist([{k: r[k] for k in cols} for r in rows])
        _writer(tmp, dataset, proposals, tmp / "alone", 1)(alone)
        a = read_feature_shard(tmp / "mixed" / "pool5" / m["shard"])
        b = read_feature_shard(tmp / "alone" / "pool5" / m["shard"])
        np.testing.assert_array_equal(a["boxes"], b["boxes"])
        np.testing.assert_allclose(a["features"], b["features"], rtol=1e-4, atol=1e-4)
    # and against the original (unfused) network on the first crops of the test shard
    from data.voc import load_image
    from stages.detection.warp import warp_regions_tensor

    shard = read_feature_shard(tmp / "mixed" / "fc7" / manifest[1]["shard"])
    x = warp_regions_tensor(load_image(test[0]["path"]), shard["boxes"][:5], size=32, padding=4)
    with torch.inference_mode():
        ref = net.features(x, "fc7").numpy()
    np.testing.assert_allclose(shard["features"][:5], ref, rtol=1e-4, atol=1e-4)
