"""MNIST IDX, CIFAR-10 binary and the bundled digits: byte-exact round trips and error cases."""

import gzip
from pathlib import Path

import numpy as np
import pytest

from data.cifar import CIFAR10_CLASSES, RECORD_BYTES, read_cifar10, write_cifar10_batch
from data.digits import load_digits
from data.errors import DatasetError
from data.mnist import read_idx, read_mnist, write_idx

# ---- IDX ---------------------------------------------------------------------------------


def test_idx_header_bytes(tmp_path: Path):
    write_idx(tmp_path / "a", np.array([[1, 2, 3], [4, 5, 255]], dtype=np.uint8))
    assert (tmp_path / "a").read_bytes() == bytes(
        [0, 0, 0x08, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4, 5, 255]
    )
    write_idx(tmp_path / "b", np.array([1, -2], dtype=np.int32))
    assert (tmp_path / "b").read_bytes() == bytes(
        [0, 0, 0x0C, 1, 0, 0, 0, 2, 0, 0, 0, 1, 0xFF, 0xFF, 0xFF, 0xFE]  # big-endian
    )


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
def test_idx_round_trip(tmp_path: Path, dtype, name: str):
    array = (np.arange(2 * 3 * 4) * 7 - 20).reshape(2, 3, 4).astype(dtype)
    write_idx(tmp_path / name, array)
    back = read_idx(tmp_path / name)
    assert back.dtype == array.dtype and back.shape == (2, 3, 4)
    np.testing.assert_array_equal(back, array)
    back[0, 0, 0] = 1  # a writable copy, not a view of the file bytes


def test_idx_gz_is_gzip_and_deterministic(tmp_path: Path):
    array = np.arange(10, dtype=np.uint8)
    write_idx(tmp_path / "a.gz", array)
    write_idx(tmp_path / "b.gz", array)
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()
    assert gzip.decompress((tmp_path / "a.gz").read_bytes())[:4] == bytes([0, 0, 8, 1])


def test_idx_wrong_magic(tmp_path: Path):
    (tmp_path / "bad").write_bytes(bytes([8, 3, 0, 1, 0, 0, 0, 1, 7]))
    with pytest.raises(DatasetError, match=r"bad: bad magic 08 03 00 01; expected 00 00"):
        read_idx(tmp_path / "bad")


def test_idx_unknown_dtype_code(tmp_path: Path):
    (tmp_path / "bad").write_bytes(bytes([0, 0, 0x0A, 1, 0, 0, 0, 1, 7]))
    with pytest.raises(DatasetError, match=r"bad: unknown IDX dtype code 0x0A; expected one of"):
        read_idx(tmp_path / "bad")


@pytest.mark.parametrize("name", ["t-idx3-ubyte", "t-idx3-ubyte.gz"])
def test_idx_truncated_payload(tmp_path: Path, name: str):
    write_idx(tmp_path / "full", np.zeros((3, 4, 5), dtype=np.int16))  # 120 payload bytes
    data = (tmp_path / "full").read_bytes()[:-1]
    (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    with pytest.raises(
        DatasetError, match=rf"{name}: truncated: dims \(3, 4, 5\) of int16 need 120 .* found 119"
    ):
        read_idx(tmp_path / name)


def test_idx_trailing_bytes_and_short_header(tmp_path: Path):
    write_idx(tmp_path / "x", np.zeros(3, dtype=np.uint8))
    (tmp_path / "x").write_bytes((tmp_path / "x").read_bytes() + b"\0")
    with pytest.raises(DatasetError, match=r"x: trailing bytes: .*need 3 payload bytes, found 4"):
        read_idx(tmp_path / "x")
    (tmp_path / "y").write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 1]))
    with pytest.raises(DatasetError, match=r"y: header needs 16 bytes for 3 dims, file has 8"):
        read_idx(tmp_path / "y")


def test_idx_corrupt_gzip(tmp_path: Path):
    (tmp_path / "c.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DatasetError, match=r"c\.gz: cannot read IDX file"):
        read_idx(tmp_path / "c.gz")
    write_idx(tmp_path / "d.gz", np.zeros(1000, dtype=np.uint8))
    (tmp_path / "d.gz").write_bytes((tmp_path / "d.gz").read_bytes()[:-12])
    with pytest.raises(DatasetError, match=r"d\.gz: corrupt or truncated gzip"):
        read_idx(tmp_path / "d.gz")


# ---- MNIST -------------------------------------------------------------------------------


def fake_mnist(directory: Path, prefix: str, n: int, ext: str = "", n_labels: int | None = None):
    rng = np.random.default_rng(n)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n if n_labels is None else n_labels) % 10).astype(np.uint8)
    directory.mkdir(parents=True, exist_ok=True)
    write_idx(directory / f"{prefix}-images-idx3-ubyte{ext}", images)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte{ext}", labels)
    return images, labels


def test_read_mnist_plain_and_torchvision_layout(tmp_path: Path):
    train = fake_mnist(tmp_path, "train", 12)
    test = fake_mnist(tmp_path / "MNIST" / "raw", "t10k", 7, ext=".gz")
    for split, (images, labels) in (("train", train), ("test", test)):
        got_images, got_labels = read_mnist(tmp_path, split)
        assert got_images.dtype == np.uint8 and got_images.shape == images.shape
        assert got_labels.dtype == np.uint8 and got_labels.shape == (len(images),)
        np.testing.assert_array_equal(got_images, images)
        np.testing.assert_array_equal(got_labels, labels)


