"""Parameter, multiply-add and latency counting (stages/models/complexity.py) against hand counts."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stages.models.complexity import count_madds, count_params, measure_latency_ms
from stages.models.mobilenetv2 import InvertedResidual, MobileNetV2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; oversubscribed threads are ~10x slower
    yield
    torch.set_num_threads(before)


def test_madds_of_single_layers_by_hand():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert count_madds(conv, 8) == 8 * 8 * 8 * 3 * 9  # H·W·Cout·Cin·k²
    depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    assert count_madds(depthwise, 8, in_channels=8) == 8 * 8 * 8 * 9  # one filter per channel
    strided = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
    assert count_madds(strided, (9, 7)) == 5 * 4 * 4 * 3 * 9  # output 5×4
    bn_relu = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU6(), nn.AdaptiveAvgPool2d(1))
    assert count_madds(bn_relu, 8) == 0  # BN, activations and pooling count zero


def test_inverted_residual_cost_formula():
    """Table 1 / §5.1: h·w·k·t·(k + 9 + k′) multiply-adds for a stride-1 block (3×3 depthwise)."""
    k, k2, t, h = 16, 24, 6, 8
    assert count_madds(InvertedResidual(k, k2, 1, t), h, in_channels=k) == h * h * k * t * (
        k + 9 + k2
    )
    # stride 2: the depthwise and projection run at (h/2)²
    strided = count_madds(InvertedResidual(k, k2, 2, t), h, in_channels=k)
    assert strided == h * h * k * t * k + (h // 2) ** 2 * k * t * (9 + k2)


def test_mobilenetv2_100_at_224_is_300M_madds_and_3_5M_params():
    """Table 4: 300M multiply-adds, 3.4M parameters (TF-slim: without BN, 1001 classes)."""
    model = MobileNetV2(num_classes=1000, width_mult=1.0)
    madds = count_madds(model, 224)
    assert abs(madds / 300e6 - 1) < 0.01
    assert madds == 300_774_272
    assert count_params(model) == 3_504_872  # torchvision's count, BN γ/β included
    bn = sum(2 * m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert count_params(model, include_bn=False) == 3_504_872 - bn == 3_470_760
    # the paper's convention: 1001 classes, no BN -> 3.47M ("3.4M")
    assert count_params(MobileNetV2(1001), include_bn=False) == 3_470_760 + 1281
    # the resolution multiplier scales every conv's MAdds by (r/r′)² when strides divide evenly
    fc = 1280 * 1000
    assert count_madds(model, 256) - fc == 4 * (count_madds(model, 128) - fc)
    # counting leaves the model's mode alone
    model.train()
    count_madds(model, 32)
    assert model.training


def test_mobilenetv2_140_madds():
    """Table 4: 585M multiply-adds at α = 1.4 (ours 582M: -0.5%)."""
    assert abs(count_madds(MobileNetV2(width_mult=1.4), 224) / 585e6 - 1) < 0.01


def test_frozen_parameters_are_not_counted():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    assert count_params(model) == 3 + 3 * 2 + 2


def test_latency_is_a_positive_median():
    model = nn.Conv2d(3, 4, 3)
    ms = measure_latency_ms(model, 16, warmup=1, repeats=3)
    assert 0 < ms < 1000 and math.isfinite(ms)
    with pytest.raises(ValueError, match="repeats"):
        measure_latency_ms(model, 16, repeats=0)
