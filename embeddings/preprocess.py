"""Evaluation preprocessing as in DINOv2: decode, EXIF orientation, any mode to RGB, resize the shorter
side (bicubic), centre crop, ImageNet mean/std.

Split in two so the expensive, image-sized part (decode + resize + crop, uint8 HWC) can run in CPU
tasks while the cheap normalisation runs batched next to the model: `prepare_image` then `normalize`.
`preprocess_image` chains both for one image.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageDecodeError(ValueError):
    """Bytes that are not a readable image; the message says why."""


@dataclass(frozen=True)
class PreprocessConfig:
    resize_size: int = 256  # shorter side after resizing
    image_size: int = 224  # centre crop side
    patch_size: int = 14
    # Resize the whole image to crop_size x crop_size instead (no crop): a copy detector must see all
    # of the picture, since padding or a change of aspect ratio would move a centre crop over it.
    whole: bool = False

    @property
    def crop_size(self) -> int:
        """The crop side, cut down to a multiple of the patch size (the model needs whole patches)."""
        side = self.image_size // self.patch_size * self.patch_size
        if side == 0:
            raise ValueError(f"image_size {self.image_size} is smaller than one patch ({self.patch_size})")
        return side

    def __post_init__(self) -> None:
        if self.resize_size < self.image_size:
            raise ValueError(f"resize_size ({self.resize_size}) must be >= image_size ({self.image_size})")


def decode_image(data: bytes) -> Image.Image:
    """Decode fully (so truncated files fail here, not later) and apply the EXIF orientation."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad bytes
        raise ImageDecodeError(f"cannot decode image: {type(err).__name__}: {err}") from err
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a corrupt EXIF block should not cost the image
        pass
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited on white, 16/32-bit values scaled to 8 bit."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBa", "La"):  # premultiplied alpha
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA") or (mode in ("L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img).astype(np.float64)
        if mode == "F" and arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0  # float images in [0, 1]
        elif mode != "F" and (mode.startswith("I;16") or (arr.size and arr.max() > 255)):
            arr = arr / 257.0  # 16-bit range 0..65535 -> 0..255
        arr = np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def resize_center_crop(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """Shorter side to cfg.resize_size (bicubic), centre crop cfg.crop_size: uint8 [S, S, 3]; with
    cfg.whole, the whole image resized to S x S."""
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageDecodeError(f"empty image ({w}x{h})")
    if cfg.whole:
        s = cfg.crop_size
        return np.array(img.resize((s, s), Image.Resampling.BICUBIC), dtype=np.uint8)
    # Same rounding as torchvision's Resize(int): the longer side is truncated.
    if w <= h:
        nw, nh = cfg.resize_size, int(cfg.resize_size * h / w)
    else:
        nw, nh = int(cfg.resize_size * w / h), cfg.resize_size
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    s = cfg.crop_size
    top, left = int(round((nh - s) / 2.0)), int(round((nw - s) / 2.0))
    img = img.crop((left, top, left + s, top + s))
    return np.array(img, dtype=np.uint8)  # a writable copy (torch warns on read-only arrays)


def prepare_image(data: bytes, cfg: PreprocessConfig) -> np.ndarray:
    """Encoded bytes -> resized, centre-cropped uint8 RGB [S, S, 3]; raises ImageDecodeError."""
    try:
        return resize_center_crop(to_rgb(decode_image(data)), cfg)
    except ImageDecodeError:
        raise
    except Exception as err:  # noqa: BLE001 - odd modes / corrupt data inside PIL
        raise ImageDecodeError(f"cannot preprocess image: {type(err).__name__}: {err}") from err


def normalize(batch: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [B, S, S, 3] (or [S, S, 3]) -> float32 [B, 3, S, S] with ImageNet mean/std, on the input's device."""
    import torch  # here, so decode tasks (which never normalise) do not pay for importing torch

    x = torch.as_tensor(batch)
    if x.ndim == 3:
        x = x[None]
    # Runs on x's device: uint8 crops cross to the GPU at a quarter of the float32 size.
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device) * 255.0
    inv_std = 1.0 / (torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device) * 255.0)
    x = (x.to(torch.float32) - mean) * inv_std
    return x.permute(0, 3, 1, 2).contiguous()


def preprocess_image(data: bytes, cfg: PreprocessConfig | None = None) -> np.ndarray:
    """Encoded bytes -> float32 [3, S, S], the model's input for one image."""
    cfg = cfg or PreprocessConfig()
    return normalize(prepare_image(data, cfg))[0].numpy()
