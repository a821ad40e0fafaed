"""CNN backbones for R-CNN with one interface: logits, and pool5 / fc6 / fc7 features.

R-CNN (REFERENCE §1 "Features") reads three layers of the network as region features:
``pool5`` (last max-pool, flattened), ``fc6`` and ``fc7`` (after their ReLU, as in Caffe where
``relu6``/``relu7`` run in place on the fc blobs). Every backbone here is

    conv trunk -> pool5 -> fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout -> fc8 (logits)

with dropout placed as in Caffe's ``drop6``/``drop7`` (torchvision's AlexNet instead drops the
pool5 and fc6 inputs; both are identity in eval, so features agree). Inputs are warped crops
``(N, 3, S, S)`` with ``S == input_size``; there is no adaptive pooling: at R-CNN's crop size the
trunk already ends at 6×6 (AlexNet, 227 px) or 7×7 (VGG16, 224 px), and the constructor checks it.

Registered: ``rcnn_alexnet`` (T-Net), ``rcnn_vgg16`` (O-Net), ``rcnn_small`` (fast CPU stand-in).
Weights are never downloaded: pass ``weights_path`` to a local state dict (ours or torchvision's).

Input convention: crops are BGR 0–255 minus ``IMAGENET_MEAN_BGR`` (``stages/detection/warp.py``, as
Caffe fed R-CNN). torchvision's ImageNet weights expect RGB in [0, 1] normalised with its mean/std
instead; ``load_weights`` folds that difference into conv1 and the ``input_shift`` buffer, so the
net computes exactly what torchvision's does on its own preprocessing of the same pixels.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from stages.detection.warp import IMAGENET_MEAN_BGR
from stages.models.registry import register

FEATURE_LAYERS = ("pool5", "fc6", "fc7")
# torchvision's classifier indices of fc6/fc7/fc8, for loading its checkpoint files
_TORCHVISION_ALEXNET_FC = {"classifier.1": "fc6", "classifier.4": "fc7", "classifier.6": "fc8"}
_TORCHVISION_VGG_FC = {"classifier.0": "fc6", "classifier.3": "fc7", "classifier.6": "fc8"}
# The preprocessing torchvision's AlexNet/VGG16 ImageNet weights were trained with (the weights'
# ``transforms()``): RGB scaled to [0, 1], then (x - mean) / std per channel.
TORCHVISION_MEAN_RGB = (0.485, 0.456, 0.406)
TORCHVISION_STD_RGB = (0.229, 0.224, 0.225)


def _first(v) -> int:
    return v if isinstance(v, int) else v[0]


def _trunk_output(conv: nn.Sequential, size: int) -> tuple[int, int]:
    """(channels, side) of the trunk's output for a ``size``×``size`` input, without running it."""
    channels = 3
    for m in conv.modules():
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            if isinstance(m, nn.MaxPool2d) and m.ceil_mode:
                raise ValueError("ceil_mode pooling is not supported by the size check")
            k, s, p, d = (
                _first(getattr(m, a)) for a in ("kernel_size", "stride", "padding", "dilation")
            )
            size = (size + 2 * p - d * (k - 1) - 1) // s + 1
        if isinstance(m, nn.Conv2d):
            channels = m.out_channels
    return channels, size


