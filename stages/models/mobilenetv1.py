"""MobileNetV1 — Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile
Vision Applications", 2017 (arXiv 1704.04861), Table 1: the depthwise-separable ("factored")
baseline that MobileNetV2 compares against (Sandler et al. 2018, §3.1, Fig. 5, Table 4).

Every layer after the stem is a 3×3 depthwise conv (+BN+ReLU6) followed by a 1×1 pointwise conv
(+BN+ReLU6); no residuals, no bottlenecks. The width multiplier scales every channel count as
TF-slim's ``mobilenet_v1`` does: ``max(int(c·α), 8)`` (no rounding to multiples of 8). At α = 1,
224 px, 1000 classes: 4.23M parameters with BN (4.21M without), ≈ 569M multiply-adds (V1 Table 1;
the V2 paper's Table 4 quotes 575M).
"""

from __future__ import annotations

import torch
from torch import nn

from stages.models.mobilenetv2 import conv_bn
from stages.models.registry import register

STEM_CHANNELS = 32  # conv 3×3, stride 2 → 32
# V1 Table 1 after the stem: (pointwise output channels c, depthwise stride s)
SEPARABLE_SETTING: tuple[tuple[int, int], ...] = (
    # c, s
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)


def _depth(c: int, width_mult: float, min_depth: int = 8) -> int:
    return max(int(c * width_mult), min_depth)  # TF-slim mobilenet_v1 `depth()`


class MobileNetV1(nn.Module):
    """``(B, 3, H, W)`` → logits ``(B, num_classes)``; ``stem_stride`` as in MobileNetV2."""

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        *,
        stem_stride: int = 2,
        dropout: float = 0.001,  # V1 TF-slim keeps 0.999 before the logits
        in_channels: int = 3,  # 1 for grey images: the stem conv's kernels are 3×3×1
    ):
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")
        in_ch = _depth(STEM_CHANNELS, width_mult)
        layers: list[nn.Module] = [conv_bn(in_channels, in_ch, 3, stem_stride)]
        for c, s in SEPARABLE_SETTING:
            out_ch = _depth(c, width_mult)
            layers.append(
                nn.Sequential(
                    conv_bn(in_ch, in_ch, 3, s, groups=in_ch),  # depthwise
                    conv_bn(in_ch, out_ch, 1),  # pointwise
                )
            )
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.last_channel = in_ch
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(in_ch, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, 1024·α, H/32, W/32)
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


@register("mobilenetv1")
def mobilenet_v1(width_mult: float = 1.0, num_classes: int = 1000, **kwargs) -> MobileNetV1:
    """MobileNetV1 (Howard et al. 2017, Table 1) at width multiplier ``width_mult``."""
    return MobileNetV1(num_classes=num_classes, width_mult=width_mult, **kwargs)


@register("mobilenetv1_100")
def mobilenetv1_100(num_classes: int = 1000, **kwargs) -> MobileNetV1:
    """MobileNetV1 (Howard et al. 2017) at width 1.0: the V2 paper's Table 4 baseline."""
    return MobileNetV1(num_classes=num_classes, width_mult=1.0, **kwargs)
