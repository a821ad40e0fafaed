"""Classifiers for semi-supervised learning (REFERENCE §5): WRN-28-2 as in FixMatch and Ren et al.
2020, and small nets sized for CPU presets.

Every model here exposes ``features(x) -> (B, D)`` (the penultimate representation) and ``head``
(the final ``nn.Linear``), because the influence-function outer step treats only the last layer as θ
(paper approximation (1)); ``forward(x) = head(features(x))``.
"""

from __future__ import annotations

import torch
from torch import nn

from stages.models.registry import register

# FixMatch's WRN: BN momentum 0.001 (TF's decay 0.999), leaky ReLU slope 0.1
_BN_MOMENTUM = 0.001
_LEAK = 0.1


class _Block(nn.Module):
    """Pre-activation basic block: BN-LReLU-conv3x3-BN-LReLU-conv3x3 (+ 1x1 conv shortcut)."""

    def __init__(self, c_in: int, c_out: int, stride: int, activate_before_residual: bool):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in, momentum=_BN_MOMENTUM)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out, momentum=_BN_MOMENTUM)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.act = nn.LeakyReLU(_LEAK, inplace=True)
        self.shortcut = None if c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)
        self.activate_before_residual = activate_before_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(x))
        if self.activate_before_residual:  # first block of the net: the shortcut sees BN-LReLU(x)
            x = out
        out = self.conv2(self.act(self.bn2(self.conv1(out))))
        return out + (x if self.shortcut is None else self.shortcut(x))


class WideResNet(nn.Module):
    """WRN-depth-widen (Zagoruyko & Komodakis 2016) in FixMatch's variant, for 32x32 inputs.

    Widths 16 → 16k, 32k, 64k over three groups of ``(depth − 4) / 6`` blocks, strides 1, 2, 2.
    """

    def __init__(
        self, num_classes: int = 10, depth: int = 28, widen: int = 2, in_channels: int = 3
    ):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)]
        for g, stride in enumerate((1, 2, 2)):
            for i in range(n):
                c_in = widths[g] if i == 0 else widths[g + 1]
                layers.append(
                    _Block(c_in, widths[g + 1], stride if i == 0 else 1, g == 0 and i == 0)
                )
        layers += [
            nn.BatchNorm2d(widths[3], momentum=_BN_MOMENTUM),
            nn.LeakyReLU(_LEAK, inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        ]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(widths[3], num_classes)
        self.feature_dim = widths[3]
        for m in self.modules():  # FixMatch's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (B, 64·widen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, num_classes)


class SmallConvNet(nn.Module):
    """Three conv-BN-LReLU stages with 2x2 max-pooling and global average pooling; for CPU presets.

    Not in the paper: a stand-in for WRN-28-2 that trains in seconds on digits / 32x32 images.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: tuple[int, ...] = (16, 32, 64),
    ):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(widths):
            layers += [
                nn.Conv2d(c, w, 3, 1, 1, bias=False),
                nn.BatchNorm2d(w),
                nn.LeakyReLU(_LEAK, inplace=True),
            ]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c = w
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)
        self.feature_dim = c

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (B, widths[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, num_classes)


@register("wrn_28_2")
def wrn_28_2(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    """WRN-28-2, the backbone of FixMatch's and Ren et al.'s CIFAR-10 runs (≈1.47 M parameters)."""
    return WideResNet(num_classes, depth=28, widen=2, in_channels=in_channels)


@register("wrn_10_1")
def wrn_10_1(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    """WRN-10-1: one block per group at base width, a CPU-sized member of the same family."""
    return WideResNet(num_classes, depth=10, widen=1, in_channels=in_channels)


@register("ssl_convnet")
def ssl_convnet(
    num_classes: int = 10, in_channels: int = 3, widths: tuple[int, ...] = (16, 32, 64)
) -> SmallConvNet:
    """Small conv net for the CPU presets (not in the paper)."""
    return SmallConvNet(num_classes, in_channels=in_channels, widths=tuple(widths))
