"""Every Train worker and Tune trial of the four training pipelines asks for its own memory
estimate (issue 19): the data it holds, counted from its inputs' markers by hand, and the
largest net it trains (`stages.training.memory`, tested on its own)."""

from __future__ import annotations

import json
from types import SimpleNamespace

from pipelines.memory import WORKER_BASE_BYTES, request_mb
from stages.training.memory import meta_model, training_step_bytes

MIB = 1 << 20


def _artifact(sizes: dict[str, int], files: dict[str, dict] | None = None):
    """An input artifact that knows its files' sizes (what its marker says) and small files."""
    return SimpleNamespace(
        file_bytes=lambda prefix="": sum(
            n for k, n in sizes.items() if not prefix or k == prefix or k.startswith(prefix + "/")
        ),
        read_bytes=lambda name: json.dumps((files or {})[name]).encode(),
    )


def test_request_mb_adds_the_worker_base_and_rounds_up():
    assert request_mb(0) == WORKER_BASE_BYTES // MIB == 1024
    assert request_mb(1) == 1025 and request_mb(MIB) == 1025 and request_mb(MIB + 1) == 1026


def test_batchnorm_mnist_trials_hold_nine_bytes_per_stored_pixel():
    """The uint8 npz (47 MB for MNIST), converted to float32 and scaled: 1 + 4 + 4 bytes per
    stored byte; the §4.1 BN network at the trial's minibatch."""
    from pipelines.batchnorm.experiments import _mnist_mb

    ctx = SimpleNamespace(inputs={"mnist_data": _artifact({"mnist.npz": 54_880_000, "x": 7})})
    net = meta_model("bn_mnist_mlp", bn=True, hidden=(100, 100, 100))
    step = training_step_bytes(net, (60, 28, 28))
    assert _mnist_mb(ctx, (100, 100, 100), 60) == request_mb(9 * 54_880_000 + step)
    assert 1024 + 471 <= _mnist_mb(ctx, (100, 100, 100), 60) <= 1024 + 475  # ≈ 494 MB of data


def test_batchnorm_variant_trials_hold_cifar_at_their_resolution():
    from pipelines.batchnorm.experiments import _variants_mb

    params = dict(image_px=16, max_train=0, max_test=200, width=0.5, batch_size=32)
    data = (50_000 + 200) * 3 * 16 * 16 * 4  # every training image, 200 test images, float32
    net = meta_model("bn_inception_small", width=0.5, bn=True)
    assert _variants_mb(params) == request_mb(3 * data + training_step_bytes(net, (32, 3, 16, 16)))


def test_mobilenet_units_size_the_largest_point_of_a_sweep():
    """The set is held at min(resolution, 32) px; the widest, largest-resolution net of the
    sweep decides the training term; RMSProp keeps one state."""
    from pipelines.mobilenet.experiments import _classifier_mb

    cfg = {"model_kwargs": {}, "max_train": 0, "max_test": 0, "num_classes": 10,
           "optimizer": "rmsprop"}  # fmt: skip
    data = {"num_train": 1000, "num_test": 200}
    models = [("mobilenetv2", {"width_mult": 0.5}, 64), ("mobilenetv2", {"width_mult": 1.4}, 96)]
    step = max(
        training_step_bytes(meta_model(n, num_classes=10, **kw), (64, 3, r, r))
        for n, kw, r in models
    )
    assert step == training_step_bytes(
        meta_model("mobilenetv2", num_classes=10, width_mult=1.4), (64, 3, 96, 96)
    )
    want = request_mb(3 * 1200 * 3 * 32 * 32 * 4 + step)
    assert _classifier_mb(cfg, data, models, 64) == want


def test_generalization_trials_hold_six_copies_of_the_stored_set():
    from pipelines.generalization.experiments import _trial_mb

    ctx = SimpleNamespace(
        inputs={"dataset": _artifact({"train_x.npy": 1_000_000, "meta.json": 80})}
    )
    meta = {"in_channels": 3, "num_classes": 10}
    train = {"batch_size": 128, "crop_px": 28, "width": 0.5, "lr": 0.1}
    nets = [
        meta_model(n, in_shape=(3, 28, 28), num_classes=10, width=0.5)
        for n in ("mlp_1x512", "small_inception")
    ]
    step = max(training_step_bytes(n, (128, 3, 28, 28)) for n in nets)
    got = _trial_mb(ctx, {"model": ("mlp_1x512", "small_inception")}, train, meta)
    assert got == request_mb(6 * 1_000_080 + step)


def test_ssl_runs_count_both_unlabeled_views_on_a_workers_share():
    """(64 labelled + 2 × 7 × 64 unlabeled) / 2 workers = 480 images per worker; momentum and
    the EMA copy; the image shape comes from the dataset's metrics.json, and a set made before
    it was recorded keeps the step's own request (0)."""
    from pipelines.ssl.train import _run_mb

    metrics = {"dataset_train": 100, "image_shape": [1, 28, 28]}
    ctx = SimpleNamespace(
        inputs={"dataset": _artifact({"data.npz": 2_000_000}, {"metrics.json": metrics})}
    )
    settings = {"model": "ssl_convnet", "model_kwargs": (("widths", (8, 16, 32)),),
                "batch_size": 64, "mu": 7}  # fmt: skip
    net = meta_model("ssl_convnet", num_classes=10, in_channels=1, widths=(8, 16, 32))
    step = training_step_bytes(net, (480, 1, 28, 28), optimizer_states=2)
    assert _run_mb(ctx, settings, world=2) == request_mb(5 * 2_000_000 + step)
    old = SimpleNamespace(inputs={"dataset": _artifact({}, {"metrics.json": {"dataset_train": 1}})})
    assert _run_mb(old, settings) == 0
