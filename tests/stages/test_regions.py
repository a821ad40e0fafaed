import cv2
import numpy as np
import pytest
from PIL import Image

from data.errors import DatasetError
from data.synthetic_voc import SHAPE_CLASSES, generate_voc
from data.voc import load_instance_mask, read_voc
from stages.detection.regions import (
    REGION_MODES,
    combine_region_features,
    region_accuracy,
    region_inputs,
    warp_foreground,
    warp_region_masks,
)
from stages.detection.warp import warp_regions

H, W = 150, 200
CX, CY, R = 90, 70, 40  # circle centre (0-based pixels) and radius


def circle_scene() -> tuple[np.ndarray, np.ndarray]:
    """A textured (random) BGR image with a flat-coloured filled circle; its bool mask."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    mask = np.zeros((H, W), dtype=np.uint8)
    cv2.circle(mask, (CX, CY), R, 1, thickness=-1)
    image[mask.astype(bool)] = (30, 200, 90)
    return image, mask.astype(bool)


def circle_box() -> np.ndarray:
    """VOC 1-based inclusive bounding box of the circle mask: (N=1, 4)."""
    ys, xs = np.nonzero(circle_scene()[1])
    return np.array([[xs.min() + 1, ys.min() + 1, xs.max() + 1, ys.max() + 1]], dtype=float)


def test_whole_image_mask_warp_matches_nearest_resize():
    _, mask = circle_scene()
    box = np.array([[1, 1, W, H]], dtype=float)
    for size in (64, 227):  # down- and up-sampling
        got = warp_region_masks(mask[None], box, size=size, padding=0)
        assert got.shape == (1, size, size) and got.dtype == bool
        want = cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
        differ_frac = np.mean(got[0] != want.astype(bool))
        assert differ_frac <= 0.02  # only a thin band along the circle's edge
        assert got[0, size // 2 - 5 : size // 2 + 5, 0:3].sum() == 0  # left of circle: background


def test_mask_area_fraction_matches_circle_over_box():
    _, mask = circle_scene()
    box = circle_box()
    circle_frac = mask.sum() / ((box[0, 2] - box[0, 0] + 1) * (box[0, 3] - box[0, 1] + 1))
    assert circle_frac == pytest.approx(np.pi / 4, abs=0.02)
    tight = warp_region_masks(mask[None], box, size=227, padding=0)[0]
    assert tight.mean() == pytest.approx(circle_frac, abs=0.05)
    # p = 16 context shrinks the box to (227 - 32)/227 of each side of the output.
    padded = warp_region_masks(mask[None], box, size=227, padding=16)[0]
    assert padded.mean() == pytest.approx(circle_frac * (195 / 227) ** 2, abs=0.05)
    assert not padded[:10].any() and not padded[:, :10].any()  # context ring: no object


def test_mask_context_outside_image_is_false():
    # A mask that is True everywhere, box at the top-left corner with p = 16: the 8 source px
    # left of / above the image become 16 output px of False (same numbers as test_warp.py).
    mask = np.ones((1, 300, 300), dtype=bool)
    got = warp_region_masks(mask, np.array([[1, 1, 100, 100]], float), size=227, padding=16)[0]
    assert not got[:16].any() and not got[:, :16].any()
    assert got[16:, 16:].all()


def test_fg_is_full_crop_inside_mask_and_zero_outside():
    image, mask = circle_scene()
    boxes = np.vstack([circle_box(), [[1, 1, W, H]], [[60, 40, 120, 110]]])  # (3, 4)
    masks = np.repeat(mask[None], 3, axis=0)  # (3, H, W)
    crops = region_inputs(image, boxes, masks, size=96, padding=8)
    full = warp_regions(image, boxes, size=96, padding=8)
    np.testing.assert_array_equal(crops["full"], full)
    inside = warp_region_masks(masks, boxes, size=96, padding=8)  # (3, S, S)
    fg = crops["fg"]
    assert fg.shape == (3, 96, 96, 3) and fg.dtype == np.float32
    assert np.all(fg[~inside] == 0)  # background = the mean, 0 after subtraction
    np.testing.assert_array_equal(fg[inside], full[inside])
    np.testing.assert_array_equal(warp_foreground(image, boxes, masks, size=96, padding=8), fg)
    # Every box sees part of the circle; fg really removed a textured (non-mean) background.
    assert all(inside[i].mean() > 0.1 for i in range(3))  # whole image: 0.17 * (80/96)**2
    for i in (0, 2):  # their context lies inside the image (box 1's runs off it: 0 there)
        off = full[i][~inside[i]]  # (M, 3) background pixels of the full crop
        assert np.count_nonzero(off) > 0.99 * off.size


def test_mask_checks():
    image, mask = circle_scene()
    box = circle_box()
    with pytest.raises(ValueError, match="bool"):
        warp_region_masks(mask[None].astype(np.uint8), box, size=32, padding=0)
    with pytest.raises(ValueError, match="N=2"):
        warp_region_masks(mask[None], np.vstack([box, box]), size=32, padding=0)
    with pytest.raises(ValueError, match="image is"):
        region_inputs(image, box, mask[None, :-1], size=32, padding=0)
    empty = region_inputs(image, np.zeros((0, 4)), np.zeros((0, H, W), bool), size=32, padding=4)
    assert empty["full"].shape == empty["fg"].shape == (0, 32, 32, 3)


def test_combine_region_features():
    full = np.arange(12, dtype=np.float32).reshape(3, 4)
    fg = -np.arange(12, dtype=np.float32).reshape(3, 4) - 1
    assert combine_region_features(full, fg, "full") is full
    assert combine_region_features(full, fg, "fg") is fg
    both = combine_region_features(full, fg, "full+fg")
    assert both.shape == (3, 8)
    np.testing.assert_array_equal(both[:, :4], full)  # order: [full, fg]
    np.testing.assert_array_equal(both[:, 4:], fg)
    with pytest.raises(ValueError, match="full\\+fg"):
        combine_region_features(full, fg, "fg+full")
    assert REGION_MODES == ("full", "fg", "full+fg")


def test_region_accuracy_separable_and_chance():
    rng = np.random.default_rng(0)
    k, d = 3, 20
    centres = 10 * rng.standard_normal((k, d))

    def sample(n):
        y = rng.integers(0, k, n)
        return centres[y] + rng.standard_normal((n, d)), y

    (train_X, train_y), (test_X, test_y) = sample(150), sample(90)
    result = region_accuracy(train_X, train_y, test_X, test_y, num_classes=k)
    assert result["accuracy"] == 1.0
    assert result["per_class"] == {0: 1.0, 1: 1.0, 2: 1.0}
    assert np.array_equal(np.diag(result["confusion"]), np.bincount(test_y, minlength=k))

    # Labels independent of the features: expect 1/3, std sqrt(2/9 / 600) = 0.019.
    train_X, test_X = rng.standard_normal((600, d)), rng.standard_normal((600, d))
    train_y, test_y = rng.integers(0, k, 600), rng.integers(0, k, 600)
    result = region_accuracy(train_X, train_y, test_X, test_y, num_classes=4)  # class 3 unused
    assert abs(result["accuracy"] - 1 / 3) < 0.08
    assert sorted(result["per_class"]) == [0, 1, 2, 3] and np.isnan(result["per_class"][3])
    confusion = np.array(result["confusion"])
    assert confusion.shape == (4, 4) and confusion.sum() == 600
    np.testing.assert_array_equal(confusion.sum(axis=1)[:3], np.bincount(test_y, minlength=3))
    assert result["accuracy"] == pytest.approx(np.trace(confusion) / 600)

    with pytest.raises(ValueError, match="0..3"):
        region_accuracy(train_X, train_y + 2, test_X, test_y, num_classes=4)
    with pytest.raises(ValueError, match="at least two"):
        region_accuracy(train_X, 0 * train_y, test_X, test_y, num_classes=4)


def test_load_instance_mask_matches_xml_boxes(tmp_path):
    generate_voc(tmp_path, num_train=4, num_test=0, seed=3, image_size=(160, 120))
    images = read_voc(tmp_path, "trainval", classes=SHAPE_CLASSES)
    checked = 0
    for image in images:
        mask = load_instance_mask(tmp_path, image.image_id, expected_shape=(120, 160))
        assert mask.dtype == np.uint8 and mask.shape == (120, 160)
        assert set(np.unique(mask)) <= set(range(len(image.objects) + 1))
        for k, obj in enumerate(image.objects, start=1):
            ys, xs = np.nonzero(mask == k)
            box = (xs.min() + 1, ys.min() + 1, xs.max() + 1, ys.max() + 1)  # 1-based inclusive
            assert box == obj.box_xyxy
            checked += 1
    assert checked >= 4

    with pytest.raises(DatasetError, match="expected \\(100, 160\\)"):
        load_instance_mask(tmp_path, images[0].image_id, expected_shape=(100, 160))
    with pytest.raises(DatasetError, match="999999.png: instance mask missing"):
        load_instance_mask(tmp_path, "999999")
    for bad in ("../Annotations/000001", "a/b", ""):
        with pytest.raises(DatasetError, match="not a plain file name"):
            load_instance_mask(tmp_path, bad)
    (tmp_path / "SegmentationObject" / "junk.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="junk.png: cannot decode"):
        load_instance_mask(tmp_path, "junk")
    cv2.imwrite(str(tmp_path / "SegmentationObject" / "colour.png"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DatasetError, match="colour.png: PNG mode 'RGB'"):
        load_instance_mask(tmp_path, "colour")


def test_load_instance_mask_palette_png_keeps_indices_and_void(tmp_path):
    # Real VOC masks: palette PNGs whose colours differ from their indices; 255 = void border.
    index = np.zeros((6, 7), dtype=np.uint8)
    index[1:5, 1:4], index[2:4, 4:6], index[0, :] = 1, 2, 255
    img = Image.frombytes("P", (7, 6), index.tobytes())  # (width, height)
    palette = [0] * 768
    palette[3:9] = [128, 0, 0, 0, 128, 0]  # VOC colours of indices 1 and 2
    palette[765:768] = [224, 224, 192]  # VOC's void colour
    img.putpalette(palette)
    (tmp_path / "SegmentationObject").mkdir()
    img.save(tmp_path / "SegmentationObject" / "2007_000032.png")
    mask = load_instance_mask(tmp_path, "2007_000032", expected_shape=(6, 7))
    np.testing.assert_array_equal(mask, index)
