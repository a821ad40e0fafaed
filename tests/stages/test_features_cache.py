import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.detection.features import (
    feature_norm_scale,
    feature_schema,
    iter_feature_shards,
    read_feature_shard,
    sample_rows_for_norm,
    write_feature_shard,
)

C, D = 3, 16


def make_shard(rng: np.random.Generator, images=("000005", "000007"), boxes_per_image=5):
    """Per image: one gt row (class = image position) then proposals; fc7-like ReLU features."""
    rows = []
    for k, image_id in enumerate(images):
        for b in range(boxes_per_image):
            rows.append((image_id, b, b == 0, k if b == 0 else -1))
    n = len(rows)
    x1y1 = rng.uniform(1, 200, (n, 2))
    return {
        "image_ids": [r[0] for r in rows],
        "box_index": np.array([r[1] for r in rows]),
        "is_gt": np.array([r[2] for r in rows]),
        "boxes": np.hstack([x1y1, x1y1 + rng.uniform(10, 100, (n, 2))]).astype(np.float32),
        "gt_class": np.array([r[3] for r in rows]),
        "max_iou": rng.uniform(0, 1, (n, C)).astype(np.float32),
        "features": np.maximum(rng.standard_normal((n, D)), 0).astype(np.float32) * 7,
    }


def write(path, shard, dtype="float32"):
    write_feature_shard(path, **shard, dtype=dtype)
    return path


def test_round_trip_float32_is_exact_and_zero_copy(tmp_path):
    shard = make_shard(np.random.default_rng(0))
    out = read_feature_shard(write(tmp_path / "s.parquet", shard))
    assert list(out["image_ids"]) == shard["image_ids"]
    np.testing.assert_array_equal(out["box_index"], shard["box_index"])
    np.testing.assert_array_equal(out["is_gt"], shard["is_gt"])
    np.testing.assert_array_equal(out["gt_class"], shard["gt_class"])
    np.testing.assert_array_equal(out["boxes"], shard["boxes"])
    np.testing.assert_array_equal(out["max_iou"], shard["max_iou"])
    np.testing.assert_array_equal(out["features"], shard["features"])
    assert out["features"].dtype == np.float32 and out["features"].shape == (10, D)
    assert out["max_iou"].shape == (10, C) and out["boxes"].shape == (10, 4)
    assert not out["features"].flags.owndata  # a view of the Arrow buffer, no copy
    again = read_feature_shard(write(tmp_path / "again.parquet", out))  # read -> write -> read
    assert all(np.array_equal(again[k], out[k]) for k in out)


def test_round_trip_float16_within_half_precision(tmp_path):
    shard = make_shard(np.random.default_rng(1))
    path = write(tmp_path / "h.parquet", shard, dtype="float16")
    got = read_feature_shard(path, ["features"])["features"]
    assert got.dtype == np.float32
    # float16 keeps 11 significant bits: relative error <= 2**-11.
    np.testing.assert_allclose(got, shard["features"], rtol=2**-11, atol=0)
    assert pq.read_schema(path).field("feature").type == pa.binary(D * 2)


def test_float16_overflow_is_an_error(tmp_path):
    shard = make_shard(np.random.default_rng(2))
    shard["features"][0, 0] = 1e5  # > 65504, the largest float16
    with pytest.raises(ValueError, match="not finite"):
        write(tmp_path / "h.parquet", shard, dtype="float16")


def test_schema_types(tmp_path):
    schema = feature_schema(num_classes=20, dim=4096)
    types = {f.name: f.type for f in schema}
    assert types == {
        "image_id": pa.string(),
        "box_index": pa.int32(),
        "is_gt": pa.bool_(),
        "x1": pa.float32(),
        "y1": pa.float32(),
        "x2": pa.float32(),
        "y2": pa.float32(),
        "gt_class": pa.int16(),
        "max_iou": pa.list_(pa.field("element", pa.float32(), nullable=False), 20),
        "feature": pa.binary(4096 * 4),
    }
    assert not any(f.nullable for f in schema)
    assert schema.field("feature").metadata[b"dtype"] == b"float32"
    assert schema.field("feature").metadata[b"dim"] == b"4096"
    path = write(tmp_path / "s.parquet", make_shard(np.random.default_rng(3)))
    assert pq.read_schema(path).remove_metadata().equals(feature_schema(C, D), check_metadata=True)
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    with pytest.raises(ValueError, match="dtype"):
        feature_schema(20, 4096, dtype="float64")


def test_column_subset_and_empty_shard(tmp_path):
    shard = make_shard(np.random.default_rng(4))
    out = read_feature_shard(write(tmp_path / "s.parquet", shard), ["features", "max_iou"])
    assert set(out) == {"features", "max_iou"}
    with pytest.raises(ValueError, match="unknown columns"):
        read_feature_shard(tmp_path / "s.parquet", ["feature"])
    empty = {k: v[:0] for k, v in shard.items()}
    out = read_feature_shard(write(tmp_path / "e.parquet", empty))
    assert out["features"].shape == (0, D) and out["max_iou"].shape == (0, C)


def test_write_rejects_inconsistent_input(tmp_path):
    shard = make_shard(np.random.default_rng(5))
    bad = dict(shard, gt_class=np.zeros(10, dtype=int))  # proposals must have gt_class -1
    with pytest.raises(ValueError, match="gt_class"):
        write(tmp_path / "a.parquet", bad)
    bad = dict(shard, box_index=shard["box_index"][:-1])
    with pytest.raises(ValueError, match="box_index"):
        write(tmp_path / "b.parquet", bad)