def test_mnist_count_mismatch(tmp_path: Path):
    fake_mnist(tmp_path, "train", 5, n_labels=4)
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte: 4 labels for 5 images"):
        read_mnist(tmp_path)


def test_mnist_label_above_9(tmp_path: Path):
    fake_mnist(tmp_path, "train", 5)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1, 2, 10, 3], dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"labels-idx1-ubyte: label 10 at index 3; expected"):
        read_mnist(tmp_path)


def test_mnist_wrong_image_shape(tmp_path: Path):
    fake_mnist(tmp_path, "train", 2)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 32, 32), dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"images-idx3-ubyte: .*\(2, 32, 32\); expected uint8"):
        read_mnist(tmp_path)


def test_mnist_missing_file_lists_candidates(tmp_path: Path):
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte not found; looked for .*raw"):
        read_mnist(tmp_path, "test")


# ---- CIFAR-10 ----------------------------------------------------------------------------


def fake_batch(path: Path, n: int, seed: int):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_cifar10_batch(path, images, labels)
    return images, labels


def test_cifar_record_layout(tmp_path: Path):
    image = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    image[0, 0, 1] = (10, 20, 30)  # row 0, column 1, RGB
    write_cifar10_batch(tmp_path / "b.bin", image, np.array([7]))
    record = (tmp_path / "b.bin").read_bytes()
    assert len(record) == RECORD_BYTES == 3073
    assert (record[0], record[1 + 1], record[1 + 1024 + 1], record[1 + 2048 + 1]) == (7, 10, 20, 30)


def test_cifar_writer_refuses_an_empty_batch_naming_the_file(tmp_path: Path):
    # before: numpy's "cannot reshape array of size 0"; the reader refuses empty batches anyway
    empty = np.zeros((0, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"data_batch_5\.bin: no images to write"):
        write_cifar10_batch(tmp_path / "data_batch_5.bin", empty, np.zeros(0, dtype=np.int64))
    assert not (tmp_path / "data_batch_5.bin").exists()


def test_read_cifar10_round_trip(tmp_path: Path):
    directory = tmp_path / "cifar-10-batches-bin"
    train = [fake_batch(directory / f"data_batch_{i}.bin", 3, seed=i) for i in range(1, 6)]
    test = fake_batch(directory / "test_batch.bin", 4, seed=9)
    images, labels = read_cifar10(tmp_path, "train")
    assert images.shape == (15, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (15,) and labels.dtype == np.int64
    np.testing.assert_array_equal(images, np.concatenate([b[0] for b in train]))
    np.testing.assert_array_equal(labels, np.concatenate([b[1] for b in train]))
    images, labels = read_cifar10(directory, "test")  # the batch directory itself works too
    np.testing.assert_array_equal(images, test[0])
    np.testing.assert_array_equal(labels, test[1])
    assert len(CIFAR10_CLASSES) == 10 and CIFAR10_CLASSES[3] == "cat"


def test_cifar_truncated_batch(tmp_path: Path):
    fake_batch(tmp_path / "test_batch.bin", 2, seed=0)
    data = (tmp_path / "test_batch.bin").read_bytes()
    (tmp_path / "test_batch.bin").write_bytes(data + data[:17])  # 3073 * 2 + 17 bytes
    with pytest.raises(
        DatasetError, match=r"test_batch\.bin: size 6163 bytes .*2 whole records and 17 bytes left"
    ):
        read_cifar10(tmp_path, "test")


def test_cifar_label_above_9(tmp_path: Path):
    fake_batch(tmp_path / "test_batch.bin", 3, seed=0)
    data = bytearray((tmp_path / "test_batch.bin").read_bytes())
    data[2 * RECORD_BYTES] = 10
    (tmp_path / "test_batch.bin").write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"test_batch\.bin: label 10 in record 2; expected 0..9"):
        read_cifar10(tmp_path, "test")


def test_cifar_missing_batch(tmp_path: Path):
    for i in (1, 2, 3, 5):
        fake_batch(tmp_path / f"data_batch_{i}.bin", 1, seed=i)
    with pytest.raises(DatasetError, match=r"not found; missing .*data_batch_4\.bin"):
        read_cifar10(tmp_path, "train")


def test_cifar_pickled_version_refused(tmp_path: Path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"\x80\x04pickle")
    with pytest.raises(DatasetError, match=r"data_batch_1: this is the pickled Python version"):
        read_cifar10(tmp_path, "train")


# ---- digits ------------------------------------------------------------------------------


def test_load_digits():
    images, labels = load_digits()
    assert images.shape == (1797, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (1797,) and labels.dtype == np.int64
    assert labels.min() == 0 and labels.max() == 9
    assert np.bincount(labels).tolist()[:3] == [178, 182, 177]
    assert images.max() == 255 and images.min() == 0
    assert load_digits(size=8)[0].max() == 255  # 16 -> 255 exactly at the original size
    assert load_digits(size=16)[0].shape == (1797, 16, 16)
