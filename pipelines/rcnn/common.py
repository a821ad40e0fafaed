"""R-CNN steps' shared helpers: dataset tables, proposals, model build/save/load, warped windows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq

from pipelines.memory import WORKER_BASE_BYTES  # noqa: F401 - the rcnn steps' names for them
from pipelines.memory import request_mb as memory_request_mb  # noqa: F401

if TYPE_CHECKING:  # torch loads in the steps that use it, not with the pipeline's definition
    import torch


# ----------------------------------------------------------------------------------------------
# shared helpers
def read_images(dataset_dir: Path, split: str | None = None, ref=None) -> list[dict]:
    """Rows of the dataset artifact's ``images.parquet`` (of one split), paths made absolute; with
    ``ref`` (the artifact's ``ArtifactFile``), images inside the artifact become references that
    remote work (map tasks, Train workers) resolves on its own node (issue 18)."""
    rows = pq.read_table(dataset_dir / "images.parquet").to_pylist()
    for r in rows:
        if ref is not None and not Path(r["path"]).is_absolute():
            r["path"] = ref / r["path"]
        else:
            r["path"] = str(dataset_dir / r["path"])  # joining an absolute path keeps it
    return [r for r in rows if split is None or r["split"] == split]


def _classes(dataset_dir: Path) -> list[str]:
    return json.loads((dataset_dir / "classes.json").read_text())


def _splits(dataset_dir: Path) -> tuple[str, str]:
    splits = json.loads((dataset_dir / "splits.json").read_text())
    return splits["train"], splits["test"]


def _objects_by_image(dataset_dir: Path, split: str, classes: list[str]) -> dict[str, dict]:
    """Per image of ``split``: gt boxes (G, 4), class indices (G,), difficult (G,)."""
    table = pq.read_table(dataset_dir / "objects.parquet").to_pylist()
    out = {
        r["image_id"]: {"boxes": [], "cls": [], "difficult": []}
        for r in read_images(dataset_dir, split)
    }
    for o in table:
        if o["split"] == split:
            entry = out[o["image_id"]]
            entry["boxes"].append([o["x1"], o["y1"], o["x2"], o["y2"]])
            entry["cls"].append(classes.index(o["class"]))
            entry["difficult"].append(o["difficult"])
    return {
        k: {
            "boxes": np.asarray(v["boxes"], np.float32).reshape(-1, 4),
            "cls": np.asarray(v["cls"], np.int64),
            "difficult": np.asarray(v["difficult"], bool),
        }
        for k, v in out.items()
    }


def _proposals(prop_dir: Path) -> dict[str, np.ndarray]:
    from stages.detection.proposals import boxes_by_image

    return boxes_by_image(pq.read_table(prop_dir / "proposals.parquet"))


def _build_model(model: str, model_kwargs: dict, num_outputs: int, state: dict | None):
    from stages.models.registry import create

    net = create(model, **model_kwargs)
    if net.num_outputs != num_outputs:
        net.replace_head(num_outputs)
    if state is not None:
        net.load_state_dict(state)
    return net.eval()


# ----------------------------------------------------------------------------------------------
# memory requests (issue 19): each unit of work asks Ray for its own estimate, so concurrent
# units never exhaust a node; `paperline plan` prints the same estimates (without the base)
FLOAT32 = 4


def train_worker_bytes(param_bytes: int, batch_bytes: int, decoded_bytes: int = 0) -> int:
    """A training worker's peak: weights, gradients, momentum and the model's copy in flight
    (4×), two minibatches (one training, one prepared ahead) and the images it keeps decoded."""
    return 4 * param_bytes + 2 * batch_bytes + decoded_bytes


def features_actor_bytes(param_bytes: int, shard_feature_bytes: int, crop_bytes: int = 0) -> int:
    """A feature actor's peak: its CNN, one shard's features (concatenated once to write) and a
    chunk of warped crops with the first layers' activations (≈ 2× the crops)."""
    return param_bytes + 2 * shard_feature_bytes + 3 * crop_bytes


# Selective search's peak in its helper process per pixel searched: 160-210 B/px measured on
# generated scenes and on noise from 250x188 to 1000x750 px (the segmentations, gradient images
# and region histograms of OpenCV's implementation), rounded up; plus the helper's interpreter
# with OpenCV loaded (80-210 MiB measured with what it imports).
SEARCH_BYTES_PER_PIXEL = 256
SEARCH_HELPER_BYTES = 256 << 20


def search_pixels(width: int, height: int, resize_width: int = 0) -> int:
    """Pixels selective search works on: the image's, or at ``resize_width`` (its aspect kept, as
    `stages.detection.proposals.selective_search` resizes)."""
    if resize_width and resize_width != width:
        return resize_width * max(1, int(height * resize_width / width + 0.5))
    return width * height


def proposals_task_bytes(max_pixels: int) -> int:
    """A selective-search task's peak beyond its worker: the helper process searching its largest
    image (one image at a time)."""
    return SEARCH_HELPER_BYTES + SEARCH_BYTES_PER_PIXEL * int(max_pixels)


def map_with_memory(ctx, fn, items: list, memory_mb: int, desc: str) -> list:
    """``ctx.map`` with a memory request from the map's own estimate (issue 19: concurrent tasks
    could exhaust a node), raised above the step's request, never lowered. A request only
    schedules: it is not in the key."""
    return ctx.executor.map(fn, items, resources=ctx.resources_with(memory_mb), desc=desc)


def param_bytes(net) -> int:
    from stages.training.memory import param_bytes as weights  # torch only where it is needed

    return weights(net)


def meta_net(model: str, model_kwargs: dict, num_outputs: int):
    """The net built on torch's meta device (`stages.training.memory.meta_model`) with a head of
    ``num_outputs``: its shapes, no memory, no weights."""
    import torch

    from stages.training.memory import meta_model

    net = meta_model(model, **model_kwargs)
    if net.num_outputs != num_outputs:
        with torch.device("meta"):
            net.replace_head(num_outputs)
    return net


def meta_param_bytes(model: str, model_kwargs: dict, num_outputs: int) -> int:
    """float32 parameter bytes of the net (built on the meta device)."""
    return param_bytes(meta_net(model, model_kwargs, num_outputs))


def create_size(model: str, model_kwargs: dict) -> int:
    return {"rcnn_alexnet": 227, "rcnn_vgg16": 224}.get(model, model_kwargs.get("input_size", 64))


def _save_model(
    path: Path, state: dict, *, model: str, model_kwargs: dict, num_outputs: int
) -> None:
    import torch

    arch = {"model": model, "model_kwargs": model_kwargs, "num_outputs": num_outputs}
    torch.save({"model": state, "arch": arch}, path)
    # the architecture alone, for a driver sizing work on the net without fetching its weights
    path.with_name("arch.json").write_text(json.dumps(arch, sort_keys=True))


def load_model(path: Path):
    import torch

    saved = torch.load(path, map_location="cpu", weights_only=True)
    arch = saved["arch"]
    return _build_model(arch["model"], arch["model_kwargs"], arch["num_outputs"], saved["model"])


class WarpedWindows:
    """Fine-tuning windows, warped on the worker that trains (``WindowSource``): images are read
    lazily and cached per process, so only paths and boxes travel through Ray."""

    def __init__(
        self,
        paths: list[str],
        image_index: np.ndarray,
        boxes: np.ndarray,
        labels: np.ndarray,
        *,
        size: int,
        padding: int,
        warp: str = "warp",
    ):
        self.paths, self.image_index, self.boxes = paths, image_index, boxes
        self.labels, self.size, self.padding, self.warp = labels, size, padding, warp
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def _image(self, i: int) -> np.ndarray:
        from data.voc import load_image

        if i not in self._cache:
            self._cache[i] = load_image(self.paths[i])
        return self._cache[i]

    def get(self, indices: np.ndarray) -> torch.Tensor:
        import torch

        from stages.detection.warp import warp_regions

        crops = np.empty((len(indices), self.size, self.size, 3), np.float32)
        for i in np.unique(self.image_index[indices]):
            rows = np.nonzero(self.image_index[indices] == i)[0]
            crops[rows] = warp_regions(
                self._image(int(i)),
                self.boxes[indices[rows]],
                size=self.size,
                padding=self.padding,
                mode=self.warp,
            )
        return torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous()  # (B, 3, S, S)
