"""R-CNN training steps: the pretraining crops, supervised pretraining and (N+1)-way fine-tuning on
warped proposals (§2.3), run under Ray Train. Training examples reach the workers as references to
artifacts (crop shards, images), never by value in the training config (issue 19)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch loads in the steps that use it, not with the pipeline's definition
    import torch

from pipelines.engine import StepContext
from pipelines.rcnn.common import (
    FLOAT32,
    _classes,
    _objects_by_image,
    _proposals,
    _save_model,
    _splits,
    create_size,
    load_model,
    memory_request_mb,
    meta_param_bytes,
    param_bytes,
    read_images,
    train_worker_bytes,
)


# ----------------------------------------------------------------------------------------------
# pretrain: image-level classification on class crops + distractor background windows
def _image_folder_crops(root: str, size: int) -> tuple[torch.Tensor, np.ndarray, int]:
    """An ImageFolder (``root/<class>/<image>``) as whole-image warps, mean-subtracted BGR like
    every crop of the pipeline. Held in memory: meant for modest sets; for ImageNet use
    ``pretrain.weights_path`` (e.g. ``torchvision``)."""
    import torch
    from torchvision.datasets import ImageFolder

    from data.voc import load_image
    from stages.detection.warp import warp_regions

    folder = ImageFolder(root)  # validates the layout; we decode with OpenCV (BGR) ourselves
    if not folder.samples:
        raise ValueError(f"pretrain.image_folder: no images under {root}")
    crops = []
    for path, _ in folder.samples:
        image = load_image(path)
        h, w = image.shape[:2]
        whole = np.array([[1, 1, w, h]], np.float32)
        crops.append(warp_regions(image, whole, size=size, padding=0)[0])
    images = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
    return images, np.asarray(folder.targets), len(folder.classes)


def _crops_and_distractors(
    dataset_dir: Path, size: int, *, padding: int, warp: str, backgrounds_per_image: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per training image: ground-truth object crops (label = class) plus random windows that
    overlap no object by more than 0.3 (label = N, "distractor"), as ``((n, S, S, 3), (n,))``."""
    from data.voc import load_image
    from stages.detection.boxes import box_iou_voc
    from stages.detection.warp import warp_regions

    classes = _classes(dataset_dir)
    train_split, _ = _splits(dataset_dir)
    objects = _objects_by_image(dataset_dir, train_split, classes)
    rng = np.random.default_rng(seed)
    for row in read_images(dataset_dir, train_split):
        image, obj = load_image(row["path"]), objects[row["image_id"]]
        h, w = image.shape[:2]
        side = rng.uniform(0.15, 0.6, (backgrounds_per_image * 4, 2)) * [w, h]
        x1 = rng.uniform(1, w - side[:, 0])
        y1 = rng.uniform(1, h - side[:, 1])
        cand = np.stack([x1, y1, x1 + side[:, 0] - 1, y1 + side[:, 1] - 1], 1).round()
        if len(obj["boxes"]):
            cand = cand[box_iou_voc(cand, obj["boxes"]).max(1) < 0.3]
        cand = cand[:backgrounds_per_image]
        boxes = np.concatenate([obj["boxes"], cand]).astype(np.float32)
        if len(boxes):
            crops = warp_regions(image, boxes, size=size, padding=padding, mode=warp)
            yield crops, np.asarray(list(obj["cls"]) + [len(classes)] * len(cand), np.int64)


