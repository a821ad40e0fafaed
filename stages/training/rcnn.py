"""R-CNN's supervised pretraining and domain-specific fine-tuning (REFERENCE §1, R-CNN §2.3, App. B).

Fine-tuning replaces the classifier by an (N+1)-way layer (0 = background) and runs SGD on warped
proposal windows: a proposal takes the class of its max-IoU ground truth if IoU >= 0.5, else it is
background; every minibatch of 128 holds 32 foreground and 96 background windows drawn uniformly,
with replacement, from dataset-wide pools (Caffe's ``window_data_layer``). Both loops are
``train_fn(ctx, config)`` (``stages.training.context``): the same function runs in-process or under
Ray Train with DDP. ``batch_size`` is the *global* minibatch: each of the ``world_size`` workers
draws ``batch_size / world_size`` samples, so the averaged DDP gradient matches the paper's batch.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from stages.detection.boxes import max_iou_assign
from stages.detection.warp import (
    IMAGENET_MEAN_BGR,
    check_boxes,
    crop_geometry,
    paste_window,
    round_half_away,
)
from stages.models.registry import create


def assign_labels(
    proposal_boxes: np.ndarray, gt_boxes: np.ndarray, gt_classes: np.ndarray, fg_iou: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Fine-tuning labels for ``(N, 4)`` VOC xyxy proposals against ``(M, 4)`` ground truth.

    ``gt_classes`` ``(M,)`` are 0-based. Returns ``(labels (N,) int64, max_iou (N,))`` with
    ``label = 1 + class of the max-IoU ground truth`` when ``max_iou >= fg_iou`` and 0 (background)
    otherwise (§2.3: "≥ 0.5 IoU overlap ... as positives"). Ground-truth boxes passed as proposals
    get IoU 1 with themselves and so their own class.
    """
    gt_classes = np.asarray(gt_classes, dtype=np.int64)
    if gt_classes.shape != (len(np.asarray(gt_boxes)),):
        raise ValueError(f"gt_classes {gt_classes.shape} must have one entry per gt box")
    max_iou, gt_index = max_iou_assign(proposal_boxes, gt_boxes)
    labels = np.zeros(len(max_iou), dtype=np.int64)
    fg = max_iou >= fg_iou
    labels[fg] = gt_classes[gt_index[fg]] + 1
    return labels, max_iou


class WindowSampler:
    """Fixed-composition minibatches of window ids, as Caffe's ``window_data_layer`` (App. B).

    ``windows`` ``(W,)`` are ids (e.g. rows of a window source), ``labels`` ``(W,)`` their classes
    (0 = background; ground-truth boxes belong in the foreground pool with their class). Each batch
    has ``int(batch_size * fg_fraction)`` foreground ids (truncated as in Caffe: 32 of 128) and the
    rest background, each drawn uniformly with replacement. If one pool is empty the whole batch
    comes from the other. Batch ``b`` depends only on ``(seed, b)``, so a resumed run redraws
    exactly the batches an uninterrupted one would.
    """

    def __init__(
        self, windows, labels, *, batch_size: int = 128, fg_fraction: float = 0.25, seed: int = 0
    ):
        windows, labels = np.asarray(windows), np.asarray(labels)
        if windows.ndim != 1 or windows.shape != labels.shape:
            raise ValueError(
                f"windows {windows.shape} and labels {labels.shape} must be equal (W,)"
            )
        if batch_size < 1 or not 0.0 <= fg_fraction <= 1.0:
            raise ValueError(
                f"need batch_size >= 1, 0 <= fg_fraction <= 1: {batch_size}, {fg_fraction}"
            )
        self.fg_windows = windows[labels > 0]
        self.bg_windows = windows[labels == 0]
        if len(self.fg_windows) == 0 and len(self.bg_windows) == 0:
            raise ValueError("WindowSampler needs at least one window")
        self.num_fg = int(batch_size * fg_fraction)
        if len(self.fg_windows) == 0:
            self.num_fg = 0
        elif len(self.bg_windows) == 0:
            self.num_fg = batch_size
        self.num_bg = batch_size - self.num_fg
        self.batch_size, self.seed = batch_size, seed
        self.batches_drawn = 0

    def sample(self, batch_number: int | None = None) -> np.ndarray:
        """Window ids ``(batch_size,)``: ``num_fg`` foreground then ``num_bg`` background."""
        b = self.batches_drawn if batch_number is None else batch_number
        rng = np.random.default_rng([self.seed, b])
        fg = self.fg_windows[rng.integers(0, max(len(self.fg_windows), 1), self.num_fg)]
        bg = self.bg_windows[rng.integers(0, max(len(self.bg_windows), 1), self.num_bg)]
        self.batches_drawn = b + 1
        return np.concatenate([fg, bg])

    def batches(self, num_batches: int, start: int = 0) -> Iterator[np.ndarray]:
        for b in range(start, start + num_batches):
            yield self.sample(b)