class RCNNBackbone(nn.Module):
    """Trunk + fc6/fc7/fc8 with R-CNN's feature taps.

    ``forward(x (N, 3, S, S)) -> logits (N, num_outputs)``; ``features(x, layer) -> (N, D)`` with
    ``D = feature_dims[layer]``; ``features_all(x)`` returns all three from one pass.
    """

    def __init__(
        self,
        conv: nn.Sequential,
        fc6: nn.Linear,
        fc7: nn.Linear,
        fc8: nn.Linear,
        *,
        input_size: int,
        dropout: float = 0.5,
        channels_last: bool = False,
    ):
        super().__init__()
        channels, side = _trunk_output(conv, input_size)
        if channels * side * side != fc6.in_features:
            raise ValueError(
                f"trunk gives {channels}×{side}×{side} = {channels * side * side} pool5 values at "
                f"input {input_size}, but fc6 expects {fc6.in_features}"
            )
        self.conv, self.fc6, self.fc7, self.fc8 = conv, fc6, fc7, fc8
        # (3,) BGR, added to the crops before conv1: zero except for torchvision weights, whose
        # preprocessing ``load_weights`` folds in (see ``fold_torchvision_preprocessing``).
        self.register_buffer("input_shift", torch.zeros(3))
        self.dropout = nn.Dropout(dropout)  # applied after relu6 and relu7 (Caffe drop6/drop7)
        self.input_size = input_size
        self.channels_last = channels_last  # NHWC input to the trunk; same numbers, faster on CPU
        self.feature_dims = {
            "pool5": fc6.in_features,
            "fc6": fc6.out_features,
            "fc7": fc7.out_features,
        }

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # State dicts saved before ``input_shift`` existed lack the key; their nets ran on unshifted
        # input, so it loads as zeros (as BatchNorm fills in ``num_batches_tracked`` for old files).
        # ``load_state_dict`` passes a copy, so the caller's dict is not modified.
        state_dict.setdefault(prefix + "input_shift", torch.zeros_like(self.input_shift))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def num_outputs(self) -> int:
        return self.fc8.out_features

    def _pool5(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (self.input_size,) * 2:
            raise ValueError(
                f"expected crops (N, 3, {self.input_size}, {self.input_size}), got {tuple(x.shape)}"
            )
        # Always added, even when zero (x + 0 == x exactly): checking for zeros would cost a device
        # sync per batch, the add one pass over the 3-channel input, far below conv1's cost.
        x = x + self.input_shift.to(x.dtype).view(1, 3, 1, 1)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return torch.flatten(self.conv(x), 1)  # (N, C*H*W), in (C, H, W) order either way

    def features(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        """``(N, feature_dims[layer])`` for ``layer`` in pool5 / fc6 / fc7 (fc after ReLU)."""
        if layer not in FEATURE_LAYERS:
            raise ValueError(f"unknown feature layer {layer!r}; expected one of {FEATURE_LAYERS}")
        h = self._pool5(x)
        if layer == "pool5":
            return h
        h = F.relu(self.fc6(h))  # (N, fc6)
        if layer == "fc6":
            return h
        return F.relu(self.fc7(self.dropout(h)))  # (N, fc7)

    def features_all(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"pool5": (N, P), "fc6": (N, F6), "fc7": (N, F7)}`` from a single pass."""
        pool5 = self._pool5(x)
        fc6 = F.relu(self.fc6(pool5))
        fc7 = F.relu(self.fc7(self.dropout(fc6)))
        return {"pool5": pool5, "fc6": fc6, "fc7": fc7}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc8(self.dropout(self.features(x, "fc7")))  # (N, num_outputs)

    def fused_for_inference(self) -> RCNNBackbone:
        """An eval-mode copy whose trunk has every ``Conv2d`` → ``BatchNorm2d`` pair folded into one
        convolution (``torch.nn.utils.fusion.fuse_conv_bn_eval``: w·γ/σ, (b − μ)·γ/σ + β), so
        inference makes one pass fewer over every activation map. Outputs equal the original's to
        float rounding; a trunk without BatchNorm (AlexNet, VGG16) is copied unchanged."""
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        fused = copy.deepcopy(self).eval()
        layers, out = list(fused.conv), []
        while layers:
            m = layers.pop(0)
            if isinstance(m, nn.Conv2d) and layers and isinstance(layers[0], nn.BatchNorm2d):
                m = fuse_conv_bn_eval(m, layers.pop(0))
            out.append(m)
        fused.conv = nn.Sequential(*out)
        return fused

    def replace_head(self, num_outputs: int) -> list[nn.Parameter]:
        """Swap fc8 for a fresh ``num_outputs``-way layer (pass N + 1: classes + background).

        Init as R-CNN §2.3 / Caffe's ``fc8_pascal``: weights N(0, 0.01²), bias 0. Returns the new
        layer's parameters, which fine-tuning puts in its 10× learning-rate group.
        """
        old = self.fc8.weight
        head = nn.Linear(self.fc7.out_features, num_outputs, device=old.device, dtype=old.dtype)
        nn.init.normal_(head.weight, mean=0.0, std=0.01)
        nn.init.zeros_(head.bias)
        self.fc8 = head
        return list(head.parameters())


def fold_torchvision_preprocessing(
    conv1_weight: torch.Tensor, mean_bgr: Sequence[float] = IMAGENET_MEAN_BGR
) -> tuple[torch.Tensor, torch.Tensor]:
    """conv1 weights and input shift that make a torchvision ImageNet net run on our crops.

    ``conv1_weight`` is ``(C_out, 3, k, k)`` over RGB input; returns ``(weight (C_out, 3, k, k)``
    over BGR input, ``input_shift (3,)`` BGR). With pixels ``p`` (0–255), our crop channel ``j``
    (BGR) is ``x_j = p_bgr[j] - mean_bgr[j]`` and torchvision's channel ``c`` (RGB) is
    ``t_c = (p_rgb[c] / 255 - m_c) / s_c``. Since ``p_rgb[c] = p_bgr[2 - c]``,

        t_c = (x_{2-c} + shift_{2-c}) / (255 s_c),   shift_j = mean_bgr[j] - 255 m_{2-j}

    so conv1 over ``x + shift`` with weights ``W[:, j] = W_tv[:, 2 - j] / (255 s_{2-j})`` equals
    torchvision's conv1 over ``t`` exactly, borders included: the scale commutes with conv1's zero
    padding, while a shift folded into the bias would also shift the padded zeros, hence the
    buffer. For the values here the shift is small (≈ (0.41, 0.50, 0.005)); the scale (≈ 1/58)
    and the channel order are what torchvision's weights got wrong without this."""
    if conv1_weight.ndim != 4 or conv1_weight.shape[1] != 3:
        raise ValueError(f"conv1 weight must be (C_out, 3, k, k), got {tuple(conv1_weight.shape)}")
    mean_rgb = torch.tensor(TORCHVISION_MEAN_RGB, dtype=torch.float64)
    scale_rgb = 1.0 / (255.0 * torch.tensor(TORCHVISION_STD_RGB, dtype=torch.float64))
    weight = (conv1_weight.double() * scale_rgb.view(1, 3, 1, 1)).flip(1)  # RGB -> BGR inputs
    shift_bgr = torch.tensor(mean_bgr, dtype=torch.float64) - 255.0 * mean_rgb.flip(0)
    return weight.to(conv1_weight.dtype), shift_bgr.to(conv1_weight.dtype)


def load_weights(model: RCNNBackbone, path: str | Path, torchvision_fc: dict[str, str]) -> None:
    """Load a local state dict into ``model`` (never downloads).

    Accepts our own layout (``conv.*``, ``fc6.*``, ...), a training checkpoint holding it under
    ``"model"``, or torchvision's file (``features.*``, ``classifier.<i>.*``) mapped through
    ``torchvision_fc`` (``{"classifier.1": "fc6", ...}``). torchvision's weights get its input
    preprocessing folded in (``fold_torchvision_preprocessing``): on our BGR mean-subtracted crops
    they compute what torchvision computes on its normalised RGB. Loading is strict, so a file
    for a different architecture or class count fails here with the offending keys.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)  # data only, no unpickling code
    if isinstance(state.get("model"), dict):
        state = state["model"]
    if any(k.startswith("features.") for k in state):
        mapped = {}
        for key, value in state.items():
            prefix, _, param = key.rpartition(".")
            if prefix.startswith("features."):
                mapped["conv." + key[len("features.") :]] = value
            elif prefix in torchvision_fc:
                mapped[f"{torchvision_fc[prefix]}.{param}"] = value
            else:
                raise KeyError(f"{path}: unexpected torchvision key {key!r}")
        conv1 = next(n for n, m in model.conv.named_modules() if isinstance(m, nn.Conv2d))
        weight_key = f"conv.{conv1}.weight"
        if weight_key not in mapped:
            raise KeyError(f"{path}: torchvision file has no first-convolution key {weight_key!r}")
        mapped[weight_key], mapped["input_shift"] = fold_torchvision_preprocessing(
            mapped[weight_key]
        )
        state = mapped
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path} does not fit {type(model).__name__}: {err}") from err


@register("rcnn_alexnet")
def rcnn_alexnet(
    num_classes: int = 1000, weights_path: str | None = None, dropout: float = 0.5
) -> RCNNBackbone:
    """R-CNN's "T-Net" (Krizhevsky et al. 2012 as in Caffe): 227 px crops, pool5 6×6×256 = 9216,
    fc6/fc7 4096 (REFERENCE §1 "Features"). Layers from ``torchvision.models.alexnet``."""
    tv = torchvision.models.alexnet(weights=None, num_classes=num_classes)
    fc6, fc7, fc8 = (tv.classifier[int(k[-1])] for k in _TORCHVISION_ALEXNET_FC)
    model = RCNNBackbone(tv.features, fc6, fc7, fc8, input_size=227, dropout=dropout)
    assert model.feature_dims["pool5"] == 9216
    if weights_path is not None:
        load_weights(model, weights_path, _TORCHVISION_ALEXNET_FC)
    return model


@register("rcnn_vgg16")
def rcnn_vgg16(
    num_classes: int = 1000, weights_path: str | None = None, dropout: float = 0.5
) -> RCNNBackbone:
    """R-CNN's "O-Net" (Simonyan & Zisserman 2015, config D): 224 px crops, pool5 7×7×512 =
    25088, fc6/fc7 4096 (R-CNN §3.3). Layers and init from ``torchvision.models.vgg16``."""
    tv = torchvision.models.vgg16(weights=None, num_classes=num_classes)
    fc6, fc7, fc8 = (tv.classifier[int(k[-1])] for k in _TORCHVISION_VGG_FC)
    model = RCNNBackbone(tv.features, fc6, fc7, fc8, input_size=224, dropout=dropout)
    assert model.feature_dims["pool5"] == 25088
    if weights_path is not None:
        load_weights(model, weights_path, _TORCHVISION_VGG_FC)
    return model


@register("rcnn_small")
def rcnn_small(
    num_classes: int = 1000,
    input_size: int = 64,
    widths: tuple[int, ...] = (16, 32, 64, 128),
    fc_dim: int = 512,
    dropout: float = 0.5,
    weights_path: str | None = None,
) -> RCNNBackbone:
    """A small CNN with the same interface, for CPU presets (not in the paper).

    Four blocks conv3×3-BN-ReLU-maxpool2 (each halves the side) → pool5 = widths[-1] × (S/16)²
    (2048 at 64 px), fc6/fc7 ``fc_dim``. BatchNorm lets it train from scratch in a few epochs.
    Widths (16, 32, 64, 128) and channels-last input: ~1300 crops/s for features at 64 px on two
    busy CPU cores, against ~250 for (32, 64, 128, 128) in NCHW (17 vs 52 MMAC per crop).
    """
    if input_size < 32 or input_size % 16:
        raise ValueError(
            f"rcnn_small input_size must be a multiple of 16 and >= 32, got {input_size}"
        )
    if len(widths) != 4:
        raise ValueError(f"rcnn_small needs 4 block widths, got {widths}")
    layers: list[nn.Module] = []
    in_ch = 3
    for w in widths:
        # bias=False: BatchNorm's shift makes a conv bias redundant
        layers += [nn.Conv2d(in_ch, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)]
        layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        in_ch = w
    pool5_dim = in_ch * (input_size // 16) ** 2
    model = RCNNBackbone(
        nn.Sequential(*layers),
        nn.Linear(pool5_dim, fc_dim),
        nn.Linear(fc_dim, fc_dim),
        nn.Linear(fc_dim, num_classes),
        input_size=input_size,
        dropout=dropout,
        channels_last=True,
    )
    if weights_path is not None:
        load_weights(model, weights_path, {})
    return model


# torchvision's file names for the ImageNet weights of the two paper nets (torchvision 0.13+)
TORCHVISION_WEIGHT_FILES = {
    "rcnn_alexnet": "alexnet-owt-7be5be79.pth",
    "rcnn_vgg16": "vgg16-397923af.pth",
}


def resolve_weights_path(model: str, weights_path: str) -> str:
    """``"torchvision"`` → the file in torchvision's weight cache (``$TORCH_HOME/hub/checkpoints``)
    when it is already there; anything else is returned as given. Nothing is downloaded."""
    if weights_path != "torchvision":
        return weights_path
    if model not in TORCHVISION_WEIGHT_FILES:
        raise ValueError(
            f"no torchvision ImageNet weights for {model!r}; valid: "
            f"{sorted(TORCHVISION_WEIGHT_FILES)}"
        )
    path = Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_WEIGHT_FILES[model]
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: torchvision's {model} weights are not in the local cache; copy the file "
            "there (or pass its path) — Paperline never downloads weights"
        )
    return str(path)
