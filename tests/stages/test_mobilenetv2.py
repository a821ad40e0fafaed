"""MobileNetV2 (REFERENCE §3): channel rounding, block rules, torchvision parity, ablation switches."""

from __future__ import annotations

import pytest
import torch
import torchvision

from stages.models import create
from stages.models.complexity import count_madds, count_params
from stages.models.mobilenetv1 import MobileNetV1
from stages.models.mobilenetv2 import (
    INVERTED_RESIDUAL_SETTING,
    WIDTHS,
    InvertedResidual,
    MobileNetV2,
    make_divisible,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The machine is shared: more threads than free cores make torch CPU ops ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


GRID = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
TABLE2_CHANNELS = (32, 16, 24, 32, 64, 96, 160, 320)  # stem, then each row's c


def _channels(model: MobileNetV2) -> tuple[int, ...]:
    """Stem output, each row's output, last conv."""
    blocks = list(model.features[1:-1])
    row_outs, i = [], 0
    for _, _, n, _ in INVERTED_RESIDUAL_SETTING:
        i += n
        row_outs.append(blocks[i - 1].out_ch)
    return (model.features[0][0].out_channels, *row_outs, model.last_channel)


@pytest.mark.parametrize(
    "alpha, expected",
    [  # hand-computed: nearest multiple of 8, >= 8, bumped when > 10% below c·α; 1280 kept for α<1
        (0.35, (16, 8, 8, 16, 24, 32, 56, 112, 1280)),  # 11.2 -> 8 is 29% down -> 16
        (0.5, (16, 8, 16, 16, 32, 48, 80, 160, 1280)),  # 12 -> 16 (ties round up)
        (0.75, (24, 16, 24, 24, 48, 72, 120, 240, 1280)),  # 18 -> 16 is 11% down -> 24
        (1.0, (32, 16, 24, 32, 64, 96, 160, 320, 1280)),
        (1.3, (40, 24, 32, 40, 80, 128, 208, 416, 1664)),
        (1.4, (48, 24, 32, 48, 88, 136, 224, 448, 1792)),
    ],
)
def test_channel_rounding_at_every_width_of_the_grid(alpha, expected):
    assert _channels(MobileNetV2(width_mult=alpha)) == expected
    for c, got in zip(TABLE2_CHANNELS, expected, strict=False):
        assert got % 8 == 0 and got >= 8 and got >= 0.9 * c * alpha
        assert got == make_divisible(c * alpha)


def test_make_divisible_rules():
    assert make_divisible(11.2) == 16  # 8 would be 29% below
    assert make_divisible(18.0) == 24  # 16 < 0.9 · 18 = 16.2: one step up
    assert make_divisible(2.0) == 8 and make_divisible(0.1) == 8  # at least the divisor
    assert make_divisible(1280 * 1.4) == 1792 and make_divisible(36.0) == 40  # ties go up


def test_block_shapes_and_residual_rules():
    x = torch.randn(2, 16, 8, 8)
    same = InvertedResidual(16, 16, 1, 6)
    assert same.use_res_connect and same.hidden == 96 and same(x).shape == (2, 16, 8, 8)
    down = InvertedResidual(16, 24, 2, 6)
    assert not down.use_res_connect and down(x).shape == (2, 24, 4, 4)
    widen = InvertedResidual(16, 24, 1, 6)
    assert not widen.use_res_connect and widen(x).shape == (2, 24, 8, 8)
    assert not InvertedResidual(16, 16, 2, 6).use_res_connect  # stride 2: no identity
    odd = InvertedResidual(16, 24, 2, 6)(torch.randn(1, 16, 7, 7))
    assert odd.shape == (1, 24, 4, 4)  # ⌈7/2⌉
    # t = 1: no expansion conv, the depthwise acts on the input channels (Table 2, row 1)
    t1 = InvertedResidual(32, 16, 1, 1)
    assert t1.hidden == 32 and t1.conv[0][0].groups == 32 and len(t1.conv) == 3
    # the shortcut really is an identity: zero the projection's BN and the block returns x
    plain = InvertedResidual(16, 16, 1, 6, shortcut="none")
    for block, expect_identity in ((same, True), (plain, False)):
        block.eval()
        torch.nn.init.zeros_(block.conv[-1].weight)
        torch.nn.init.zeros_(block.conv[-1].bias)
        out = block(x)
        assert torch.equal(out, x) if expect_identity else torch.count_nonzero(out) == 0


def test_table2_layout():
    model = MobileNetV2()
    blocks = list(model.features[1:-1])
    assert len(blocks) == 17  # the text's "19" is a known inconsistency (REFERENCE §3)
    strides = [b.stride for b in blocks]
    assert strides == [1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1]
    assert sum(b.use_res_connect for b in blocks) == 10  # n - 1 per row
    assert [b.expand_ratio for b in blocks] == [1] + [6] * 16
    # any resolution: 224 -> 7x7 before the pool; odd sizes work
    with torch.no_grad():
        assert model.features(torch.zeros(2, 3, 224, 224)).shape == (2, 1280, 7, 7)
        assert model(torch.zeros(2, 3, 97, 131)).shape == (2, 1000)


@pytest.mark.parametrize("alpha", (*GRID, 0.25, 0.6, 0.9, 1.1, 2.0))
def test_parameter_parity_with_torchvision(alpha):
    ours = MobileNetV2(num_classes=1000, width_mult=alpha)
    ref = torchvision.models.mobilenet_v2(weights=None, width_mult=alpha)
    assert count_params(ours) == count_params(ref)
    assert [t.shape for t in ours.state_dict().values()] == [
        t.shape for t in ref.state_dict().values()
    ]


@pytest.mark.parametrize("alpha", (0.35, 1.0))
def test_outputs_match_torchvision_with_its_weights(alpha):
    ref = torchvision.models.mobilenet_v2(weights=None, width_mult=alpha, num_classes=10).eval()
    ours = MobileNetV2(num_classes=10, width_mult=alpha).eval()
    ours.load_state_dict(dict(zip(ours.state_dict(), ref.state_dict().values(), strict=True)))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))
    assert count_params(ref) == {0.35: 408_938, 1.0: 2_236_682}[alpha]


