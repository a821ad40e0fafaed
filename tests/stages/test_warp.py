import cv2
import numpy as np
import pytest
import torch

from stages.detection.warp import (
    IMAGENET_MEAN_BGR,
    round_half_away,
    warp_regions,
    warp_regions_tensor,
)

MEAN = np.array(IMAGENET_MEAN_BGR, dtype=np.float32)
A, B = 200.0, 50.0  # inside / outside the box


def two_tone(height: int, width: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """Value B everywhere, A on the VOC 1-based inclusive box."""
    image = np.full((height, width, 3), B, dtype=np.uint8)
    x1, y1, x2, y2 = box
    image[y1 - 1 : y2, x1 - 1 : x2] = A
    return image


def test_round_half_away_vs_python_round():
    assert round_half_away(2.5) == 3 and round_half_away(-2.5) == -3
    assert round_half_away(1.5) == 2 and round_half_away(0.49) == 0
    # even integer parts: np.round and Python's round (half to even) give 0, 2, 4, -2 here
    assert round_half_away(np.array([0.5, 2.5, 4.5, -2.5])).tolist() == [1, 3, 5, -3]
    np.testing.assert_array_equal(round_half_away(np.array([-0.5, 0.5, -1.2, 3.7])), [-1, 1, -1, 4])


def test_context_padding_inside_image():
    # A 195-px box with p = 16 at size 227. rcnn_im_crop: centre 101 + 97.5 = 198.5, edges
    # round(198.5 -+ 97.5 * 227/195 = 113.5) = 85 and 312, so the dilated box is 228 px: 16 source
    # px of context on the left, 17 on the right, resized by 227/228. Output column j samples
    # u = (j + 0.5) * 228/227 - 0.5 of the window; the box starts at window column 16 and ends at
    # 210, so output column 15 is 93% B, columns 16..209 are pure A and 210 is 92% B.
    box = (101, 101, 295, 295)
    out = warp_regions(two_tone(400, 400, box), np.array([box], dtype=float))[0]  # (227, 227, 3)
    assert out.shape == (227, 227, 3)
    np.testing.assert_allclose(out[113, 5], B - MEAN, atol=1e-4)
    np.testing.assert_allclose(out[113, 113], A - MEAN, atol=1e-4)
    np.testing.assert_allclose(out[5, 113], B - MEAN, atol=1e-4)
    row = out[113, :, 0] + MEAN[0]
    inside = np.flatnonzero(row > (A + B) / 2)
    assert inside[0] == 16 and inside[-1] == 209  # 16 px context left, 17 px right
    assert np.all(np.abs(row[16:210] - A) < 1e-4)
    assert row[15] == pytest.approx(B + (A - B) * (15.5 * 228 / 227 - 0.5 - 15), abs=1e-3)
    col = out[:, 113, 0] + MEAN[0]
    assert np.array_equal(np.flatnonzero(col > (A + B) / 2), inside)  # same vertically


def test_box_at_top_left_edge_pads_with_mean():
    # Box (1, 1, 100, 100), p = 16: edges round(51 -+ 50 * 227/195) = -7 and 109, 117 px wide.
    # 8 px fall left of the image -> round(8 * 227/117) = 16 output columns of mean (exactly 0);
    # the 109 in-image px fill round(109 * 227/117) = 211 columns; 9 px of them are right context.
    box = (1, 1, 100, 100)
    out = warp_regions(two_tone(300, 300, box), np.array([box], dtype=float))[0]
    assert np.all(out[:16, :] == 0) and np.all(out[:, :16] == 0)
    assert np.all(out[16:, 16:] != 0)
    np.testing.assert_allclose(out[113, 16], A - MEAN, atol=1e-4)  # first in-image column
    np.testing.assert_allclose(out[113, 226], B - MEAN, atol=1e-4)  # right context: image content
    np.testing.assert_allclose(out[226, 113], B - MEAN, atol=1e-4)
    b_cols = np.flatnonzero(np.abs(out[113, :, 0] + MEAN[0] - B) < 1e-4)
    assert 16 <= len(b_cols) <= 19  # 9 source px * 211/109 = 17.4 output px


def test_no_padding_whole_image_equals_cv2_resize():
    rng = np.random.default_rng(0)
    for height, width in [(50, 70), (300, 401)]:  # up- and down-sampling
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        box = np.array([[1, 1, width, height]], dtype=float)
        out = warp_regions(image, box, padding=0)[0]
        want = cv2.resize(image.astype(np.float32), (227, 227), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_allclose(out, want - MEAN, atol=1e-3)


def test_no_padding_box_is_the_crop():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    out = warp_regions(image, np.array([[11, 21, 60, 40]], dtype=float), padding=0, size=64)[0]
    crop = image[20:40, 10:60].astype(np.float32)  # rows 21..40, cols 11..60, 1-based
    want = cv2.resize(crop, (64, 64), interpolation=cv2.INTER_LINEAR) - MEAN
    np.testing.assert_allclose(out, want, atol=1e-3)


def test_shapes_dtype_channel_order_and_tensor_layout():
    image = np.zeros((40, 50, 3), dtype=np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 10, 20, 30  # B, G, R
    boxes = np.array([[1, 1, 50, 40], [5, 5, 20, 30], [30, 10, 45, 12]], dtype=float)
    out = warp_regions(image, boxes, size=32, padding=0, mean_bgr=(1, 2, 3))
    assert out.shape == (3, 32, 32, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[..., 0], 9)
    np.testing.assert_allclose(out[..., 1], 18)
    np.testing.assert_allclose(out[..., 2], 27)
    tensor = warp_regions_tensor(image, boxes, size=32, padding=0, mean_bgr=(1, 2, 3))
    assert tensor.shape == (3, 3, 32, 32) and tensor.dtype == torch.float32
    assert tensor.is_contiguous()
    np.testing.assert_array_equal(tensor.numpy(), out.transpose(0, 3, 1, 2))
    assert warp_regions(image, np.zeros((0, 4)), size=32, padding=4).shape == (0, 32, 32, 3)
    half = warp_regions(image, boxes, size=32, padding=4, out_dtype=np.float16)
    assert half.dtype == np.float16


def test_square_modes_isotropic_with_and_without_context():
    # Wide box 100 x 20 px; p = 0. Tightest square: half side 50 around (151, 151) ->
    # round(151 -+ 50) = 101..201 (101 px, rcnn_im_crop's half-pixel-right centre), isotropic
    # scale 227/101, so the box covers 20 * 227/101 = 45 output rows.
    box = (101, 141, 200, 160)
    image = two_tone(300, 300, box)
    boxes = np.array([box], dtype=float)
    ctx = warp_regions(image, boxes, padding=0, mode="square_context")[0]
    noctx = warp_regions(image, boxes, padding=0, mode="square_mean")[0]
    warp = warp_regions(image, boxes, padding=0, mode="warp")[0]
    for out in (ctx, noctx):
        np.testing.assert_allclose(out[113, 113], A - MEAN, atol=1e-4)
        rows = np.flatnonzero(out[:, 113, 0] + MEAN[0] > (A + B) / 2)
        assert abs(len(rows) - 20 * 227 / 101) <= 1.5
    np.testing.assert_allclose(ctx[20, 113], B - MEAN, atol=1e-4)  # image above the box
    assert np.all(noctx[20, :] == 0) and np.all(noctx[-20, :] == 0)  # mean instead
    np.testing.assert_allclose(warp, np.broadcast_to(A - MEAN, warp.shape), atol=1e-4)  # box only


def test_square_with_padding_at_image_edge():
    # Square modes dilate by the same 227/195 and mean-fill outside the image, as warp does.
    box = (1, 101, 50, 200)  # 50 x 100, touching the left edge
    image = two_tone(300, 300, box)
    out = warp_regions(image, np.array([box], dtype=float), mode="square_context")[0]
    # Square half side 50 around x = 26: round(26 -+ 58.2) = -32..84 -> 33 px outside, x 227/117.
    assert np.all(out[:, :64] == 0) and np.any(out[:, 64] != 0)


def test_rejects_bad_boxes_naming_the_index():
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    good = [1, 1, 10, 10]
    for bad in ([5, 1, 4, 10], [0, 1, 10, 10], [1, 1, 31, 10], [1, 1, 10, np.nan]):
        with pytest.raises(ValueError, match="box 1 "):
            warp_regions(image, np.array([good, bad], dtype=float))
    with pytest.raises(ValueError, match="mode"):
        warp_regions(image, np.array([good], dtype=float), mode="square")
    with pytest.raises(ValueError, match="padding"):
        warp_regions(image, np.array([good], dtype=float), size=32, padding=16)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        warp_regions(image[..., 0], np.array([good], dtype=float))
