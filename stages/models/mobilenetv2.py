"""MobileNetV2 — Sandler, Howard, Zhu, Zhmoginov, Chen, "MobileNetV2: Inverted Residuals and Linear
Bottlenecks", CVPR 2018 (arXiv 1801.04381); REFERENCE §3.

The inverted residual block (Table 1) and the Table 2 network with the width multiplier α (§6.1:
every channel count is ``make_divisible(c·α, 8)``; the last 1×1 conv keeps 1280 channels for α < 1)
at any input resolution (the network is fully convolutional up to the global pool).

Parameter layout and order match ``torchvision.models.mobilenet_v2(width_mult=α)`` exactly (a test
copies torchvision's weights into this model and compares outputs), so counts can be quoted against
torchvision's: 3,504,872 parameters at α = 1 with 1000 classes, *including* BN γ/β; the paper's
3.4M (TF-slim) excludes BN parameters (``count_params(model, include_bn=False)``).

Ablation switches (§6.4, Figure 6), not in torchvision:

- ``bottleneck_act``: ``"linear"`` (the paper) or ``"relu6"`` after the projection's BN (Fig. 6a).
- ``shortcut``: ``"bottleneck"`` (the paper: identity between thin bottlenecks when stride 1 and
  k = k′), ``"expansion"`` (between the thick expansion layers, as a classical residual) or
  ``"none"`` (Fig. 6b). The expansion shortcut spans the same blocks as the bottleneck one, moved to
  the thick side: the expansion output of block i is added (before its ReLU6, as in ResNet) to the
  expansion output of block i+1 whenever block i has stride 1 and k = k′ (then both tensors have
  t·k channels at the same resolution).

``stem_stride`` (2 in the paper) may be set to 1 for 32-px CIFAR-style inputs; that changes the
total stride from 32 to 16 and is *not* the paper's architecture (see pipelines/mobilenet/config.py).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from stages.models.registry import register

# Table 2: expansion factor t, output channels c, repeats n, stride s of the first repeat
INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    # t, c, n, s
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32  # Table 2: conv2d 3×3, stride 2 → 32
LAST_CHANNELS = 1280  # Table 2: conv2d 1×1 → 1280

BottleneckAct = Literal["linear", "relu6"]
Shortcut = Literal["bottleneck", "expansion", "none"]


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``v`` to the nearest multiple of ``divisor`` (at least ``min_value``, default
    ``divisor``), never more than 10% below ``v`` (TF-slim ``mobilenet._make_divisible``)."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:  # rounding down must not remove more than 10% of the channels
        new_v += divisor
    return new_v


def conv_bn(
    in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    """Conv (no bias: BN follows, §6.1 "batch normalization after every layer") + BN [+ ReLU6]."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """Table 1: 1×1 expand k → t·k (+BN+ReLU6), 3×3 depthwise stride s (+BN+ReLU6), 1×1 project
    t·k → k′ (+BN, linear). ``t == 1`` omits the expansion conv (Table 2's first row).

    Input ``(B, k, H, W)`` → output ``(B, k′, ⌈H/s⌉, ⌈W/s⌉)``. ``use_res_connect`` is True when
    stride 1 and k = k′ (the identity shortcut between bottlenecks, §4 / Fig. 3b).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        expand_ratio: int,
        *,
        bottleneck_act: BottleneckAct = "linear",
        shortcut: Shortcut = "bottleneck",
    ):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = int(round(in_ch * expand_ratio))
        self.in_ch, self.out_ch, self.stride, self.expand_ratio = (
            in_ch,
            out_ch,
            stride,
            expand_ratio,
        )
        self.hidden = hidden
        self.shortcut = shortcut
        self.use_res_connect = stride == 1 and in_ch == out_ch
        # set by the network: this block's expansion receives the previous block's (Fig. 6b)
        self.takes_expansion_shortcut = False
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn(in_ch, hidden, 1))  # expansion
        layers.append(conv_bn(hidden, hidden, 3, stride, groups=hidden))  # depthwise
        layers += [nn.Conv2d(hidden, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)]  # projection
        if bottleneck_act == "relu6":  # ablation: non-linear bottleneck (Fig. 6a)
            layers.append(nn.ReLU6(inplace=True))
        elif bottleneck_act != "linear":
            raise ValueError(f"bottleneck_act must be linear|relu6, got {bottleneck_act!r}")
        # named `conv` with torchvision's layout so that state dicts line up one-to-one
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut == "bottleneck" and self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)

    def forward_with_expansion(
        self, x: torch.Tensor, carried: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fig. 6b's shortcut between expansions: returns ``(output, expansion)``; ``carried`` is
        the previous block's expansion ``(B, t·k, H, W)``, added before this one's ReLU6."""
        if self.expand_ratio == 1:
            return self.conv(x), None
        expand = self.conv[0]
        e = expand[1](expand[0](x))  # conv, BN
        if self.takes_expansion_shortcut and carried is not None:
            e = e + carried
        e = expand[2](e)  # ReLU6
        return self.conv[1:](e), e


class MobileNetV2(nn.Module):
    """Table 2 network. ``(B, 3, H, W)`` → logits ``(B, num_classes)`` for any H, W ≥ 1."""

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        *,
        bottleneck_act: BottleneckAct = "linear",
        shortcut: Shortcut = "bottleneck",
        stem_stride: int = 2,
        dropout: float = 0.2,  # torchvision; TF-slim keeps 0.8 (= dropout 0.2) before the logits
        round_nearest: int = 8,
        # 1 for grey images (Fashion-MNIST): only the stem conv changes, 3×3×1 instead of 3×3×3
        # kernels (−18·32α weights); every later layer sees the same 32α feature maps
        in_channels: int = 3,
    ):
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")
        if shortcut not in ("bottleneck", "expansion", "none"):
            raise ValueError(f"shortcut must be bottleneck|expansion|none, got {shortcut!r}")
        self.width_mult, self.shortcut = width_mult, shortcut
        in_ch = make_divisible(STEM_CHANNELS * width_mult, round_nearest)
        # §6.1: "for multipliers less than one, we apply width multiplier to all layers except the
        # very last convolutional layer"
        self.last_channel = make_divisible(LAST_CHANNELS * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [conv_bn(in_channels, in_ch, 3, stem_stride)]
        prev: InvertedResidual | None = None
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            out_ch = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                block = InvertedResidual(
                    in_ch,
                    out_ch,
                    s if i == 0 else 1,
                    t,
                    bottleneck_act=bottleneck_act,
                    shortcut=shortcut,
                )
                block.takes_expansion_shortcut = (
                    prev is not None and prev.use_res_connect and prev.expand_ratio == t
                )
                features.append(block)
                in_ch, prev = out_ch, block
        features.append(conv_bn(in_ch, self.last_channel, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes)
        )
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut == "expansion":
            x = self.features[0](x)
            carried = None
            for block in self.features[1:-1]:
                x, carried = block.forward_with_expansion(x, carried)
            x = self.features[-1](x)
        else:
            x = self.features(x)  # (B, last_channel, H/32, W/32) at stem_stride 2
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, last_channel)
        return self.classifier(x)


def mobilenet_v2(width_mult: float = 1.0, num_classes: int = 1000, **kwargs) -> MobileNetV2:
    """MobileNetV2 (Sandler et al. 2018, Table 2) at width multiplier ``width_mult``."""
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult, **kwargs)


# Registered variants named by width, as timm: the paper's grid (Fig. 5) plus 1.3 and 1.4 (Table 4)
WIDTHS = {"035": 0.35, "050": 0.5, "075": 0.75, "100": 1.0, "130": 1.3, "140": 1.4}


def _register_width(suffix: str, alpha: float) -> None:
    def constructor(num_classes: int = 1000, **kwargs) -> MobileNetV2:
        return MobileNetV2(num_classes=num_classes, width_mult=alpha, **kwargs)

    constructor.__name__ = f"mobilenetv2_{suffix}"
    constructor.__doc__ = f"MobileNetV2 (Sandler et al. 2018, Table 2) at width multiplier {alpha}."
    register(f"mobilenetv2_{suffix}")(constructor)


for _suffix, _alpha in WIDTHS.items():
    _register_width(_suffix, _alpha)
register("mobilenetv2")(mobilenet_v2)  # any width: create("mobilenetv2", width_mult=0.6)
