"""Radiograph -> model input: letterbox geometry and intensities, normalisation, augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kneescreen.data.preprocess import augment, letterbox, to_input

# -- letterbox ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64, 224])
def test_wide_image_fills_the_central_rows(size):
    """A 100x200 (rows x cols) white image fills the full width and the central half of the rows."""
    out = letterbox(np.ones((100, 200), np.float32), size)
    assert out.shape == (size, size) and out.dtype == np.uint8
    top, bottom = size // 4, size // 4 + size // 2
    assert (out[top:bottom] == 255).all()
    assert (out[:top] == 0).all() and (out[bottom:] == 0).all()


def test_tall_image_fills_the_central_columns():
    out = letterbox(np.ones((200, 100), np.float32), 64)
    assert (out[:, 16:48] == 255).all()
    assert (out[:, :16] == 0).all() and (out[:, 48:] == 0).all()


def test_square_image_fills_everything():
    out = letterbox(np.ones((300, 300), np.float32), 64)
    assert (out == 255).all()


@pytest.mark.parametrize("value,expected", [(1.0, 255), (0.0, 0), (0.5, 128), (1.7, 255), (-0.3, 0)])
def test_intensity_mapping(value, expected):
    """[0, 1] display values map to 0..255; out-of-range values are clipped, not wrapped."""
    out = letterbox(np.full((50, 50), value, np.float32), 32)
    assert (out == expected).all(), np.unique(out)


def test_content_is_kept_not_cropped():
    """A bright stripe at the very left edge of a wide image survives letterboxing."""
    img = np.zeros((100, 200), np.float32)
    img[:, :20] = 1.0
    out = letterbox(img, 64)
    assert out[16:48, :5].min() == 255
    assert out[16:48, 10:].max() < 255 and out[16:48, 10:].max() <= out[16:48, :5].min()


def test_upscaling_small_images():
    out = letterbox(np.ones((8, 16), np.float32), 64)
    assert out.shape == (64, 64)
    assert (out[16:48] == 255).all() and (out[:16] == 0).all()


def test_gradient_is_monotonic_after_resize():
    img = np.tile(np.linspace(0, 1, 400, dtype=np.float32), (400, 1))
    out = letterbox(img, 64).astype(int)
    assert (np.diff(out[32]) >= 0).all()
    assert out[32, 0] < 10 and out[32, -1] > 245


# -- to_input -------------------------------------------------------------------------------------


def test_gray_is_one_channel_and_normalised():
    batch = torch.tensor([[[51, 255], [0, 51]]], dtype=torch.uint8)  # 51/255 = 0.2
    x = to_input(batch, "gray", [0.2], [0.5])
    assert x.shape == (1, 1, 2, 2) and x.dtype == torch.float32
    assert x[0, 0, 0, 0].item() == pytest.approx(0.0, abs=1e-6)  # the mean maps to 0
    assert x[0, 0, 0, 1].item() == pytest.approx((1.0 - 0.2) / 0.5)
    assert x[0, 0, 1, 0].item() == pytest.approx(-0.2 / 0.5)


def test_rgb_replicates_the_gray_channel():
    batch = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    x = to_input(batch, "rgb", [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    assert x.shape == (3, 3, 8, 8)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    assert torch.allclose(x[:, 0], batch.float() / 255)


def test_rgb_normalises_each_channel_with_its_own_mean_and_std():
    batch = torch.full((1, 4, 4), 255, dtype=torch.uint8)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    x = to_input(batch, "rgb", mean, std)
    for c in range(3):
        assert torch.allclose(x[0, c], torch.tensor((1.0 - mean[c]) / std[c]), atol=1e-5)


def test_to_input_does_not_change_the_stored_batch():
    batch = torch.randint(0, 256, (2, 8, 8), dtype=torch.uint8)
    before = batch.clone()
    to_input(batch, "gray", [0.5], [0.25])
    assert torch.equal(batch, before)


def test_batch_mean_normalises_to_zero():
    batch = torch.randint(0, 256, (4, 16, 16), dtype=torch.uint8)
    mean = (batch.float() / 255).mean().item()
    x = to_input(batch, "gray", [mean], [0.3])
    assert x.mean().item() == pytest.approx(0.0, abs=1e-5)


# -- augment --------------------------------------------------------------------------------------


def _knee_like(n=4, size=64, seed=0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    img = np.zeros((n, size, size), np.uint8)
    img[:, size // 4 : 3 * size // 4, size // 3 : 2 * size // 3] = 200
    img += rng.integers(0, 40, img.shape, dtype=np.uint8)
    return torch.from_numpy(img)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_augment_keeps_shape_and_dtype():
    batch = _knee_like()
    out = augment(batch, _gen(0))
    assert out.shape == batch.shape and out.dtype == torch.uint8


def test_augment_is_deterministic_for_a_seed():
    batch = _knee_like()
    assert torch.equal(augment(batch, _gen(123)), augment(batch, _gen(123)))


def test_augment_differs_across_seeds():
    batch = _knee_like()
    a, b = augment(batch, _gen(1)), augment(batch, _gen(2))
    assert not torch.equal(a, b)
    assert (a.float() - b.float()).abs().mean() > 1.0


def test_augment_changes_the_image_but_not_too_much():
    batch = _knee_like(n=8)
    out = augment(batch, _gen(5))
    diff = (out.float() - batch.float()).abs().mean(dim=(1, 2))
    assert (diff > 0).all()
    # Positioning and exposure changes, not a different picture: the bright block stays mostly put.
    centre = (slice(None), slice(24, 40), slice(26, 38))
    assert out[centre].float().mean() > 150


def test_augment_leaves_input_untouched():
    batch = _knee_like()
    before = batch.clone()
    augment(batch, _gen(0))
    assert torch.equal(batch, before)


def test_black_stays_black():
    out = augment(torch.zeros((3, 32, 32), dtype=torch.uint8), _gen(0))
    assert (out == 0).all()


def test_no_vertical_flips_but_horizontal_flips_happen():
    """Top stays top (no vertical flips, rotations are small); left and right do swap sometimes."""
    n, size = 32, 48
    top = torch.zeros((n, size, size), dtype=torch.uint8)
    top[:, : size // 2] = 255
    left = top.transpose(1, 2).contiguous()
    out_top = augment(top, _gen(7)).float()
    assert (out_top[:, : size // 2].mean(dim=(1, 2)) > out_top[:, size // 2 :].mean(dim=(1, 2))).all()
    out_left = augment(left, _gen(7)).float()
    swapped = out_left[:, :, size // 2 :].mean(dim=(1, 2)) > out_left[:, :, : size // 2].mean(dim=(1, 2))
    assert 0 < int(swapped.sum()) < n