def pretrain_crops(
    ctx: StepContext,
    *,
    model: str,
    model_kwargs: dict,
    padding: int,
    backgrounds_per_image: int,
    seed: int,
    warp: str = "warp",  # App. A variants: warp | square_context | square_mean
    image_folder: str = "",
) -> None:
    """The pretraining examples as crop shards in the store (``write_crop_shards``): an
    ImageFolder's whole images, else the training split's object crops + distractors, streamed
    image by image. The pretrain step's workers read them through a reference; before issue 19
    the driver built them all (≈21 GB float32 for VOC2007 trainval) and sent them in the training
    config, to the object store and every worker. Same crops, same order: same model as before."""
    from stages.training.rcnn import write_crop_shards

    size = create_size(model, model_kwargs)
    if image_folder:  # whole images, held in memory by this task alone (modest sets)
        images, labels, num_classes = _image_folder_crops(image_folder, size)
        chunks = [(images.permute(0, 2, 3, 1).numpy(), labels)]
    else:
        dataset_dir = ctx.input_dir("dataset")
        chunks = _crops_and_distractors(
            dataset_dir,
            size,
            padding=padding,
            warp=warp,
            backgrounds_per_image=backgrounds_per_image,
            seed=seed,
        )
        num_classes = len(_classes(dataset_dir)) + 1
    index = write_crop_shards(chunks, ctx.out_dir)
    if index["count"] == 0:
        raise ValueError(f"pretraining: no crops ({image_folder or 'the training split'} is empty)")
    ctx.write_json("metrics.json", {"pretrain_examples": index["count"]})
    ctx.write_json("classes.json", {"num_classes": num_classes})