def test_missing_files_fail_before_any_read(tmp_path):
    path = write(tmp_path / "s.parquet", make_shard(np.random.default_rng(6)))
    with pytest.raises(FileNotFoundError, match="nope"):
        next(iter_feature_shards([path, tmp_path / "nope.parquet"]))
    with pytest.raises(FileNotFoundError, match="nope"):
        read_feature_shard(tmp_path / "nope.parquet")


def test_iter_feature_shards_in_order(tmp_path):
    shards = [make_shard(np.random.default_rng(s), images=(f"im{s}",)) for s in range(3)]
    paths = [write(tmp_path / f"{s}.parquet", sh) for s, sh in enumerate(shards)]
    got = list(iter_feature_shards(paths[::-1], columns=["image_ids", "features"]))
    assert [g["image_ids"][0] for g in got] == ["im2", "im1", "im0"]
    np.testing.assert_array_equal(got[0]["features"], shards[2]["features"])


def test_norm_sample_is_deterministic_and_made_of_real_rows(tmp_path):
    shards = [make_shard(np.random.default_rng(s), boxes_per_image=20) for s in range(4)]
    paths = [write(tmp_path / f"{s}.parquet", sh) for s, sh in enumerate(shards)]
    a = sample_rows_for_norm(paths, num_rows=50, seed=3)
    b = sample_rows_for_norm(paths[::-1], num_rows=50, seed=3)  # order of paths is irrelevant
    c = sample_rows_for_norm(paths, num_rows=50, seed=4)
    assert a.shape == (50, D) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    everything = np.concatenate([sh["features"] for sh in shards])  # (160, D)
    assert all((everything == row).all(axis=1).any() for row in a)
    assert len({row.tobytes() for row in a}) == 50  # without replacement
    all_rows = sample_rows_for_norm(paths, num_rows=10_000, seed=0)  # more than exist: all
    assert sorted(r.tobytes() for r in all_rows) == sorted(r.tobytes() for r in everything)


def test_norm_scale_gives_mean_norm_20():
    x = np.random.default_rng(7).gamma(2.0, 3.0, (500, 64)).astype(np.float32)
    scale = feature_norm_scale(x)
    assert np.linalg.norm(x.astype(np.float64) * scale, axis=1).mean() == pytest.approx(
        20, abs=1e-5
    )
    assert feature_norm_scale(x, target_norm=1.0) == pytest.approx(scale / 20)
    # Hand case: rows of norm 5 and 15 -> mean 10 -> scale 2.
    assert feature_norm_scale(np.array([[3.0, 4.0], [9.0, 12.0]])) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="> 0"):
        feature_norm_scale(np.zeros((3, 4)))


def test_norms_of_parts_give_the_scale_of_the_whole_sample_bit_for_bit():
    """Issue 19: map tasks return their sample rows' norms, not the rows; the scale from the
    concatenated norms equals `feature_norm_scale` of the concatenated rows exactly."""
    from stages.detection.features import feature_norms, norm_scale

    rng = np.random.default_rng(3)
    parts = [rng.standard_normal((n, 37)).astype(np.float32) * 3 for n in (5, 1, 12, 40)]
    whole = feature_norm_scale(np.concatenate(parts))
    assert norm_scale(np.concatenate([feature_norms(p) for p in parts])) == whole
    with pytest.raises(ValueError, match="at least one"):
        norm_scale(np.zeros(0))


def test_matrix_columns_round_trip_bit_for_bit(tmp_path):
    """Box regression's pairs use the cache's matrix layout (fixed-size binary rows) for any
    dtype: through Parquet, several files (chunks) and row-group slices, every bit comes back."""
    from stages.detection.features import matrix_array, matrix_field, matrix_from

    rng = np.random.default_rng(0)
    a64 = rng.standard_normal((7, 4))
    a32 = rng.standard_normal((7, 5)).astype(np.float32)
    a32[0, 0] = np.float32("nan")  # a payload Parquet must not touch
    schema = pa.schema([matrix_field("t", a64), matrix_field("f", a32)])
    table = pa.Table.from_arrays([matrix_array(a64), matrix_array(a32)], schema=schema)
    for i, (lo, hi) in enumerate([(0, 3), (3, 7)]):
        pq.write_table(table.slice(lo, hi - lo), tmp_path / f"{i}.parquet", compression="none")
    back = pa.concat_tables(pq.read_table(tmp_path / f"{i}.parquet") for i in range(2))
    assert back["t"].num_chunks == 2
    got64 = matrix_from(back["t"], back.schema.field("t"))
    got32 = matrix_from(back["f"], back.schema.field("f"))
    assert got64.dtype == np.float64 and got64.tobytes() == a64.tobytes()
    assert got32.dtype == np.float32 and got32.tobytes() == a32.tobytes()
    sliced = table.slice(2, 3)  # an offset into the buffer
    assert matrix_from(sliced["f"], schema.field("f")).tobytes() == a32[2:5].tobytes()
    empty = matrix_from(table.slice(0, 0)["t"], schema.field("t"))
    assert empty.shape == (0, 4)
    with pytest.raises(ValueError, match="'x' lacks dtype/dim"):
        matrix_from(pa.array([b"ab"], pa.binary(2)), pa.field("x", pa.binary(2)))
