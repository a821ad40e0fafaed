"""The SSL dataset step: CIFAR-10 binary, MNIST-format IDX (Fashion-MNIST), a generated
CIFAR-10-format set, or scikit-learn's digits → ``data.npz``."""

from __future__ import annotations

import numpy as np

from pipelines.engine import StepContext


def make_dataset(
    ctx: StepContext,
    *,
    source: str,
    root: str,
    digits_size_px: int,
    digits_test: int,
    num_train: int,
    num_test: int,
    seed: int,
) -> None:
    """``data.npz``: uint8 ``train_images (N, C, H, W)``, ``train_labels (N,)``, test likewise."""
    from data.cifar import read_cifar10

    if source == "mnist":  # MNIST-format IDX (Fashion-MNIST): grey 28×28, one channel
        from data.mnist import read_mnist

        splits = {}
        for split, limit in (("train", num_train), ("test", num_test)):
            images, labels = read_mnist(root, split)  # (N, 28, 28) uint8
            splits[split] = (
                images[: limit or None, None],
                labels[: limit or None].astype(np.int64),
            )
    elif source == "digits":
        from data.digits import load_digits

        images, labels = load_digits(digits_size_px)
        perm = np.random.default_rng(seed).permutation(len(labels))
        te, tr = perm[:digits_test], perm[digits_test:]
        splits = {"train": (images[tr, None], labels[tr]), "test": (images[te, None], labels[te])}
    else:
        if source == "synthetic":
            from data.synthetic_cifar import generate_cifar10

            root = str(ctx.out_dir / "cifar10")
            generate_cifar10(root, n_train=num_train, n_test=num_test, seed=seed)
        elif not root:
            raise ValueError("data.root: set it to a directory of CIFAR-10 binary batches")
        splits = {}
        for split in ("train", "test"):
            images, labels = read_cifar10(root, split)  # (N, 32, 32, 3) RGB
            splits[split] = (np.ascontiguousarray(images.transpose(0, 3, 1, 2)), labels)
    arrays = {
        f"{s}_{k}": v for s, (x, y) in splits.items() for k, v in (("images", x), ("labels", y))
    }
    np.savez(ctx.out_dir / "data.npz", **arrays)
    ctx.write_json(
        "metrics.json",
        {
            "dataset_train": len(arrays["train_labels"]),
            "dataset_test": len(arrays["test_labels"]),
            # (C, H, W): what the training steps size their memory requests by, without a copy
            "image_shape": list(arrays["train_images"].shape[1:]),
        },
    )
