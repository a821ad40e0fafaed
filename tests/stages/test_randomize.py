"""§2 randomizations: corruption fractions, shared and per-image permutations, Gaussian moments."""

import numpy as np
import pytest

from stages.generalization.randomize import (
    ARRAYS,
    CONDITIONS,
    channel_moments,
    corrupt_labels,
    load_variant,
    randomize,
    save_variants,
    shuffle_pixels,
)


def _position_images(n: int, h: int = 6, w: int = 5, c: int = 3) -> np.ndarray:
    """Pixel (y, x) of every image holds its flat position in all channels (+ channel offset), so a
    permutation can be read back from the values."""
    pos = np.arange(h * w).reshape(h, w)
    img = np.stack([pos * 10 + ch for ch in range(c)], axis=-1)
    return np.repeat(img[None], n, axis=0).astype(np.int64)  # (N, H, W, C)


@pytest.mark.parametrize("p", [0.0, 0.2, 0.4, 1.0])
def test_corruption_changes_p_times_one_minus_one_over_k(p):
    k, n = 10, 200_000
    labels = np.random.default_rng(0).integers(0, k, n)
    noisy = corrupt_labels(labels, p, k, seed=1)
    expected = p * (1 - 1 / k)  # a redrawn label equals the true one with probability 1/K
    assert np.mean(noisy != labels) == pytest.approx(expected, abs=0.005)
    assert noisy.dtype == np.int64 and noisy.min() >= 0 and noisy.max() < k
    if p == 1.0:  # random labels: uniform over classes, independent of the truth
        counts = np.bincount(noisy, minlength=k) / n
        assert np.allclose(counts, 1 / k, atol=0.005)
        same = np.mean(noisy[labels == 3] == 3)
        assert same == pytest.approx(1 / k, abs=0.01)


def test_corruption_is_seeded_and_validated():
    labels = np.arange(1000) % 10
    a, b = corrupt_labels(labels, 0.4, 10, 7), corrupt_labels(labels, 0.4, 10, 7)
    assert np.array_equal(a, b) and not np.array_equal(a, corrupt_labels(labels, 0.4, 10, 8))
    assert np.array_equal(labels, np.arange(1000) % 10)  # the input is not modified
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
        corrupt_labels(labels, 1.5, 10, 0)


def test_shuffled_pixels_share_one_permutation_between_train_and_test():
    train, test = _position_images(4), _position_images(3)
    out = randomize(
        "shuffled_pixels", train, np.zeros(4), test, np.zeros(3), num_classes=10, seed=0
    )
    assert set(out) == {"train_x", "test_x"}  # labels untouched
    perm = out["train_x"][0, :, :, 0].ravel() // 10  # where each output pixel came from
    assert sorted(perm) == list(range(30)) and not np.array_equal(perm, np.arange(30))
    for images in (out["train_x"], out["test_x"]):
        for img in images:  # every train and test image: the same permutation, channels together
            assert np.array_equal(img[:, :, 0].ravel() // 10, perm)
            assert np.array_equal(img[:, :, 2] - img[:, :, 0], np.full((6, 5), 2))
    assert np.array_equal(out["train_x"][1], shuffle_pixels(train[:1], perm)[0])


def test_random_pixels_use_a_different_permutation_per_image():
    train = _position_images(50)
    out = randomize("random_pixels", train, np.zeros(50), train[:5], np.zeros(5), num_classes=10,
                    seed=0)  # fmt: skip
    perms = out["train_x"][:, :, :, 0].reshape(50, -1) // 10
    assert all(sorted(p) == list(range(30)) for p in perms)  # each a permutation of its own pixels
    assert len({tuple(p) for p in perms}) == 50
    assert not np.array_equal(out["test_x"][0], out["train_x"][0])
    # an image's pixel multiset (its colour histogram) survives
    real = np.random.default_rng(0).integers(0, 255, (3, 8, 8, 3))
    mixed = randomize("random_pixels", real, np.zeros(3), real, np.zeros(3), num_classes=10, seed=1)
    assert np.array_equal(
        np.sort(mixed["train_x"].reshape(3, -1, 3), 1), np.sort(real.reshape(3, -1, 3), 1)
    )


def test_gaussian_matches_the_datasets_channel_mean_and_variance():
    rng = np.random.default_rng(0)
    train = np.clip(rng.normal([60, 120, 200], [10, 30, 40], (400, 16, 16, 3)), 0, 255).astype(
        np.uint8
    )
    out = randomize(
        "gaussian", train, np.zeros(400), train[:100], np.zeros(100), num_classes=10, seed=0
    )
    mean, std = channel_moments(train)
    got_mean, got_std = channel_moments(out["train_x"])
    assert np.allclose(got_mean, mean, atol=0.5) and np.allclose(got_std, std, rtol=0.01)
    assert out["train_x"].dtype == np.float32 and out["test_x"].shape == (100, 16, 16, 3)
    assert not np.allclose(out["test_x"][:5], out["train_x"][:5])


def test_label_conditions_touch_only_training_labels():
    x, y = _position_images(20), np.arange(20) % 10
    assert randomize("true_labels", x, y, x, y, num_classes=10, seed=0) == {}
    for cond, p in (("random_labels", 0.0), ("corrupt", 0.5)):
        out = randomize(cond, x, y, x, y, num_classes=10, seed=0, p=p)
        assert set(out) == {"train_y"}
    with pytest.raises(ValueError, match="unknown condition 'noise'"):
        randomize("noise", x, y, x, y, num_classes=10, seed=0)


def test_saved_variants_roundtrip_and_fall_back_to_the_clean_set(tmp_path):
    rng = np.random.default_rng(0)
    clean = {
        "train_x": rng.integers(0, 255, (30, 8, 8, 3)).astype(np.uint8),
        "train_y": rng.integers(0, 10, 30),
        "test_x": rng.integers(0, 255, (10, 8, 8, 3)).astype(np.uint8),
        "test_y": rng.integers(0, 10, 10),
    }
    for name, arr in clean.items():
        np.save(tmp_path / f"{name}.npy", arr)
    rows = save_variants(
        tmp_path / "v", clean, (*CONDITIONS, "corrupt:0.4"), (0, 1), num_classes=10
    )
    assert len(rows) == 12
    true = load_variant(tmp_path, tmp_path / "v", "true_labels", 0)
    assert all(np.array_equal(true[k], clean[k]) for k in ARRAYS)
    rl0, rl1 = (load_variant(tmp_path, tmp_path / "v", "random_labels", s) for s in (0, 1))
    assert not np.array_equal(rl0["train_y"], rl1["train_y"])  # one draw per trial seed
    assert np.array_equal(rl0["train_x"], clean["train_x"]) and np.array_equal(
        rl0["test_y"], clean["test_y"]
    )
    sp = load_variant(tmp_path, tmp_path / "v", "shuffled_pixels", 0)
    assert np.array_equal(sp["train_y"], clean["train_y"]) and not np.array_equal(
        sp["test_x"], clean["test_x"]
    )
    # drawn once: saving again gives the same bytes
    save_variants(tmp_path / "w", clean, ("random_labels",), (0,), num_classes=10)
    again = load_variant(tmp_path, tmp_path / "w", "random_labels", 0)
    assert np.array_equal(again["train_y"], rl0["train_y"])
    with pytest.raises(FileNotFoundError, match="no saved variant 'gaussian' for seed 5"):
        load_variant(tmp_path, tmp_path / "v", "gaussian", 5)