class WindowSource(Protocol):
    """Warped training windows, produced on the worker (not shipped through the driver)."""

    labels: np.ndarray  # (W,) int, 0 = background

    def __len__(self) -> int: ...

    def get(self, indices: np.ndarray) -> torch.Tensor: ...  # (B, 3, S, S) float


def _split_references(paths: list) -> tuple[list, list[int], list[str]]:
    """Paths as ``(bases, base, name)``: a reference into an artifact (``data.store``'s
    ``ArtifactFile``, ``base / name``) as the index of its base in ``bases``, each base kept once,
    and its name; any other path as base -1 and the path itself. ``bases[b] / name`` gives the
    reference back."""
    import dataclasses

    bases: list = []
    seen: dict = {}
    base, name = [], []
    for p in paths:
        if dataclasses.is_dataclass(p) and hasattr(p, "artifact"):
            root = dataclasses.replace(p, name="")
            base.append(seen.setdefault(root, len(seen)))
            if len(seen) > len(bases):
                bases.append(root)
            name.append(p.name)
        else:
            base.append(-1)
            name.append(os.fspath(p))
    return bases, base, name


class ImageWindows:
    """A ``WindowSource`` of proposal windows warped from their images, on the worker that trains.

    ``paths`` ``(I,)`` image files (or ``ArtifactFile`` references, resolved where this runs),
    ``image_sizes`` ``(I, 2)`` their ``(width, height)``; per window ``image_index`` ``(W,)``,
    ``boxes`` ``(W, 4)`` VOC 1-based xyxy and ``labels`` ``(W,)``. Crops equal ``warp_regions``'s
    byte for byte, but each image is decoded once per process (kept as uint8: VOC2007 trainval ≈
    2.8 GB) and only each window's pixels are converted to float, never the whole image per window
    (2.9 of 3.3 ms per window before, issue 19); the crop geometry of a batch is one vectorised
    call. Thread-safe, so batches can be warped ahead on background threads (``prefetch``).
    Picklable: only paths, boxes and labels travel, and after `store` not even those (VOC2007
    trainval: ≈ 10 M windows, 320 MB; 5,011 image paths): a reference that the unpickling process
    reads them back from. The decoded images stay where they are made.
    """

    WINDOW_COLUMNS = ("image_index", "boxes", "labels")
    WINDOWS, IMAGES = "windows.parquet", "window_images.parquet"  # what `store` writes

    def __init__(
        self,
        paths: list,
        image_sizes: np.ndarray,
        image_index: np.ndarray,
        boxes: np.ndarray,
        labels: np.ndarray,
        *,
        size: int,
        padding: int,
        warp: str = "warp",
        mean_bgr=IMAGENET_MEAN_BGR,
    ):
        self.paths, self.sizes = list(paths), np.asarray(image_sizes, np.int64).reshape(-1, 2)
        self.image_index = np.asarray(image_index, np.int64)
        self.boxes, self.labels = np.asarray(boxes, np.float32), np.asarray(labels, np.int64)
        if len(self.sizes) != len(self.paths) or not (
            len(self.image_index) == len(self.boxes) == len(self.labels)
        ):
            raise ValueError(
                f"ImageWindows: {len(self.paths)} paths need {len(self.paths)} image sizes (got "
                f"{len(self.sizes)}), and image_index, boxes, labels one row per window (got "
                f"{len(self.image_index)}, {len(self.boxes)}, {len(self.labels)})"
            )
        w, h = self.sizes[self.image_index].T
        # every window checked here, before training starts, not at its first draw
        check_boxes(self.boxes, w, h, name_of=lambda i: os.fspath(self.paths[self.image_index[i]]))
        self.size, self.padding, self.warp = size, padding, warp
        self.mean = np.asarray(mean_bgr, np.float32).reshape(3)
        self._cache: dict[int, np.ndarray] = {}
        self._stored, self._bases = None, []  # see `store`

    def __len__(self) -> int:
        return len(self.labels)

    def store(self, ref) -> dict:
        """Write the windows (image index, box, label per window) to ``ref / WINDOWS`` and the
        images (path, width, height) to ``ref / IMAGES`` (``ref``: an `data.store.OutputRef`,
        the step's artifact, written from here), and from then on pickle with the reference in
        their place; returns the files' marker entries by name. A Train worker reads them from
        the store on its own node, not from ``train_loop_config``: what travels is the same
        whatever the number of windows or images."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        windows = pa.table({
            "image_index": self.image_index,
            "boxes": pa.FixedSizeListArray.from_arrays(pa.array(self.boxes.reshape(-1)), 4),
            "labels": self.labels,
        })  # fmt: skip
        bases, base, names = _split_references(self.paths)
        images = pa.table({
            "base": pa.array(base, pa.int32()),
            "path": pa.array(names, pa.string()),
            "width": self.sizes[:, 0],
            "height": self.sizes[:, 1],
        })  # fmt: skip
        entries = {
            name: (ref / name).write(
                lambda path, t=table: pq.write_table(t, path, compression="none")
            )
            for name, table in ((self.WINDOWS, windows), (self.IMAGES, images))
        }
        self._stored, self._bases = ref, bases
        return entries

    def __getstate__(self) -> dict:
        state = {**self.__dict__, "_cache": {}}  # decoded images never travel
        if self._stored is not None:  # nor stored windows and images: the reference does
            state.update(dict.fromkeys((*self.WINDOW_COLUMNS, "paths", "sizes")))
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self._stored is not None and self.labels is None:
            import pyarrow.parquet as pq

            with (self._stored / self.WINDOWS).open_input() as f:
                t = pq.read_table(f)
            self.image_index = t["image_index"].to_numpy()
            self.boxes = t["boxes"].combine_chunks().flatten().to_numpy().reshape(-1, 4)
            self.labels = t["labels"].to_numpy()
            with (self._stored / self.IMAGES).open_input() as f:
                t = pq.read_table(f)
            self.paths = [
                self._bases[b] / n if b >= 0 else n
                for b, n in zip(t["base"].to_pylist(), t["path"].to_pylist(), strict=True)
            ]
            self.sizes = np.stack([t["width"].to_numpy(), t["height"].to_numpy()], 1)

    def image(self, i: int) -> np.ndarray:
        """Image ``i`` decoded (once per process) as ``(H, W, 3)`` BGR uint8."""
        image = self._cache.get(i)
        if image is None:
            from data.voc import load_image  # checks the size against the dataset's table

            image = self._cache.setdefault(
                i, load_image(os.fspath(self.paths[i]), expected_size=tuple(self.sizes[i]))
            )
        return image

    def get(self, indices: np.ndarray) -> torch.Tensor:
        """Windows ``indices`` warped: ``(B, 3, size, size)`` float32, BGR minus the mean."""
        indices = np.asarray(indices, np.int64)
        images, boxes = self.image_index[indices], self.boxes[indices]
        w, h = self.sizes[images].T
        square = self.warp != "warp"
        geometry = crop_geometry(
            boxes.astype(np.float64), w, h, size=self.size, padding=self.padding, square=square
        )
        tight = round_half_away(boxes).astype(np.int64)
        out = np.zeros((len(indices), 3, self.size, self.size), np.float32)  # (B, 3, S, S)
        for row, i in enumerate(images):
            # pasted straight into the channels-first batch through a (S, S, 3) view: a batched
            # permute afterwards took twice as long at 227 px
            view = out[row].transpose(1, 2, 0)
            paste_window(
                self.image(int(i)), geometry[row], tight[row], view, mode=self.warp, mean=self.mean
            )
        return torch.from_numpy(out)


def prefetch(fn: Callable[[int], object], items: Iterable[int], *, threads: int, depth: int = 0):
    """``fn(item)`` for each of ``items``, in order, computed up to ``depth`` (default
    ``2 * threads``) items ahead on ``threads`` background threads while the caller works on the
    current one; ``threads=0`` computes each when it is asked for. ``fn`` must depend on its
    item only, so that the results (and the bytes trained on) do not depend on ``threads``."""
    if threads <= 0:
        yield from map(fn, items)
        return
    depth = depth or 2 * threads
    items = iter(items)
    with ThreadPoolExecutor(threads, thread_name_prefix="prefetch") as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= depth:
                break
        try:
            while pending:
                result = pending.popleft().result()
                for item in items:  # top the queue up by one before handing the result out
                    pending.append(pool.submit(fn, item))
                    break
                yield result
        finally:
            for f in pending:  # the caller stopped early (error, generator closed)
                f.cancel()


FINETUNE_DEFAULTS = {
    "model_kwargs": {},
    # pretrained weights (a state dict, or a saved model's path / ArtifactFile, loaded by each
    # worker: 233 MB for AlexNet need not travel in the config); fc8 is dropped (replaced by the
    # (N+1)-way layer)
    "init_state": None,
    "iterations": 70_000,  # released nets; gains saturate ~40k (App. B, code)
    "batch_size": 128,  # 32 fg + 96 bg windows (§2.3)
    "fg_fraction": 0.25,
    "lr": 0.001,  # 1/10 of the pretraining rate (§2.3)
    # New fc8 learns 10× faster (code). Caffe's model files also give biases 2× lr and no weight
    # decay; that convention is not in the paper and not reproduced here.
    "head_lr_mult": 10.0,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "lr_step": 20_000,  # lr ÷10 every 20k iterations (code)
    "flip": True,  # random horizontal flip of windows (code)
    "seed": 0,
    "report_every": 1000,
    # background threads warping the next minibatches while the model trains on this one (each
    # minibatch depends only on (seed, rank, iteration): the result does not depend on this)
    "input_threads": 2,
}
PRETRAIN_DEFAULTS = {
    "model_kwargs": {},
    "epochs": 10,
    "batch_size": 128,
    "lr": 0.01,  # Caffe's ImageNet AlexNet base_lr; fine-tuning uses 1/10 of it (§2.3)
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "lr_step_epochs": None,  # lr ÷10 every this many epochs; None keeps it constant
    "checkpoint_every_epochs": 1,  # report + checkpoint period (and at the last epoch)
    "flip": True,
    "pixel_mean": None,  # (3,) subtracted from inputs; None: uint8 set's own mean, 0 for float
    "seed": 0,
}


def _resolve(config: dict, required: tuple[str, ...], defaults: dict, what: str) -> dict:
    unknown = set(config) - set(required) - set(defaults)
    if unknown:
        valid = ", ".join(sorted({*required, *defaults}))
        raise KeyError(f"{what} config: unknown keys {sorted(unknown)}; valid keys: {valid}")
    missing = [k for k in required if k not in config]
    if missing:
        raise KeyError(f"{what} config: missing required keys {missing}")
    return {**defaults, **config}


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DDP keeps the real model in .module


def _flip(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Mirror a random half of ``(B, 3, S, S)`` crops left-right."""
    mask = torch.from_numpy(rng.random(len(x)) < 0.5).to(x.device)
    x = x.clone()
    x[mask] = x[mask].flip(-1)
    return x


