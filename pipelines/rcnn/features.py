"""R-CNN `features` step: warp every gt box and proposal, CNN features into the Parquet cache
(Ray Data actor pool), and the readers of that cache."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:  # torch loads in the steps that use it, not with the pipeline's definition
    import torch

from data.store import OutputRef
from pipelines.engine import StepContext
from pipelines.rcnn.common import (
    FLOAT32,
    _classes,
    _objects_by_image,
    _proposals,
    _splits,
    features_actor_bytes,
    load_model,
    memory_request_mb,
    meta_net,
    param_bytes,
)


# ----------------------------------------------------------------------------------------------
# features: warp every gt box and proposal, CNN features, Parquet cache (one shard per batch)
class FeatureWriter:
    """Ray Data actor: holds the CNN; per batch of image rows writes one shard per layer."""

    def __init__(
        self,
        model_path: str,
        dataset_dir: str,
        proposals_dir: str,
        out: OutputRef,
        layers: tuple[str, ...],
        padding: int,
        chunk: int,
        dtype: str,
        warp: str = "warp",
        amp: str = "none",
    ):
        # the actor holds a GPU when the cluster has one (Resources(gpus="auto"))
        import torch

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # BatchNorm folded into the convolutions: one pass fewer over every activation map
        self.model = load_model(Path(model_path)).fused_for_inference().to(self.device)
        self.dataset_dir, self.out = Path(dataset_dir), out
        self.classes = _classes(self.dataset_dir)
        self.proposals = _proposals(Path(proposals_dir))
        self.objects = {
            s: _objects_by_image(self.dataset_dir, s, self.classes)
            for s in _splits(self.dataset_dir)
        }
        self.layers, self.padding, self.dtype = layers, padding, dtype
        self.chunk = chunk or default_chunk(self.device, amp)
        self.warp, self.amp = warp, amp

    def __call__(self, batch: pa.Table) -> pa.Table:
        """One shard per split present in ``batch`` (the SVMs stream only training shards,
        detection only test ones, so a shard never mixes splits), written into the store from
        this node; one manifest row per shard, with the marker entries of its files."""
        rows = batch.to_pylist()
        shards = []
        for split in dict.fromkeys(r["split"] for r in rows):  # splits in order of appearance
            part = [r for r in rows if r["split"] == split]
            shard, n, files = self._write_shard(part)
            shards.append({"shard": shard, "split": split, "rows": n, "files": json.dumps(files)})
        return pa.Table.from_pylist(shards, schema=RESULT_SCHEMA)

    def _write_shard(self, rows: list[dict]) -> tuple[str, int, dict]:
        from data.voc import load_image
        from stages.detection.boxes import box_iou_voc
        from stages.detection.features import write_feature_shard

        cols = {k: [] for k in ("image_ids", "box_index", "is_gt", "boxes", "gt_class", "max_iou")}
        feats = {layer: [] for layer in self.layers}
        for r in rows:
            image_id = r["image_id"]
            obj = self.objects[r["split"]][image_id]
            props = self.proposals.get(image_id, np.zeros((0, 4), np.float32))
            boxes = np.concatenate([obj["boxes"], props]).astype(np.float32)
            n_gt = len(obj["boxes"])
            max_iou = np.zeros((len(boxes), len(self.classes)), np.float32)
            if n_gt:  # per class: max IoU with that class's gt, difficult included (features.py)
                iou = box_iou_voc(boxes, obj["boxes"])
                for c in np.unique(obj["cls"]):
                    max_iou[:, c] = iou[:, obj["cls"] == c].max(1)
            image = load_image(self.dataset_dir / r["path"], (r["width"], r["height"]))
            out = image_features(
                self.model,
                image,
                boxes,
                layers=self.layers,
                padding=self.padding,
                mode=self.warp,
                chunk=self.chunk,
                device=self.device,
                amp=self.amp,
            )
            for layer in self.layers:
                feats[layer].append(out[layer])
            cols["image_ids"] += [image_id] * len(boxes)
            cols["box_index"].append(np.arange(len(boxes), dtype=np.int32))
            cols["is_gt"].append(np.arange(len(boxes)) < n_gt)
            cols["boxes"].append(boxes)
            cols["gt_class"].append(np.concatenate([obj["cls"], -np.ones(len(props), np.int64)]))
            cols["max_iou"].append(max_iou)
        shard = f"{rows[0]['image_id']}.parquet"  # image ids are unique: so are shard names
        arrays = {k: (v if k == "image_ids" else np.concatenate(v)) for k, v in cols.items()}
        files = {}
        for layer in self.layers:
            features = np.concatenate(feats[layer])
            files[f"{layer}/{shard}"] = (self.out / layer / shard).write(
                lambda path, f=features: write_feature_shard(
                    path, **arrays, features=f, dtype=self.dtype
                )
            )
        return shard, len(arrays["image_ids"]), files


MANIFEST_SCHEMA = pa.schema([("shard", pa.string()), ("split", pa.string()), ("rows", pa.int64())])
# what an actor returns per shard: its manifest row and its files' marker entries (JSON)
RESULT_SCHEMA = MANIFEST_SCHEMA.append(pa.field("files", pa.string()))


WARP_CHUNK = 256  # boxes warped per call: each call converts the whole image to float once


def image_features(
    model,
    image: np.ndarray,
    boxes: np.ndarray,
    *,
    layers: tuple[str, ...],
    padding: int,
    mode: str,
    chunk: int,
    device: torch.device,
    amp: str = "none",
) -> dict[str, np.ndarray]:
    """``{layer: float32 (N, D)}`` for ``(N, 4)`` boxes of one BGR image: boxes are warped
    ``WARP_CHUNK`` at a time and the crops go through the CNN ``chunk`` at a time (a small chunk
    keeps a CPU's activations in cache; warping as few boxes per call would repeat the image's
    conversion, which cost more than the forward pass at 16 boxes per call). ``amp="bf16"`` runs
    the CNN under bfloat16 autocast; the features come back as float32 either way."""
    import torch

    from stages.detection.warp import warp_regions_tensor

    if amp not in ("none", "bf16"):
        raise ValueError(f"amp must be 'none' or 'bf16', got {amp!r}")
    out: dict[str, list[np.ndarray]] = {layer: [] for layer in layers}
    per_warp = max(chunk, WARP_CHUNK)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")
    with torch.inference_mode(), autocast:
        for s in range(0, len(boxes), per_warp):
            crops = warp_regions_tensor(
                image,
                boxes[s : s + per_warp],
                size=model.input_size,
                padding=padding,
                mode=mode,
            )
            for t in range(0, len(crops), chunk):
                feats = model.features_all(crops[t : t + chunk].to(device, non_blocking=True))
                for layer in layers:
                    out[layer].append(feats[layer].float().cpu().numpy())
    return {
        layer: np.concatenate(v) if v else np.zeros((0, model.feature_dims[layer]), np.float32)
        for layer, v in out.items()
    }


def default_chunk(device: torch.device, amp: str = "none") -> int:
    """Crops per forward pass when ``features.chunk`` is 0: small on a CPU, where a chunk's
    activations must stay in cache, large on a GPU, which needs the parallelism. In bf16 a CPU
    does best at 64 (half the bytes per activation; AlexNet's fc6/fc7 GEMMs need the rows:
    1.4x faster at 64 than at 16, `rcnn_small` 1.5x; benchmarks/bench_features.py)."""
    if device.type == "cuda":
        return 256
    return 64 if amp == "bf16" else 16


def _actor_memory_mb(
    ctx: StepContext, layers: tuple[str, ...], images_per_shard: int, chunk: int, images: int
) -> int:
    """An actor's memory request: its CNN, one shard's rows (ground truth + proposals, 1.5× the
    mean per image) in every cached layer, and a chunk of crops (a GPU's default chunk, the
    larger). Sized from two small reads, never a copy of the weights or the proposals."""
    arch_json = ctx.inputs["finetune"].read_bytes("arch.json")
    if arch_json is None or not images:  # a model saved before arch.json: the step's request
        return 0
    arch = json.loads(arch_json)
    net = meta_net(arch["model"], arch["model_kwargs"], arch["num_outputs"])
    per_image = 1.5 * ctx.inputs["proposals"].parquet_rows("proposals.parquet") / images + 64
    dims = sum(net.feature_dims[x] for x in layers)
    shard = round(images_per_shard * per_image * dims * FLOAT32)
    crops = (chunk or 256) * 3 * net.input_size**2 * FLOAT32
    return memory_request_mb(features_actor_bytes(param_bytes(net), shard, crops))


def extract_features(
    ctx: StepContext,
    *,
    layers: tuple[str, ...],
    padding: int,
    images_per_shard: int,
    dtype: str,
    num_actors: int,
    chunk: int,
    warp: str = "warp",
    amp: str = "none",
) -> None:
    dataset_dir = ctx.input_dir("dataset")
    images = pq.ParquetFile(dataset_dir / "images.parquet").metadata.num_rows  # the footer only
    kwargs = dict(  # references the actors resolve on their node, not the driver's paths
        model_path=ctx.input_file("finetune", "model.pt"),
        dataset_dir=ctx.input_file("dataset"),
        proposals_dir=ctx.input_file("proposals"),
        out=ctx.output(""),
        layers=layers,
        padding=padding,
        chunk=chunk,
        dtype=dtype,
        warp=warp,
        amp=amp,
    )
    # one inference pass over both splits (one actor pool to start, not one per split) of the
    # dataset's image rows, which it writes split by split: FeatureWriter splits the batch that
    # straddles the two. The actors read the rows from the artifact on their own nodes; image
    # paths are as the artifact holds them (relative to it, or absolute for a data.root set)
    result = ctx.infer(
        ctx.input_file("dataset", "images.parquet"),
        FeatureWriter,
        kwargs,
        batch_size=images_per_shard,
        num_actors=num_actors,
        memory_mb=_actor_memory_mb(ctx, layers, images_per_shard, chunk, images),
    )
    for files in result["files"].to_pylist():
        ctx.add_files(json.loads(files))
    # in input order whatever order the actors finished in: the manifest's bytes follow the key
    manifest = result.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA).sort_by("shard")
    pq.write_table(manifest, ctx.out_dir / "shards.parquet")
    ctx.write_json(
        "metrics.json",
        {
            "feature_rows": int(pa.compute.sum(manifest["rows"]).as_py()),
            "feature_shards": manifest.num_rows,
        },
    )


def feature_shards(features_dir: Path, layer: str, split: str, ref=None) -> list:
    """The shards of ``layer`` for ``split``, sorted: paths under ``features_dir``, or with
    ``ref`` (the artifact's ``ArtifactFile``) references that map tasks resolve on their own node."""
    manifest = pq.read_table(features_dir / "shards.parquet").to_pylist()
    names = sorted(f"{layer}/{m['shard']}" for m in manifest if m["split"] == split)
    return [ref / n if ref is not None else features_dir / n for n in names]


class Pool5Head:
    """fc6/fc7 recomputed from cached pool5 with the fine-tuned net's weights, as R-CNN's code
    did (it cached pool5 only: ≈740 GB for VOC07 trainval + test, against ≈1.07 TB with fc7 too;
    `paperline plan rcnn --preset voc2007`).
    Matches ``RCNNBackbone.features`` in eval mode (ReLU after fc6 and fc7; dropout is off).

    ``device``: "auto" computes on the GPU when the task holding the head was given one (Ray sets
    ``CUDA_VISIBLE_DEVICES``; the svm and detect steps ask for a GPU whenever the cluster has or
    can start one) and in numpy otherwise, so a CPU's bytes never depend on the cluster; "numpy",
    or a torch device ("cpu", "cuda") to choose. On a GPU the products round differently: the
    scores agree with numpy's to float32 tolerance, not bit for bit (`tests/pipelines/rcnn/
    test_features.py`, and its ``gpu`` test in ``benchmarks/gpu_check.sh``). The weights go to
    the device once per process and never travel with the pickled head.

    ``Pool5Head.stored(ref, layer)`` keeps the reference to the fine-tuned model's file
    (``ArtifactFile``) it was read from and pickles as that reference: a task reads the weights
    from the store on its own node, once per process and file version, instead of receiving
    them by value (AlexNet's fc6/fc7 are ≈ 218 MB, and svm maps once per mining round: at
    VOC2007's 627 rounds that was ≈ 137 GB through the object store; issue 19)."""

    _WEIGHTS = ("w6", "b6", "w7", "b7")

    def __init__(self, net, layer: str, device: str = "auto"):
        self.layer, self.device = layer, device
        self.w6, self.b6 = net.fc6.weight.detach().numpy(), net.fc6.bias.detach().numpy()
        self.w7, self.b7 = net.fc7.weight.detach().numpy(), net.fc7.bias.detach().numpy()
        self.source = None
        self._on_device: tuple | None = None

    @classmethod
    def stored(cls, ref, layer: str, device: str = "auto") -> Pool5Head:
        """The head of the model saved at ``ref`` (``ArtifactFile`` or path), pickling as ``ref``
        (read here without the per-process cache: the step's process keeps no copy after it)."""
        head = cls(load_model(Path(os.fspath(ref))), layer, device)
        head.source = ref
        return head

    def __getstate__(self) -> dict:
        state = {**self.__dict__, "_on_device": None}
        if self.source is not None:  # the reference travels, not the weights
            state.update(dict.fromkeys(self._WEIGHTS))
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("source", None)
        if self.source is not None:
            self.w6, self.b6, self.w7, self.b7 = _head_weights(self.source)

    def _torch_device(self) -> str | None:
        if self.device == "numpy":
            return None
        if self.device != "auto":
            return self.device
        if not os.environ.get("CUDA_VISIBLE_DEVICES"):  # no GPU given to this task
            return None
        import torch

        return "cuda" if torch.cuda.is_available() else None

    def __call__(self, pool5: np.ndarray) -> np.ndarray:
        if self.layer == "pool5":
            return pool5
        device = self._torch_device()
        if device is not None:
            return self._torch(pool5, device)
        h = np.maximum(pool5 @ self.w6.T + self.b6, 0)  # (N, fc6)
        return h if self.layer == "fc6" else np.maximum(h @ self.w7.T + self.b7, 0)

    def _torch(self, pool5: np.ndarray, device: str) -> np.ndarray:
        import torch

        if self._on_device is None or self._on_device[0] != device:
            ws = (self.w6, self.b6, self.w7, self.b7)
            self._on_device = (device, *(torch.from_numpy(w).to(device) for w in ws))
        _, w6, b6, w7, b7 = self._on_device
        with torch.no_grad():
            h = torch.relu(torch.from_numpy(np.ascontiguousarray(pool5)).to(device) @ w6.T + b6)
            if self.layer == "fc7":
                h = torch.relu(h @ w7.T + b7)
        return h.cpu().numpy()


@functools.lru_cache(maxsize=1)  # one head per process (a task's memory request counts one)
def _head_weights_at(path: str, mtime_ns: int, size: int) -> tuple[np.ndarray, ...]:
    net = load_model(Path(path))
    return tuple(t.detach().numpy() for t in (net.fc6.weight, net.fc6.bias, net.fc7.weight,
                                              net.fc7.bias))  # fmt: skip


def _head_weights(ref) -> tuple[np.ndarray, ...]:
    """fc6/fc7 weights and biases of the model saved at ``ref``, read once per process and file
    version (the store's artifacts never change under a key; the version guards a rewrite)."""
    path = os.fspath(ref)
    st = os.stat(path)
    return _head_weights_at(path, st.st_mtime_ns, st.st_size)


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def layer_source(ctx: StepContext, layer: str, split: str):
    """(shard paths, transform) giving ``layer`` features of ``split``: the cached layer itself,
    or pool5 through ``Pool5Head`` when the cache holds pool5 only (features.cache=pool5)."""
    features_dir, ref = ctx.input_dir("features"), ctx.input_file("features")
    if (features_dir / layer).is_dir():
        return feature_shards(features_dir, layer, split, ref), _identity
    head = Pool5Head.stored(ctx.input_file("finetune", "model.pt"), layer)
    return feature_shards(features_dir, "pool5", split, ref), head
