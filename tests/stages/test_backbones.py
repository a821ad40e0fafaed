"""Every registered R-CNN backbone: shapes, finite outputs, feature taps, known parameter counts."""

import pytest
import torch
import torchvision
from torch import nn

from stages.models import create, names
from stages.models.rcnn_backbones import RCNNBackbone

# Small-net parameters, from its architecture table: 4 × (conv3×3 without bias + BN γ/β), fc6-fc8.
_W = (3, 16, 32, 64, 128)
_SMALL_PARAMS = sum(9 * a * b + 2 * b for a, b in zip(_W[:-1], _W[1:], strict=True)) + (
    (2048 * 512 + 512) + (512 * 512 + 512) + (512 * 1000 + 1000)
)
# name -> (input side, pool5 dim, fc6/fc7 dim, parameters at the default 1000 classes)
EXPECTED = {
    "rcnn_alexnet": (227, 6 * 6 * 256, 4096, 61_100_840),  # torchvision alexnet's count
    "rcnn_vgg16": (224, 7 * 7 * 512, 4096, 138_357_544),  # torchvision vgg16's count
    "rcnn_small": (64, 4 * 4 * 128, 512, _SMALL_PARAMS),
}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: create(name).eval() for name in EXPECTED}


def test_every_registered_rcnn_model_has_expectations():
    # other papers' models are tested beside their own code
    assert set(EXPECTED) == {n for n in names() if n.startswith("rcnn_")}


def test_unknown_name_lists_valid_ones():
    with pytest.raises(KeyError, match="rcnn_alexnet.*rcnn_small"):
        create("rcnn_resnet")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parameter_counts(models, name):
    assert sum(p.numel() for p in models[name].parameters()) == EXPECTED[name][3]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shapes_features_and_determinism(models, name):
    model = models[name]
    side, pool5, fc, _ = EXPECTED[name]
    assert model.input_size == side
    assert model.feature_dims == {"pool5": pool5, "fc6": fc, "fc7": fc}
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x)
        feats = model.features_all(x)
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()
    for layer, dim in model.feature_dims.items():
        assert feats[layer].shape == (1, dim) and torch.isfinite(feats[layer]).all()
    assert (feats["fc6"] >= 0).all() and (feats["fc7"] >= 0).all()  # taken after ReLU
    # A second pass gives identical numbers (eval: dropout off, BN on running statistics), and
    # the logits are fc8 of the fc7 feature.
    assert torch.equal(model.fc8(feats["fc7"]), logits)


def test_features_match_a_manual_forward():
    torch.manual_seed(0)
    model = create("rcnn_small", num_classes=7, input_size=32).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        h = model.conv(x).flatten(1)  # (4, 128 * 2 * 2)
        fc6 = torch.relu(model.fc6(h))
        fc7 = torch.relu(model.fc7(fc6))
        assert h.shape == (4, 512)
        torch.testing.assert_close(model.features(x, "pool5"), h)
        torch.testing.assert_close(model.features(x, "fc6"), fc6)
        torch.testing.assert_close(model.features(x, "fc7"), fc7)
        torch.testing.assert_close(model.features_all(x)["fc7"], fc7)
    assert model(x).shape == (4, 7)


def test_features_reject_wrong_layer_and_size():
    model = create("rcnn_small", input_size=32).eval()
    with pytest.raises(ValueError, match="fc8"):
        model.features(torch.zeros(1, 3, 32, 32), "fc8")
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        model(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="multiple of 16"):
        create("rcnn_small", input_size=40)


def test_train_mode_uses_dropout():
    torch.manual_seed(0)
    model = create("rcnn_small", input_size=32).train()
    x = torch.randn(8, 3, 32, 32)
    assert not torch.equal(model.features(x, "fc7"), model.features(x, "fc7"))


@pytest.mark.parametrize("name", ["rcnn_small", "rcnn_alexnet"])
def test_replace_head(name):
    torch.manual_seed(0)
    model = create(name).eval()
    new_params = model.replace_head(21)  # 20 VOC classes + background
    assert model.num_outputs == 21
    assert [p.shape for p in new_params] == [(21, EXPECTED[name][2]), (21,)]
    assert {id(p) for p in new_params} == {id(p) for p in model.fc8.parameters()}
    assert model.fc8.bias.abs().max() == 0
    assert abs(model.fc8.weight.std().item() - 0.01) < 0.002  # N(0, 0.01²), R-CNN §2.3
    side = EXPECTED[name][0]
    with torch.no_grad():
        assert model(torch.zeros(2, 3, side, side)).shape == (2, 21)


def test_weights_path_accepts_ours_and_torchvision_layout(tmp_path):
    torch.manual_seed(0)
    ours = create("rcnn_small", num_classes=5, input_size=32)
    torch.save(ours.state_dict(), tmp_path / "ours.pt")
    loaded = create(
        "rcnn_small", num_classes=5, input_size=32, weights_path=str(tmp_path / "ours.pt")
    )
    loaded_state = loaded.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, loaded_state[key]), key

    # torchvision's AlexNet file layout: features.*, classifier.{1,4,6}.*
    tv = torchvision.models.alexnet(weights=None, num_classes=10)
    torch.save(tv.state_dict(), tmp_path / "tv_alexnet.pt")
    model = create("rcnn_alexnet", num_classes=10, weights_path=str(tmp_path / "tv_alexnet.pt"))
    assert torch.equal(model.conv[0].weight, tv.features[0].weight)
    assert torch.equal(model.fc6.weight, tv.classifier[1].weight)
    assert torch.equal(model.fc8.bias, tv.classifier[6].bias)

    with pytest.raises(FileNotFoundError, match="missing.pt"):
        create("rcnn_small", weights_path=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="ours.pt does not fit"):
        create("rcnn_small", num_classes=6, input_size=32, weights_path=str(tmp_path / "ours.pt"))


def test_trunk_size_check_rejects_mismatched_fc6():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2))  # 8 × 8 × 8 at 16 px
    with pytest.raises(ValueError, match="8×8×8 = 512"):
        RCNNBackbone(conv, nn.Linear(500, 4), nn.Linear(4, 4), nn.Linear(4, 2), input_size=16)


def test_fused_inference_copy_equals_the_original():
    torch.manual_seed(0)
    model = create("rcnn_small", num_classes=5, input_size=32)
    for m in model.modules():  # non-trivial running statistics and affine parameters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    model.eval()
    fused = model.fused_for_inference()
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules()) == 0
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 4  # original untouched
    assert not fused.training and fused.channels_last
    x = torch.randn(6, 3, 32, 32)
    with torch.inference_mode():
        a, b = model.features_all(x), fused.features_all(x)
    for layer in ("pool5", "fc6", "fc7"):
        torch.testing.assert_close(b[layer], a[layer], rtol=1e-5, atol=1e-5)
    alex = create("rcnn_alexnet", num_classes=3).eval()
    assert [type(m) for m in alex.fused_for_inference().conv] == [type(m) for m in alex.conv]
