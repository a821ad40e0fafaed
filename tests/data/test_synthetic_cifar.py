"""The generated CIFAR-10-format set: readable by the real reader, deterministic, balanced, learnable."""

from pathlib import Path

import numpy as np
import pytest

from data.cifar import read_cifar10
from data.synthetic_cifar import generate_cifar10, make_split


def test_generated_set_reads_back_through_the_cifar_reader(tmp_path: Path):
    generate_cifar10(tmp_path, n_train=103, n_test=20, seed=3)
    x, y = read_cifar10(tmp_path, "train")
    xt, yt = read_cifar10(tmp_path, "test")
    assert x.shape == (103, 32, 32, 3) and x.dtype == np.uint8 and xt.shape == (20, 32, 32, 3)
    sizes = [(tmp_path / f"data_batch_{i}.bin").stat().st_size // 3073 for i in range(1, 6)]
    assert sizes == [21, 21, 21, 20, 20]  # split evenly over five batches, as CIFAR-10
    ref_x, ref_y = make_split(103, "train", seed=3)
    np.testing.assert_array_equal(x, ref_x)
    np.testing.assert_array_equal(y, ref_y)
    assert np.bincount(yt, minlength=10).tolist() == [2] * 10  # balanced


def test_deterministic_and_split_seeded():
    a, la = make_split(30, "train", seed=0)
    b, lb = make_split(30, "train", seed=0)
    c, _ = make_split(30, "test", seed=0)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(a, c)


def test_classes_are_learnable_but_not_trivial():
    from sklearn.linear_model import LogisticRegression

    x, y = make_split(1000, "train")
    xt, yt = make_split(300, "test")
    clf = LogisticRegression(max_iter=200, tol=1e-3).fit(x.reshape(1000, -1) / 255.0, y)
    acc = clf.score(xt.reshape(300, -1) / 255.0, yt)
    assert 0.2 < acc < 0.9  # a linear model on pixels is well above chance (0.1), far from perfect


def test_too_small_a_set_is_refused_naming_the_directory(tmp_path: Path):
    # before: numpy's "cannot reshape array of size 0", naming no file and no size
    with pytest.raises(ValueError, match=r"cifar: a generated CIFAR-10 set needs n_train >= 5"):
        generate_cifar10(tmp_path / "cifar", 0, 0)
    with pytest.raises(ValueError, match="n_train=4, n_test=1"):
        generate_cifar10(tmp_path / "cifar", 4, 1)  # one of the five train batches would be empty
    with pytest.raises(ValueError, match="n_train=5, n_test=0"):
        generate_cifar10(tmp_path / "cifar", 5, 0)
    generate_cifar10(tmp_path / "cifar", 5, 1)  # the smallest set the reader accepts
    assert read_cifar10(tmp_path / "cifar", "train")[0].shape == (5, 32, 32, 3)
    assert read_cifar10(tmp_path / "cifar", "test")[0].shape == (1, 32, 32, 3)
