"""Evaluation preprocessing: sizes, normalisation, EXIF orientation, and every odd image mode to RGB."""

import io

import numpy as np
import pytest
from PIL import Image

from lvd.embeddings.preprocess import (
    ImageDecodeError,
    PreprocessConfig,
    decode_image,
    normalize,
    prepare_image,
    preprocess_image,
    to_rgb,
)

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_resize_crop_and_normalise_match_the_formula():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)  # H=200, W=300
    out = preprocess_image(_encode(Image.fromarray(arr)), PreprocessConfig(resize_size=64, image_size=56))
    # Reference: shorter side 200 -> 64, so 300 -> int(64 * 300 / 200) = 96; crop 56 at (4, 20).
    resized = np.asarray(Image.fromarray(arr).resize((96, 64), Image.Resampling.BICUBIC), dtype=np.float64)
    crop = resized[4:60, 20:76]
    ref = ((crop / 255.0 - MEAN) / STD).transpose(2, 0, 1)
    assert out.dtype == np.float32 and out.shape == (3, 56, 56)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_whole_resizes_the_full_picture_without_a_crop():
    arr = np.zeros((100, 400, 3), dtype=np.uint8)  # a wide picture with red left and blue right ends
    arr[:, :40, 0] = 255
    arr[:, -40:, 2] = 255
    data = _encode(Image.fromarray(arr))
    whole = prepare_image(data, PreprocessConfig(resize_size=32, image_size=32, patch_size=1, whole=True))
    assert whole.shape == (32, 32, 3)
    assert whole[16, 0, 0] > 200 and whole[16, -1, 2] > 200  # both ends are seen
    crop = prepare_image(data, PreprocessConfig(resize_size=32, image_size=32, patch_size=1))
    assert crop[:, :, 0].max() < 50 and crop[:, :, 2].max() < 50  # a centre crop loses them


def test_default_sizes_are_dinov2_evaluation_sizes():
    img = Image.new("RGB", (640, 480), (10, 200, 30))
    out = preprocess_image(_encode(img))
    assert out.shape == (3, 224, 224)
    np.testing.assert_allclose(out[:, 100, 100], (np.array([10, 200, 30]) / 255 - MEAN) / STD, atol=1e-5)


def test_crop_is_cut_down_to_a_multiple_of_the_patch():
    cfg = PreprocessConfig(resize_size=240, image_size=230, patch_size=14)
    assert cfg.crop_size == 224
    assert prepare_image(_encode(Image.new("RGB", (300, 250))), cfg).shape == (224, 224, 3)
    with pytest.raises(ValueError, match="resize_size"):
        PreprocessConfig(resize_size=100, image_size=224)


def test_normalize_is_batched_and_channels_first():
    crops = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    x = normalize(crops).numpy()
    assert x.shape == (3, 3, 8, 8)
    ref = ((crops / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(x, ref, atol=1e-5)


def test_exif_orientation_is_applied():
    arr = np.zeros((20, 40, 3), np.uint8)  # stored landscape: left half red, right half blue
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img = decode_image(_encode(Image.fromarray(arr), "PNG", exif=exif))
    shown = np.asarray(img.convert("RGB"))
    np.testing.assert_array_equal(shown, np.rot90(arr, k=-1))  # clockwise: red ends on top
    assert img.size == (20, 40)


def test_grayscale_and_bilevel_become_grey_rgb():
    g = to_rgb(Image.fromarray(np.full((4, 4), 77, np.uint8), "L"))
    assert g.mode == "RGB" and np.asarray(g)[0, 0].tolist() == [77, 77, 77]
    b = to_rgb(Image.new("1", (4, 4), 1))
    assert np.asarray(b)[0, 0].tolist() == [255, 255, 255]


def test_transparency_is_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # red-ish
    rgba[0, 0, 3] = 0  # fully transparent -> white
    rgba[0, 1, 3] = 255  # opaque -> its colour
    rgba[0, 2, 3] = 128  # half -> halfway to white
    out = np.asarray(to_rgb(decode_image(_encode(Image.fromarray(rgba, "RGBA")))), dtype=int)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [200, 0, 0]
    expected = np.round(np.array([200, 0, 0]) * 128 / 255 + 255 * (1 - 128 / 255))
    assert np.abs(out[0, 2] - expected).max() <= 1

    la = np.stack([np.full((2, 2), 50, np.uint8), np.array([[0, 255], [255, 255]], np.uint8)], axis=-1)
    out = np.asarray(to_rgb(decode_image(_encode(Image.fromarray(la, "LA")))))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [50, 50, 50]


def test_palette_with_transparency():
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    img = decode_image(_encode(p, "PNG", transparency=0))
    out = np.asarray(to_rgb(img))
    assert out[0, 0].tolist() == [255, 255, 255]  # transparent index -> white
    assert out[0, 1].tolist() == [10, 20, 30]
    p2 = decode_image(_encode(p, "GIF"))
    assert to_rgb(p2).mode == "RGB"


def test_cmyk_converts_by_the_subtractive_formula():
    cmyk = Image.new("CMYK", (2, 2), (255, 0, 0, 0))  # pure cyan
    out = np.asarray(to_rgb(decode_image(_encode(cmyk, "JPEG", quality=100))), dtype=int)
    assert np.abs(out[0, 0] - np.array([0, 255, 255])).max() <= 3
    k = Image.new("CMYK", (1, 1), (0, 0, 0, 255))
    assert np.asarray(to_rgb(k))[0, 0].tolist() == [0, 0, 0]


def test_sixteen_bit_images_are_scaled_to_eight_bit():
    arr16 = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    img = decode_image(_encode(Image.fromarray(arr16)))  # 16-bit greyscale PNG
    assert img.mode.startswith("I")
    out = np.asarray(to_rgb(img))
    assert out[0, :, 0].tolist() == [0, 100, 255] and (out[..., 0] == out[..., 2]).all()
    i32 = Image.fromarray(np.array([[3, 200]], dtype=np.int32), "I")  # 8-bit values stored in mode I
    assert np.asarray(to_rgb(i32))[0, :, 1].tolist() == [3, 200]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    assert np.asarray(to_rgb(f))[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("data", [b"", b"not an image", _encode(Image.new("RGB", (64, 64)), "JPEG")[:200]])
def test_undecodable_bytes_raise_a_clear_error(data):
    with pytest.raises(ImageDecodeError, match="cannot decode image"):
        prepare_image(data, PreprocessConfig())