def pretrain(
    ctx: StepContext,
    *,
    model: str,
    model_kwargs: dict,
    weights_path: str,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    num_workers: int = 1,
) -> None:
    """Supervised pretraining (§2.3): local ImageNet weights when given, else image-level
    classification of the ``pretrain_crops`` step's crops, which each worker reads itself."""
    from stages.training.rcnn import CropShards, pretrain_train_fn

    if weights_path:  # ImageNet weights from a local file (§2.3); never downloaded
        from stages.models.rcnn_backbones import resolve_weights_path
        from stages.models.registry import create

        weights_path = resolve_weights_path(model, weights_path)
        net = create(model, **model_kwargs, weights_path=weights_path)
        _save_model(
            ctx.out_dir / "model.pt",
            net.state_dict(),
            model=model,
            model_kwargs=model_kwargs,
            num_outputs=net.num_outputs,
        )
        ctx.write_json("metrics.json", {"pretrain_weights": weights_path})
        return
    # two small files of the crops' artifact, read alone: input_dir would copy every shard of an
    # object store's artifact to this node, which only the workers read
    crops = ctx.inputs["crops"]
    num_classes = json.loads(crops.read_bytes("classes.json"))["num_classes"]
    examples = json.loads(crops.read_bytes("metrics.json"))["pretrain_examples"]
    # the worker memory-maps the crop shards: its heap holds the net's state and two batches
    size = create_size(model, model_kwargs)
    worker = train_worker_bytes(
        meta_param_bytes(model, model_kwargs, num_classes), batch_size * 3 * size**2 * FLOAT32
    )
    result = ctx.train(
        pretrain_train_fn,
        {
            "model": model,
            "model_kwargs": model_kwargs,
            "num_classes": num_classes,
            "crops": CropShards(ctx.input_file("crops")),  # a reference, resolved by each worker
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "checkpoint_every_epochs": max(1, epochs // 3),  # each checkpoint costs seconds on Ray
        },
        num_workers=num_workers,
        memory_mb=memory_request_mb(worker),
    )
    _save_model(
        ctx.out_dir / "model.pt",
        result.checkpoint["model"],
        model=model,
        model_kwargs=model_kwargs,
        num_outputs=num_classes,
    )
    ctx.write_json(
        "metrics.json",
        {
            "pretrain_train_accuracy": result.metrics["train_accuracy"],
            "pretrain_examples": examples,
        },
    )


# ----------------------------------------------------------------------------------------------
# finetune: (N+1)-way head on warped proposals, 32 fg + 96 bg per batch of 128 (§2.3)
def finetune(
    ctx: StepContext,
    *,
    enabled: bool,
    num_workers: int = 1,
    # unused (and not in the key) when fine-tuning is disabled
    padding: int = 0,
    iterations: int = 0,
    batch_size: int = 0,
    lr: float = 0.0,
    lr_step: int = 0,
    seed: int = 0,
    warp: str = "warp",
) -> None:
    import torch

    from stages.training.rcnn import ImageWindows, assign_labels, finetune_train_fn

    dataset_dir = ctx.input_dir("dataset")
    pretrained = load_model(ctx.input_dir("pretrain") / "model.pt")
    arch = torch.load(ctx.input_dir("pretrain") / "model.pt", weights_only=True)["arch"]
    classes = _classes(dataset_dir)
    if not enabled:  # "no fine-tuning" rows of Table 2: features from the pretrained net
        _save_model(
            ctx.out_dir / "model.pt",
            pretrained.state_dict(),
            model=arch["model"],
            model_kwargs=arch["model_kwargs"],
            num_outputs=arch["num_outputs"],
        )
        ctx.write_json("metrics.json", {"finetune_enabled": 0})
        return
    train_split, _ = _splits(dataset_dir)
    objects = _objects_by_image(dataset_dir, train_split, classes)
    proposals = _proposals(ctx.input_dir("proposals"))
    paths, sizes, index, boxes, labels = [], [], [], [], []
    for i, row in enumerate(read_images(dataset_dir, train_split, ref=ctx.input_file("dataset"))):
        obj = objects[row["image_id"]]
        cand = np.concatenate([obj["boxes"], proposals.get(row["image_id"], np.zeros((0, 4)))])
        lab, _ = (
            assign_labels(cand, obj["boxes"], obj["cls"])
            if len(obj["boxes"])
            else (np.zeros(len(cand), np.int64), None)
        )
        paths.append(row["path"])
        sizes.append((row["width"], row["height"]))
        index.append(np.full(len(cand), i))
        boxes.append(cand)
        labels.append(lab)
    source = ImageWindows(  # images decoded and windows warped by each worker, ahead of the model
        paths,
        np.asarray(sizes),
        np.concatenate(index),
        np.concatenate(boxes).astype(np.float32),
        np.concatenate(labels),
        size=pretrained.input_size,
        padding=padding,
        warp=warp,
    )
    # the windows and their images go to the store (part of the artifact), not into the Train
    # config (issue 19)
    ctx.add_files(source.store(ctx.output("")))
    # a worker decodes every training image once and keeps it (uint8), beside the net's state
    # and two minibatches of windows
    worker = train_worker_bytes(
        param_bytes(pretrained),
        batch_size * 3 * pretrained.input_size**2 * FLOAT32,
        decoded_bytes=sum(3 * w * h for w, h in sizes),
    )
    result = ctx.train(
        finetune_train_fn,
        {
            "model": arch["model"],
            "model_kwargs": arch["model_kwargs"],
            "num_classes": len(classes),
            "window_source": source,
            "init_state": ctx.input_file("pretrain", "model.pt"),  # each worker loads it
            "iterations": iterations,
            "batch_size": batch_size,
            "lr": lr,
            "lr_step": lr_step,
            "seed": seed,
            "report_every": max(1, iterations // 5),
            # warping threads beside the model's, as many as the worker's CPUs (a GPU worker's
            # CPUs feed it: ≈ 1400 AlexNet windows/s per thread, benchmarks/bench_rcnn_input.py);
            # scheduling only: the windows, and so the model, are the same for any number
            "input_threads": max(2, int(ctx.resources.cpus)),
        },
        num_workers=num_workers,
        memory_mb=memory_request_mb(worker),
    )
    _save_model(
        ctx.out_dir / "model.pt",
        result.checkpoint["model"],
        model=arch["model"],
        model_kwargs=arch["model_kwargs"],
        num_outputs=len(classes) + 1,
    )
    fg = int((source.labels > 0).sum())
    ctx.write_json(
        "metrics.json",
        {
            "finetune_enabled": 1,
            "finetune_loss": result.metrics["loss"],
            "finetune_fg_accuracy": result.metrics["fg_accuracy"],
            "finetune_bg_accuracy": result.metrics["bg_accuracy"],
            "finetune_windows_fg": fg,
            "finetune_windows_bg": len(source) - fg,
        },
    )
