"""Every registered R-CNN backbone: shapes, finite outputs, feature taps, known parameter counts,
and parity of torchvision's weights with torchvision's own preprocessing."""

from pathlib import Path

import numpy as np
import pytest
import sklearn.datasets
import torch
import torchvision
from torch import nn
from torchvision.transforms.v2 import functional as TF

from data.voc import load_image
from pipelines.rcnn.common import _save_model, load_model
from stages.detection.warp import IMAGENET_MEAN_BGR, warp_regions, warp_regions_tensor
from stages.models import create, names
from stages.models.rcnn_backbones import RCNNBackbone
from stages.training.rcnn import _load_backbone

# A 427×640 photo that ships with scikit-learn: real image statistics, nothing downloaded.
PHOTO = Path(sklearn.datasets.__file__).parent / "images" / "china.jpg"

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
    # conv1's weights are converted to our input (test_torchvision_weights_match_torchvision...)
    assert torch.equal(model.conv[0].bias, tv.features[0].bias)
    assert torch.equal(model.conv[3].weight, tv.features[3].weight)
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


def _torchvision_input(pixels_bgr: np.ndarray, weights) -> torch.Tensor:
    """torchvision's preprocessing of ``(N, S, S, 3)`` BGR 0–255 pixels: RGB, /255, then
    normalised with the mean/std of ``weights.transforms()`` -> ``(N, 3, S, S)``."""
    rgb = np.ascontiguousarray(pixels_bgr[..., ::-1], dtype=np.float32) / 255
    preset = weights.transforms()
    return TF.normalize(torch.from_numpy(rgb).permute(0, 3, 1, 2), preset.mean, preset.std)


def _assert_close_at_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4):
    scale = expected.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


@pytest.mark.parametrize(
    "name, weights",
    [
        ("alexnet", torchvision.models.AlexNet_Weights.IMAGENET1K_V1),
        # ~8 s on two CPU cores (a 528 MB file, three nets built, two forwards at 224 px)
        ("vgg16", torchvision.models.VGG16_Weights.IMAGENET1K_V1),
    ],
)
def test_torchvision_weights_match_torchvision_on_its_own_preprocessing(tmp_path, name, weights):
    """A torchvision ImageNet file loaded through ``weights_path`` computes, on the pipeline's BGR
    mean-subtracted crops, what torchvision's net computes on its RGB-normalised crop of the same
    pixels (REFERENCE §1 "Features": pool5 and fc7 are the region features)."""
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)(weights=None).eval()  # the file's layout
    torch.save(reference.state_dict(), tmp_path / "tv.pth")
    model = create(f"rcnn_{name}", weights_path=str(tmp_path / "tv.pth")).eval()
    size = model.input_size
    image = load_image(PHOTO)  # (427, 640, 3) BGR uint8, as the pipeline reads images
    mean = np.asarray(IMAGENET_MEAN_BGR, np.float32)
    # 1) an S×S box without context: the warp is a copy, so torchvision's input comes straight
    #    from the uint8 pixels; 2) a corner box with 16 px of context (the pipeline's default),
    #    partly outside the image, where the pipeline's crop holds the mean colour.
    inside = np.array([[101, 51, 100 + size, 50 + size]], np.float32)  # 1-based inclusive xyxy
    corner = np.array([[1, 1, 120, 90]], np.float32)
    x = torch.cat(
        [
            warp_regions_tensor(image, inside, size=size, padding=0),
            warp_regions_tensor(image, corner, size=size, padding=16),
        ]
    )  # (2, 3, S, S), BGR minus the mean: what the features step feeds the CNN
    crop = image[50 : 50 + size, 100 : 100 + size]  # (S, S, 3) uint8
    assert torch.equal(x[0], torch.from_numpy(crop.astype(np.float32) - mean).permute(2, 0, 1))
    pixels = np.stack([crop, warp_regions(image, corner, size=size, padding=16)[0] + mean])
    x_tv = _torchvision_input(pixels, weights)

    with torch.inference_mode():
        ours = model.features_all(x)
        logits = model(x)
        pool5 = torch.flatten(reference.avgpool(reference.features(x_tv)), 1)
        fc7 = reference.classifier[:6](pool5)  # ... fc7, ReLU (dropout is identity in eval)
        ref_logits = reference.classifier(pool5)
    assert (pool5 > 0).float().mean() > 0.05 and (fc7 > 0).float().mean() > 0.05  # not all dead
    _assert_close_at_scale(ours["pool5"], pool5)
    _assert_close_at_scale(ours["fc7"], fc7)
    _assert_close_at_scale(logits, ref_logits)