def _load_backbone(model: torch.nn.Module, init_state) -> None:
    if isinstance(init_state, str | os.PathLike):  # a saved model, read where training runs
        init_state = torch.load(os.fspath(init_state), map_location="cpu", weights_only=True)
    state = init_state["model"] if isinstance(init_state.get("model"), dict) else init_state
    state = {k: v for k, v in state.items() if not k.startswith("fc8.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc8.")]
    if missing or unexpected:
        raise ValueError(
            f"init_state does not fit the model: missing {missing}, unexpected {unexpected}"
        )


def _resume(ctx, net, optimizer, scheduler, counter: str) -> int:
    """Restore the last reported state, if any; returns the completed ``counter`` (0 if none)."""
    checkpoint = ctx.load_checkpoint()
    if checkpoint is None:
        return 0
    net.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    return int(checkpoint[counter])


def finetune_train_fn(ctx, config: dict) -> None:
    """Fine-tune on windows of ``config["window_source"]`` (see ``FINETUNE_DEFAULTS``).

    Required keys: ``model`` (registry name), ``num_classes`` (N, without background),
    ``window_source`` (a ``WindowSource``). Reports ``{"iteration", "loss", "fg_accuracy",
    "bg_accuracy"}`` (averages since the previous report, this worker's windows) every
    ``report_every`` iterations and at the end, with checkpoint ``{"model", "optimizer",
    "scheduler", "iteration"}``; a rerun resumes from ``ctx.load_checkpoint()``.
    """
    cfg = _resolve(config, ("model", "num_classes", "window_source"), FINETUNE_DEFAULTS, "finetune")
    source, num_classes, seed = cfg["window_source"], int(cfg["num_classes"]), int(cfg["seed"])
    labels = np.asarray(source.labels, dtype=np.int64)
    if (
        labels.shape != (len(source),)
        or labels.min(initial=0) < 0
        or labels.max(initial=0) > num_classes
    ):
        raise ValueError(
            f"window_source.labels must be (W,) in [0, {num_classes}], got {labels.shape}"
        )
    if cfg["batch_size"] % ctx.world_size:
        raise ValueError(
            f"batch_size {cfg['batch_size']} is not divisible by {ctx.world_size} workers"
        )

    torch.manual_seed(seed)  # same initial head on every rank (DDP also broadcasts rank 0's)
    model = create(cfg["model"], **cfg["model_kwargs"])
    head_ids = {id(p) for p in model.replace_head(num_classes + 1)}
    if cfg["init_state"] is not None:
        _load_backbone(model, cfg["init_state"])
    model = ctx.prepare_model(model)
    net = _unwrap(model)  # .to()/DDP keep the Parameter objects, so head_ids still identify fc8
    backbone = [p for p in net.parameters() if id(p) not in head_ids]
    head = [p for p in net.parameters() if id(p) in head_ids]
    optimizer = torch.optim.SGD(
        [
            {"params": backbone, "lr": cfg["lr"]},
            {"params": head, "lr": cfg["lr"] * cfg["head_lr_mult"]},
        ],
        lr=cfg["lr"],
        momentum=cfg["momentum"],
        weight_decay=cfg["weight_decay"],
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg["lr_step"], gamma=0.1)
    start = _resume(ctx, net, optimizer, scheduler, "iteration")

    sampler = WindowSampler(
        np.arange(len(source)),
        labels,
        batch_size=cfg["batch_size"] // ctx.world_size,
        fg_fraction=cfg["fg_fraction"],
        seed=seed + ctx.rank,  # each worker draws its own windows
    )

    # All randomness of iteration `it` (windows, flips, dropout) derives from (seed, rank, it), so
    # a resumed run replays exactly what an uninterrupted one would have done, and the windows of
    # later iterations can be warped ahead on other threads.
    def windows(it: int) -> tuple[np.ndarray, torch.Tensor]:
        rng = np.random.default_rng([seed, ctx.rank, it])
        rng.integers(2**62)  # the draw that seeds torch (dropout) in the loop below
        idx = sampler.sample(it)
        crops = torch.as_tensor(source.get(idx), dtype=torch.float32)  # (B, 3, S, S)
        return idx, _flip(crops, rng) if cfg["flip"] else crops

    model.train()
    sums = np.zeros(5)  # loss, fg correct, fg seen, bg correct, bg seen since the last report
    steps = 0
    batches = prefetch(windows, range(start, cfg["iterations"]), threads=cfg["input_threads"])
    for it, (idx, crops) in zip(range(start, cfg["iterations"]), batches, strict=True):
        rng = np.random.default_rng([seed, ctx.rank, it])
        torch.manual_seed(int(rng.integers(2**62)))
        target = torch.from_numpy(labels[idx]).to(ctx.device)  # (B,)
        logits = model(crops.to(ctx.device))  # (B, N + 1)
        loss = F.cross_entropy(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()  # per iteration, as Caffe's "step" policy

        correct = logits.detach().argmax(1) == target
        fg = target > 0
        sums += [
            loss.item(),
            correct[fg].sum().item(),
            fg.sum().item(),
            correct[~fg].sum().item(),
            (~fg).sum().item(),
        ]
        steps += 1
        if (it + 1) % cfg["report_every"] == 0 or it + 1 == cfg["iterations"]:
            metrics = {
                "iteration": it + 1,
                "loss": float(sums[0] / steps),
                "fg_accuracy": float(sums[1] / sums[2]) if sums[2] else float("nan"),
                "bg_accuracy": float(sums[3] / sums[4]) if sums[4] else float("nan"),
            }
            state = {
                "model": net.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "iteration": it + 1,
            }
            ctx.report(metrics, checkpoint=state)
            sums[:], steps = 0.0, 0


CROPS_INDEX = "crops.json"


def write_crop_shards(
    chunks: Iterable[tuple[np.ndarray, np.ndarray]], folder: Path, *, crops_per_shard: int = 512
) -> dict:
    """Write ``(crops (n, S, S, 3) float32, labels (n,))`` chunks (``warp_regions`` output) as
    ``crops-NNNNN.npy`` shards ``(K, 3, S, S)`` float32 + ``labels.npy`` + ``crops.json`` in
    ``folder``, holding at most one shard in memory. ``.npy`` rather than Parquet: training reads
    single crops in a random order, which a memory map serves without decoding (``CropShards``).
    Returns the index written to ``crops.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    shards, labels, pending, size = [], [], [], None

    def flush(rows: np.ndarray) -> None:
        name = f"crops-{len(shards):05d}.npy"
        np.save(folder / name, np.ascontiguousarray(rows.transpose(0, 3, 1, 2)))  # (K, 3, S, S)
        shards.append({"file": name, "rows": len(rows)})

    for crops, chunk_labels in chunks:
        crops = np.asarray(crops, np.float32)
        if crops.ndim != 4 or crops.shape[3] != 3 or len(crops) != len(chunk_labels):
            raise ValueError(f"crop chunks must be (n, S, S, 3) with n labels, got {crops.shape}")
        size = size or crops.shape[1]
        pending.append(crops)
        labels.append(np.asarray(chunk_labels, np.int64))
        if sum(len(c) for c in pending) >= crops_per_shard:
            rows = np.concatenate(pending)
            for start in range(0, len(rows) - crops_per_shard + 1, crops_per_shard):
                flush(rows[start : start + crops_per_shard])
            rest = rows[len(rows) - len(rows) % crops_per_shard :]
            pending = [rest] if len(rest) else []
    if pending:
        flush(np.concatenate(pending))
    all_labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    np.save(folder / "labels.npy", all_labels)
    index = {"count": len(all_labels), "size": size, "shards": shards}
    (folder / CROPS_INDEX).write_text(json.dumps(index, indent=1))
    return index


class CropShards(torch.utils.data.Dataset):
    """The crops of ``write_crop_shards`` as a map-style dataset of ``(crop (3, S, S) float32,
    label)``, read where training runs: ``folder`` is a path or an ``ArtifactFile`` reference,
    resolved (and its shards memory-mapped) at first use in each process, so only the reference
    travels to Train workers, and the page cache, not each worker's heap, holds the crops
    (VOC2007 trainval ≈ 21 GB at 227 px, issue 19)."""

    def __init__(self, folder):
        self.folder = folder
        self._open: tuple | None = None  # (labels, shard offsets, memory maps), per process

    def __getstate__(self) -> dict:
        return {"folder": self.folder, "_open": None}

    def _load(self) -> tuple:
        if self._open is None:
            folder = Path(os.fspath(self.folder))
            try:
                index = json.loads((folder / CROPS_INDEX).read_text())
                labels = np.load(folder / "labels.npy")
                maps = [np.load(folder / s["file"], mmap_mode="r") for s in index["shards"]]
            except (OSError, ValueError, KeyError) as e:
                raise ValueError(
                    f"{folder}: not a crop-shard folder of write_crop_shards ({e})"
                ) from None
            for shard, rows in zip(index["shards"], maps, strict=True):
                if rows.dtype != np.float32 or rows.shape[1:] != (3, index["size"], index["size"]):
                    raise ValueError(
                        f"{folder / shard['file']}: expected (K, 3, {index['size']}, "
                        f"{index['size']}) float32 crops, got {rows.shape} {rows.dtype}"
                    )
            offsets = np.cumsum([0] + [len(m) for m in maps])
            if offsets[-1] != len(labels) or len(labels) != index["count"]:
                raise ValueError(
                    f"{folder}: {offsets[-1]} crops in the shards, {len(labels)} labels, "
                    f"{index['count']} in {CROPS_INDEX}; expected the same number"
                )
            self._open = (labels, offsets, maps)
        return self._open

    @property
    def labels(self) -> np.ndarray:
        return self._load()[0]

    def __len__(self) -> int:
        return len(self._load()[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels, offsets, maps = self._load()
        shard = int(np.searchsorted(offsets, i, side="right")) - 1
        crop = np.array(maps[shard][i - offsets[shard]])  # a copy: the map is read-only
        return torch.from_numpy(crop), torch.tensor(labels[i], dtype=torch.int64)


def pretrain_train_fn(ctx, config: dict) -> None:
    """Supervised image-level classification pretraining (§2.3; see ``PRETRAIN_DEFAULTS``).

    Required keys: ``model``, ``num_classes``, and the examples: ``crops`` (a map-style dataset of
    ``(image (3, S, S), label)`` with ``.labels``, e.g. ``CropShards``: read by each worker) or
    in memory ``images`` ``(N, 3, S, S)`` (uint8 0-255 or float) with ``labels`` ``(N,)`` 0-based.
    Inputs become float minus ``pixel_mean`` (default: an in-memory uint8 set's own per-channel
    mean, as R-CNN subtracts the training mean, App. A; else 0); the checkpoint stores it as
    ``"pixel_mean"`` so warped crops can be normalised the same way later.
    Reports ``{"epoch", "loss", "train_accuracy"}`` per epoch with checkpoint ``{"model",
    "optimizer", "scheduler", "epoch", "pixel_mean"}``; resumes from ``ctx.load_checkpoint()``.
    """
    defaults = {**PRETRAIN_DEFAULTS, "crops": None, "images": None, "labels": None}
    cfg = _resolve(config, ("model", "num_classes"), defaults, "pretrain")
    seed = int(cfg["seed"])
    if (cfg["crops"] is None) == (cfg["images"] is None or cfg["labels"] is None):
        raise KeyError("pretrain config: give either crops or images and labels")
    if cfg["crops"] is not None:
        dataset = cfg["crops"]
        labels = torch.as_tensor(np.asarray(dataset.labels), dtype=torch.int64)
        if len(dataset) == 0 or labels.shape != (len(dataset),):
            raise ValueError(f"crops: {len(dataset)} examples with labels {labels.shape}")
        images = None
    else:
        # copies: arrays that come through Ray's object store are read-only, and torch warns that
        # writing to a tensor made from one is undefined behaviour (issue 22)
        images = torch.as_tensor(np.array(cfg["images"]))
        labels = torch.as_tensor(np.array(cfg["labels"]), dtype=torch.int64)
        if (
            images.ndim != 4
            or images.shape[1] != 3
            or len(images) == 0
            or labels.shape != (len(images),)
        ):
            raise ValueError(
                f"images must be (N, 3, S, S), N > 0, and labels (N,): {images.shape}, "
                f"{labels.shape}"
            )
        dataset = torch.utils.data.TensorDataset(images, labels)
    if labels.min() < 0 or labels.max() >= cfg["num_classes"]:
        raise ValueError(
            f"labels must lie in [0, {cfg['num_classes']}), got {labels.min()}..{labels.max()}"
        )
    if cfg["batch_size"] % ctx.world_size:
        raise ValueError(
            f"batch_size {cfg['batch_size']} is not divisible by {ctx.world_size} workers"
        )
    mean = cfg["pixel_mean"]
    if mean is None and images is not None and images.dtype == torch.uint8:  # float64 sums
        mean = images.sum((0, 2, 3), dtype=torch.float64) / (images.numel() // 3)
    mean = torch.zeros(3) if mean is None else torch.as_tensor(mean, dtype=torch.float32)

    torch.manual_seed(seed)
    model = ctx.prepare_model(
        create(cfg["model"], num_classes=cfg["num_classes"], **cfg["model_kwargs"])
    )
    net = _unwrap(model)
    optimizer = torch.optim.SGD(
        net.parameters(), lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"]
    )
    step = cfg["lr_step_epochs"] or 10**9  # None: a step that never comes
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step, gamma=0.1)
    shuffle = torch.Generator()
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg["batch_size"] // ctx.world_size,
        shuffle=True,
        generator=shuffle,
    )
    loader = ctx.prepare_data_loader(loader)  # Ray: DistributedSampler + device placement
    start = _resume(ctx, net, optimizer, scheduler, "epoch")

    model.train()
    for epoch in range(start, cfg["epochs"]):
        # Order, flips and dropout of an epoch derive from (seed, rank, epoch): resuming replays them.
        rng = np.random.default_rng([seed, ctx.rank, epoch])
        torch.manual_seed(int(rng.integers(2**62)))
        shuffle.manual_seed(seed * 1_000_003 + epoch)  # same order on every rank, as DDP expects
        if hasattr(getattr(loader, "sampler", None), "set_epoch"):
            loader.sampler.set_epoch(epoch)  # DistributedSampler reshuffles per epoch
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in loader:
            x = x.float() - mean.to(x.device).view(1, 3, 1, 1)  # (B, 3, S, S)
            if cfg["flip"]:
                x = _flip(x, rng)
            x, y = x.to(ctx.device), y.to(ctx.device)
            logits = model(x)  # (B, num_classes)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.detach().argmax(1) == y).sum().item()
            seen += len(y)
        scheduler.step()
        state = {
            "model": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch + 1,
            "pixel_mean": mean,
        }
        seen = max(seen, 1)
        metrics = {"epoch": epoch + 1, "loss": loss_sum / seen, "train_accuracy": correct / seen}
        # a checkpoint costs seconds under Ray Train (persisted to storage): every k epochs
        last = epoch + 1 == cfg["epochs"]
        if (epoch + 1) % cfg["checkpoint_every_epochs"] == 0 or last:
            ctx.report(metrics, checkpoint=state)
