"""The Batch Normalization paper's networks (Ioffe & Szegedy 2015, REFERENCE §2).

- :class:`MnistMLP` (§4.1): 28×28 input, 3 fully connected hidden layers of 100 sigmoid units,
  10-way softmax. With BN, BN goes on Wu before each nonlinearity and the layer bias is dropped
  (§3.2: β takes its role). Weights start as small random Gaussians (§4.1; σ is not given).
  ``preactivations(x)`` returns every hidden layer's sigmoid *input*: Figure 1(b, c) plots the
  15/50/85th percentiles of one unit of the last one.
- :class:`SmallInception` (§4.2 stand-in): the "small Inception" of Zhang et al. 2017 (REFERENCE
  §4: conv module = conv+BN+act; inception = concat(1×1, 3×3); downsample = concat(3×3 stride-2
  conv, 3×3 stride-2 max-pool)) at a quarter of its widths, for 32×32 CIFAR-format images, with the
  BN variants' switches: nonlinearity (ReLU/sigmoid), BN, dropout before the classifier (GoogLeNet:
  40%), and local response normalisation after the stem and the first downsample (GoogLeNet's
  early layers; "accelerating BN networks" removes it, §4.2.1).

Registered: ``bn_mnist_mlp``, ``bn_inception_small``. ``bn_kind`` picks our layer
(``stages.models.batchnorm``) or torch's; ``sync_bn`` makes ours synchronise statistics across
data-parallel workers.
"""

from __future__ import annotations

import torch
from torch import nn

from stages.models.batchnorm import batchnorm_layer
from stages.models.registry import register

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU}


class MnistMLP(nn.Module):
    """``forward(x (N, 1, 28, 28) or (N, 784)) -> logits (N, 10)``."""

    def __init__(
        self,
        bn: bool = False,
        hidden: tuple[int, ...] = (100, 100, 100),  # §4.1
        in_features: int = 28 * 28,
        num_classes: int = 10,
        init_std: float = 0.1,  # "small random Gaussian values" (§4.1); σ is our choice
        bn_kind: str = "ours",
        sync_bn: bool = False,
    ):
        super().__init__()
        self.bn = bn
        layers = []
        width = in_features
        for h in hidden:
            linear = nn.Linear(width, h, bias=not bn)  # §3.2: BN's β replaces the bias
            norm = batchnorm_layer(bn_kind, h, 1, sync=sync_bn) if bn else nn.Identity()
            layers.append(nn.Sequential(linear, norm))
            width = h
        self.hidden = nn.ModuleList(layers)
        self.act = nn.Sigmoid()
        self.out = nn.Linear(width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def preactivations(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(logits (N, 10), [sigmoid input (N, h) per hidden layer])."""
        x = x.flatten(1)
        pre = []
        for layer in self.hidden:
            z = layer(x)  # BN(Wu) with BN, Wu + b without
            pre.append(z)
            x = self.act(z)
        return self.out(x), pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.preactivations(x)[0]


class ConvModule(nn.Sequential):
    """conv (bias dropped under BN) → BN → nonlinearity."""

    def __init__(self, cin, cout, k, stride=1, *, bn, act, bn_kind, sync_bn):
        super().__init__(
            nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=not bn),
            batchnorm_layer(bn_kind, cout, 2, sync=sync_bn) if bn else nn.Identity(),
            ACTIVATIONS[act](),
        )


class InceptionModule(nn.Module):
    def __init__(self, cin, c1, c3, **kw):
        super().__init__()
        self.b1, self.b3 = ConvModule(cin, c1, 1, **kw), ConvModule(cin, c3, 3, **kw)
        self.out_channels = c1 + c3

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x)], 1)


class DownsampleModule(nn.Module):
    def __init__(self, cin, c3, **kw):
        super().__init__()
        self.conv = ConvModule(cin, c3, 3, 2, **kw)
        self.pool = nn.MaxPool2d(3, 2, padding=1)
        self.out_channels = c3 + cin

    def forward(self, x):
        return torch.cat([self.conv(x), self.pool(x)], 1)


def _c(c: int, width: float) -> int:
    return max(4, int(round(c * width)))


class SmallInception(nn.Module):
    """``forward(x (N, 3, 32, 32)) -> logits (N, num_classes)``.

    Layout (channels at width 1, a quarter of Zhang et al.'s, all 11 of its modules): conv3×3·24 →
    [LRN] → Inc(8, 8) → Inc(8, 12) → Down(20) → [LRN] → Inc(28, 12) → Inc(24, 16) → Inc(20, 20) →
    Inc(12, 24) → Down(24) → Inc(44, 40) → Inc(44, 40) → global mean pool → [dropout] → FC.
    (Issue 21: Inc(20, 20), Inc(12, 24) and the second Inc(44, 40) were missing.)
    """

    def __init__(
        self,
        num_classes: int = 10,
        width: float = 1.0,
        bn: bool = True,
        activation: str = "relu",
        dropout: float = 0.0,
        lrn: bool = False,
        bn_kind: str = "ours",
        sync_bn: bool = False,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        kw = dict(bn=bn, act=activation, bn_kind=bn_kind, sync_bn=sync_bn)

        def lrn_layer():  # GoogLeNet's LRN: size 5, α 1e-4, β 0.75
            return nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0) if lrn else nn.Identity()

        stem = _c(24, width)
        layers: list[nn.Module] = [ConvModule(3, stem, 3, **kw), lrn_layer()]
        c = stem
        # REFERENCE §4 ÷ 4: Inc(32,32) Inc(32,48) Down(80) Inc(112,48) Inc(96,64) Inc(80,80)
        # Inc(48,96) Down(96) Inc(176,160) Inc(176,160)
        plan = [("inc", 8, 8), ("inc", 8, 12), ("down", 20), ("lrn",), ("inc", 28, 12)]
        plan += [("inc", 24, 16), ("inc", 20, 20), ("inc", 12, 24), ("down", 24)]
        plan += [("inc", 44, 40), ("inc", 44, 40)]
        for item in plan:
            if item[0] == "lrn":
                layers.append(lrn_layer())
                continue
            if item[0] == "inc":
                block = InceptionModule(c, _c(item[1], width), _c(item[2], width), **kw)
            else:
                block = DownsampleModule(c, _c(item[1], width), **kw)
            layers.append(block)
            c = block.out_channels
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # He init: the plain ReLU net trains from the start
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).mean(dim=(2, 3))  # (N, C) global mean pool
        return self.fc(self.dropout(x))


@register("bn_mnist_mlp")
def bn_mnist_mlp(**kwargs) -> MnistMLP:
    """§4.1's MNIST network (3×100 sigmoid); ``bn=True`` for the BN version."""
    return MnistMLP(**kwargs)


@register("bn_inception_small")
def bn_inception_small(**kwargs) -> SmallInception:
    """Small Inception-style conv net with the §4.2 variant switches (see module docstring)."""
    return SmallInception(**kwargs)