def _forward_without_shift(model: RCNNBackbone, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The forward pass as it was before ``input_shift`` existed."""
    if model.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    pool5 = model.conv(x).flatten(1)
    fc6 = torch.relu(model.fc6(pool5))
    return {"pool5": pool5, "fc6": fc6, "fc7": torch.relu(model.fc7(fc6))}


def test_state_dict_without_input_shift_loads_as_zero_shift(tmp_path):
    """Files saved before the buffer existed (model.pt of earlier runs) still load, strictly or
    not, and give the outputs they gave then."""
    torch.manual_seed(0)
    kwargs = {"num_classes": 5, "input_size": 32}
    model = create("rcnn_small", **kwargs).eval()
    old = {k: v for k, v in model.state_dict().items() if k != "input_shift"}
    torch.save(old, tmp_path / "old_weights.pt")
    _save_model(tmp_path / "model.pt", old, model="rcnn_small", model_kwargs=kwargs, num_outputs=5)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        before = _forward_without_shift(model, x)

    strict = create("rcnn_small", **kwargs)
    strict.input_shift.fill_(7.0)  # a missing key means zero, not "keep what was there"
    strict.load_state_dict(old)
    partial = create("rcnn_small", **kwargs)
    partial.input_shift.fill_(7.0)
    _load_backbone(partial, old)  # fine-tuning's init: strict=False, fails on missing keys
    from_file = create("rcnn_small", **kwargs, weights_path=str(tmp_path / "old_weights.pt"))
    for net in (strict, partial, from_file, load_model(tmp_path / "model.pt")):
        assert torch.equal(net.input_shift, torch.zeros(3))
        with torch.no_grad():
            after = net.eval().features_all(x)
        for layer in ("pool5", "fc7"):
            assert torch.equal(after[layer], before[layer]), layer
    assert set(old) == set(model.state_dict()) - {"input_shift"}  # old dict itself untouched


def test_input_shift_is_saved_and_carried_through_finetuning_and_fusion(tmp_path):
    torch.manual_seed(0)
    kwargs = {"num_classes": 5, "input_size": 32}
    model = create("rcnn_small", **kwargs).eval()
    shift = torch.tensor([-20.0, 3.5, 11.0])
    model.input_shift.copy_(shift)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = _forward_without_shift(model, x + shift.view(1, 3, 1, 1))
        torch.testing.assert_close(model.features_all(x)["fc7"], expected["fc7"])

    assert torch.equal(model.state_dict()["input_shift"], shift)
    state = model.state_dict()
    _save_model(
        tmp_path / "model.pt", state, model="rcnn_small", model_kwargs=kwargs, num_outputs=5
    )
    saved = load_model(tmp_path / "model.pt")  # as the finetune step reads the pretrain step's
    finetuned = create("rcnn_small", **kwargs)
    finetuned.replace_head(4)  # 3 classes + background
    _load_backbone(finetuned, saved.state_dict())
    for net in (saved, saved.fused_for_inference(), finetuned.eval()):
        assert torch.equal(net.input_shift, shift)
        with torch.no_grad():
            torch.testing.assert_close(net.features_all(x)["fc7"], expected["fc7"])
