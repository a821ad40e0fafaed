"""The CIFAR-10 networks of Zhang et al. 2017, App. A (Fig. 3), for 28×28 inputs.

- ``small_inception`` / ``small_inception_no_bn``: the Inception-style net (lr 0.1).
- ``small_alexnet``: two conv5×5 → max-pool 3×3/2 → LRN blocks, then FC 384 → FC 192 (lr 0.01).
- ``mlp_1x512`` / ``mlp_3x512``: ReLU MLPs with one or three hidden layers of 512 (lr 0.01).

Every constructor takes ``in_shape=(C, H, W)`` and ``num_classes``; ``width`` scales every
channel/unit count (1.0 = the paper; smaller for CPU presets, not in the paper) and ``dropout``
adds dropout before each hidden fully connected layer (0 = off, as in Table 1's CIFAR rows).
Weight decay and random cropping are training-time switches (stages/training/fit_labels.py).
"""

from __future__ import annotations

import torch
from torch import nn

from stages.models.registry import register


def _w(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class ConvModule(nn.Sequential):
    """conv → BN → ReLU (App. A, Fig. 3); BN dropped for the "w/o BatchNorm" rows of Table 1."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, batch_norm: bool):
        layers: list[nn.Module] = [
            nn.Conv2d(
                cin, cout, k, stride, padding=k // 2 if stride == 1 else 0, bias=not batch_norm
            )
        ]
        if batch_norm:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class InceptionModule(nn.Module):
    """concat(1×1 conv with ch1 channels, 3×3 conv with ch3 channels)."""

    def __init__(self, cin: int, ch1: int, ch3: int, batch_norm: bool):
        super().__init__()
        self.b1 = ConvModule(cin, ch1, 1, 1, batch_norm)
        self.b3 = ConvModule(cin, ch3, 3, 1, batch_norm)
        self.out_channels = ch1 + ch3

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x)], 1)


class DownsampleModule(nn.Module):
    """concat(3×3 stride-2 conv with ch3 channels, 3×3 stride-2 max-pool)."""

    def __init__(self, cin: int, ch3: int, batch_norm: bool):
        super().__init__()
        self.conv = ConvModule(cin, ch3, 3, 2, batch_norm)
        self.pool = nn.MaxPool2d(3, 2)
        self.out_channels = ch3 + cin

    def forward(self, x):
        return torch.cat([self.conv(x), self.pool(x)], 1)


# App. A, Fig. 3: (kind, channels) in order — "inc" (ch1, ch3), "down" (ch3,)
INCEPTION_LAYOUT = (
    ("inc", 32, 32),
    ("inc", 32, 48),
    ("down", 80),
    ("inc", 112, 48),
    ("inc", 96, 64),
    ("inc", 80, 80),
    ("inc", 48, 96),
    ("down", 96),
    ("inc", 176, 160),
    ("inc", 176, 160),
)


class SmallInception(nn.Module):
    def __init__(
        self,
        in_shape: tuple[int, int, int] = (3, 28, 28),
        num_classes: int = 10,
        batch_norm: bool = True,
        width: float = 1.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        stem = _w(96, width)
        layers: list[nn.Module] = [ConvModule(in_shape[0], stem, 3, 1, batch_norm)]
        c = stem
        for kind, *chs in INCEPTION_LAYOUT:
            m = (
                InceptionModule(c, _w(chs[0], width), _w(chs[1], width), batch_norm)
                if kind == "inc"
                else DownsampleModule(c, _w(chs[0], width), batch_norm)
            )
            layers.append(m)
            c = m.out_channels
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):  # (B, C, 28, 28)
        x = self.features(x).mean((2, 3))  # global mean pool: (B, C')
        return self.fc(self.dropout(x))


class SmallAlexNet(nn.Module):
    """Two (conv5×5·64 → max-pool 3×3/2 → LRN) blocks, FC 384 → FC 192 → FC classes (App. A)."""

    def __init__(
        self,
        in_shape: tuple[int, int, int] = (3, 28, 28),
        num_classes: int = 10,
        width: float = 1.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        c = _w(64, width)

        def block(cin: int) -> list[nn.Module]:
            # TF cifar10 tutorial's LRN (depth_radius 4, alpha 0.001/9, beta 0.75, bias 1)
            return [
                nn.Conv2d(cin, c, 5, padding=2),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, padding=1),
                nn.LocalResponseNorm(9, alpha=0.001, beta=0.75, k=1.0),
            ]

        self.features = nn.Sequential(*block(in_shape[0]), *block(c))
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *in_shape)).numel()
        h1, h2 = _w(384, width), _w(192, width)
        drop = (lambda: nn.Dropout(dropout)) if dropout > 0 else nn.Identity
        self.classifier = nn.Sequential(
            drop(),
            nn.Linear(flat, h1),
            nn.ReLU(inplace=True),
            drop(),
            nn.Linear(h1, h2),
            nn.ReLU(inplace=True),
            nn.Linear(h2, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class MLP(nn.Module):
    """``depth`` hidden ReLU layers of ``hidden`` units on the flattened image."""

    def __init__(
        self,
        in_shape: tuple[int, int, int] = (3, 28, 28),
        num_classes: int = 10,
        depth: int = 1,
        hidden: int = 512,
        dropout: float = 0.0,
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = in_shape[0] * in_shape[1] * in_shape[2]
        for _ in range(depth):
            layers += [nn.Linear(fan_in, hidden), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            fan_in = hidden
        layers.append(nn.Linear(fan_in, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


@register("small_inception")
def small_inception(in_shape=(3, 28, 28), num_classes=10, width=1.0, dropout=0.0) -> nn.Module:
    """Zhang et al. 2017 App. A small Inception (conv modules with BatchNorm)."""
    return SmallInception(in_shape, num_classes, True, width, dropout)


@register("small_inception_no_bn")
def small_inception_no_bn(
    in_shape=(3, 28, 28), num_classes=10, width=1.0, dropout=0.0
) -> nn.Module:
    """Table 1's "Inception w/o BatchNorm" row."""
    return SmallInception(in_shape, num_classes, False, width, dropout)


@register("small_alexnet")
def small_alexnet(in_shape=(3, 28, 28), num_classes=10, width=1.0, dropout=0.0) -> nn.Module:
    """Zhang et al. 2017 App. A small AlexNet."""
    return SmallAlexNet(in_shape, num_classes, width, dropout)


@register("mlp_1x512")
def mlp_1x512(in_shape=(3, 28, 28), num_classes=10, width=1.0, dropout=0.0) -> nn.Module:
    """One hidden layer of 512 ReLU units (App. A)."""
    return MLP(in_shape, num_classes, 1, _w(512, width), dropout)


@register("mlp_3x512")
def mlp_3x512(in_shape=(3, 28, 28), num_classes=10, width=1.0, dropout=0.0) -> nn.Module:
    """Three hidden layers of 512 ReLU units (App. A)."""
    return MLP(in_shape, num_classes, 3, _w(512, width), dropout)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
