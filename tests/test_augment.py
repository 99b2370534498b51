"""Multi-crop augmentation: shapes, layout, reproducibility, and the pieces against PIL/numpy references."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL.Image
import pytest
import torch

from lvd.training.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiCrop,
    MultiCropConfig,
    augment_batch,
    color_jitter,
    random_resized_crop,
    sample_rng,
    to_normalized_array,
)


def _images(n: int, seed: int = 0) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 60, 3), dtype=np.uint8)) for i in range(n)]


CFG = MultiCropConfig(global_crops_size=28, local_crops_size=14, local_crops_number=3)


def test_batch_layout_and_shapes():
    images = _images(4)
    out = augment_batch(images, MultiCrop(CFG), seed=0, rank=0, step=0)
    assert out["global_crops"].shape == (8, 3, 28, 28) and out["global_crops"].dtype == torch.float32
    assert out["local_crops"].shape == (12, 3, 14, 14)
    # View-major: row v*B + i is view v of image i, i.e. what MultiCrop gives image i with its own RNG.
    g, loc = MultiCrop(CFG)(images[2], sample_rng(0, 0, 0, 2))
    np.testing.assert_array_equal(out["global_crops"][4 + 2].numpy(), g[1])
    np.testing.assert_array_equal(out["local_crops"][2 * 4 + 2].numpy(), loc[2])


def test_reproducible_per_step_and_thread_pool_equal():
    images = _images(5)
    mc = MultiCrop(CFG)
    a = augment_batch(images, mc, seed=3, rank=1, step=7)
    with ThreadPoolExecutor(3) as pool:
        b = augment_batch(images, mc, seed=3, rank=1, step=7, pool=pool)
    for k in a:
        assert torch.equal(a[k], b[k])
    c = augment_batch(images, mc, seed=3, rank=1, step=8)
    d = augment_batch(images, mc, seed=3, rank=2, step=7)
    assert not torch.equal(a["global_crops"], c["global_crops"])
    assert not torch.equal(a["global_crops"], d["global_crops"])


def test_full_crop_is_plain_resize_and_normalisation():
    img = _images(1)[0]
    crop = random_resized_crop(img, 20, (1.0, 1.0), np.random.default_rng(0), ratio=(60 / 40, 60 / 40))
    ref = img.resize((20, 20), PIL.Image.BICUBIC)
    np.testing.assert_array_equal(np.asarray(crop), np.asarray(ref))
    x = to_normalized_array(crop)
    expected = (np.asarray(ref, np.float64) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(x, expected.transpose(2, 0, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [(0.05, 0.32), (0.32, 1.0)])
def test_crop_area_within_scale(scale):
    # A gradient image: each output corner's value reveals where the crop box lies in the input.
    w, h = 200, 100
    xs = np.tile(np.linspace(0, 255, w), (h, 1))
    ys = np.tile(np.linspace(0, 255, h)[:, None], (1, w))
    img = PIL.Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], -1).astype(np.uint8))
    for seed in range(10):
        crop = np.asarray(random_resized_crop(img, 32, scale, np.random.default_rng(seed)), np.float64)
        width = (crop[:, -1, 0].mean() - crop[:, 0, 0].mean()) / 255 * w * 32 / 31
        height = (crop[-1, :, 1].mean() - crop[0, :, 1].mean()) / 255 * h * 32 / 31
        frac = width * height / (w * h)
        assert scale[0] * 0.7 <= frac <= scale[1] * 1.3, (seed, frac)


def test_color_jitter_on_gray_keeps_gray_and_changes_brightness():
    gray = PIL.Image.new("RGB", (8, 8), (100, 100, 100))
    out = np.asarray(color_jitter(gray, np.random.default_rng(4)))
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()  # no hue on grey
    values = {int(np.asarray(color_jitter(gray, np.random.default_rng(s)))[0, 0, 0]) for s in range(10)}
    assert len(values) > 3 and all(100 * 0.6 * 0.6 - 2 <= v <= min(255, 100 * 1.4 * 1.4) + 2 for v in values)


def test_grayscale_and_solarize_are_reachable():
    # Over many draws the second global crop is sometimes solarized / grey, like the recipe's p=0.2.
    img = PIL.Image.fromarray(np.full((30, 30, 3), (250, 10, 120), np.uint8))
    mc = MultiCrop(MultiCropConfig(global_crops_size=14, local_crops_size=14, local_crops_number=0))
    grey = 0
    for s in range(60):
        g, _ = mc(img, np.random.default_rng(s))
        pix = g[1][:, 7, 7] * IMAGENET_STD + IMAGENET_MEAN
        grey += bool(np.allclose(pix, pix[0], atol=2 / 255))
    assert 2 <= grey <= 30


def _high_frequency_energy(x: np.ndarray) -> float:
    return float(np.abs(np.diff(x, axis=1)).mean())  # differences along the width


def test_blur_scales_with_crop_size():
    """The recipe's blur (sigma 0.1-2 px at 224/98 px) shrinks with the crop: at a quarter of the size a
    stripe pattern 3 px apart keeps its contrast; an unscaled blur would flatten it."""
    from lvd.training.augment import MultiCrop, MultiCropConfig, gaussian_blur

    mc = MultiCrop(MultiCropConfig(global_crops_size=56, local_crops_size=28))
    assert mc.global_blur == pytest.approx(56 / 224) and mc.local_blur == pytest.approx(28 / 98)
    assert MultiCrop(MultiCropConfig()).global_blur == 1.0
    stripes = np.zeros((56, 56, 3), dtype=np.uint8)
    stripes[:, ::3] = 255
    img = PIL.Image.fromarray(stripes)
    sharp = _high_frequency_energy(np.asarray(img, dtype=np.float64))
    scaled = [
        _high_frequency_energy(
            np.asarray(gaussian_blur(img, np.random.default_rng(s), mc.global_blur), dtype=np.float64)
        )
        for s in range(20)
    ]
    unscaled = [
        _high_frequency_energy(
            np.asarray(gaussian_blur(img, np.random.default_rng(s), 1.0), dtype=np.float64)
        )
        for s in range(20)
    ]
    assert min(scaled) > 0.5 * sharp
    assert np.mean(unscaled) < 0.5 * np.mean(scaled)