def test_ablation_switches():
    base = MobileNetV2(num_classes=10, width_mult=0.35).eval()
    variants = {
        "relu6": MobileNetV2(num_classes=10, width_mult=0.35, bottleneck_act="relu6"),
        "expansion": MobileNetV2(num_classes=10, width_mult=0.35, shortcut="expansion"),
        "none": MobileNetV2(num_classes=10, width_mult=0.35, shortcut="none"),
    }
    x = torch.randn(2, 3, 32, 32)
    outs = {}
    for name, model in variants.items():
        assert count_params(model) == count_params(base)  # the switches add no parameters
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            outs[name] = model.eval()(x)
    with torch.no_grad():
        ref = base(x)
    for out in outs.values():  # same weights, a different function
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        assert (out - ref).abs().max() > 0.01 * ref.abs().max()
    # the expansion shortcut spans exactly the blocks after a bottleneck-residual block
    blocks = list(variants["expansion"].features[1:-1])
    takes = [i for i, b in enumerate(blocks) if b.takes_expansion_shortcut]
    assert takes == [i + 1 for i, b in enumerate(blocks[:-1]) if b.use_res_connect]
    assert len(takes) == 10
    # a ReLU6 bottleneck clamps the block output to [0, 6] (where no residual is added)
    block = InvertedResidual(16, 24, 2, 6, bottleneck_act="relu6")
    y = block(torch.randn(4, 16, 8, 8) * 10)
    assert y.min() >= 0 and y.max() <= 6
    with pytest.raises(ValueError, match="shortcut"):
        MobileNetV2(shortcut="sideways")


@pytest.mark.parametrize("suffix, alpha", sorted(WIDTHS.items()))
def test_registered_width_variants(suffix, alpha):
    model = create(f"mobilenetv2_{suffix}", num_classes=10).eval()
    assert model.width_mult == alpha
    ref = torchvision.models.mobilenet_v2(weights=None, width_mult=alpha, num_classes=10)
    assert count_params(model) == count_params(ref)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_mobilenetv1_baseline_counts():
    """V1 Table 1: 4.2M parameters, 569M multiply-adds at 1.0 / 224 (the V2 paper's Table 4: 575M)."""
    v1 = MobileNetV1()
    assert count_params(v1) == 4_231_976 and count_params(v1, include_bn=False) == 4_210_088
    assert abs(count_madds(v1, 224) / 569e6 - 1) < 0.005
    assert MobileNetV1(10, 0.25)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    # the CIFAR-style stem keeps twice the resolution: 4x the MAdds of the paper's stem at 32 px
    small = create("mobilenetv2", num_classes=10, width_mult=0.5, stem_stride=1)
    paper = create("mobilenetv2", num_classes=10, width_mult=0.5)
    assert 3.0 < count_madds(small, 32) / count_madds(paper, 32) < 4.5
