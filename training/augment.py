"""DINOv2 multi-crop augmentation with PIL and numpy (no torchvision), reproducible per sample.

Every random choice comes from a numpy Generator handed in by the caller; the trainer seeds it
from (seed, rank, step, index in batch), so a resumed run sees exactly the crops it would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from PIL import ImageEnhance, ImageFilter, ImageOps

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def random_resized_crop(
    img: PIL.Image.Image,
    size: int,
    scale: tuple[float, float],
    rng: np.random.Generator,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> PIL.Image.Image:
    """A crop of random area (fraction `scale` of the image) and aspect, resized (bicubic) to size x size."""
    width, height = img.size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            break
    else:  # fall back to a centre crop of the closest allowed aspect
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, int(round(width / ratio[0]))
        elif in_ratio > ratio[1]:
            h, w = height, int(round(height * ratio[1]))
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    return img.resize((size, size), PIL.Image.BICUBIC, box=(left, top, left + w, top + h))


def _adjust_hue(img: PIL.Image.Image, shift: float) -> PIL.Image.Image:
    hsv = np.array(img.convert("HSV"))
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(round(shift * 255))) % 256
    return PIL.Image.fromarray(hsv, "HSV").convert("RGB")


def color_jitter(
    img: PIL.Image.Image,
    rng: np.random.Generator,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.2,
    hue: float = 0.1,
) -> PIL.Image.Image:
    """Brightness, contrast, saturation and hue changes in a random order (as torchvision's ColorJitter)."""
    for op in rng.permutation(4):
        if op == 0:
            img = ImageEnhance.Brightness(img).enhance(rng.uniform(1 - brightness, 1 + brightness))
        elif op == 1:
            img = ImageEnhance.Contrast(img).enhance(rng.uniform(1 - contrast, 1 + contrast))
        elif op == 2:
            img = ImageEnhance.Color(img).enhance(rng.uniform(1 - saturation, 1 + saturation))
        else:
            img = _adjust_hue(img, rng.uniform(-hue, hue))
    return img


BLUR_SIGMA = (0.1, 2.0)  # pixels, at the recipe's crop sizes (MultiCropConfig's defaults)


def gaussian_blur(img: PIL.Image.Image, rng: np.random.Generator, scale: float = 1.0) -> PIL.Image.Image:
    """Blur with sigma drawn from BLUR_SIGMA x `scale` (the crop's size over the recipe's size)."""
    return img.filter(ImageFilter.GaussianBlur(radius=scale * rng.uniform(*BLUR_SIGMA)))


def to_normalized_array(img: PIL.Image.Image) -> np.ndarray:
    """HWC uint8 -> CHW float32 normalised with the ImageNet mean and std."""
    x = np.asarray(img, dtype=np.float32) / 255.0
    return ((x - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)


@dataclass(frozen=True)
class MultiCropConfig:
    global_crops_size: int = 224
    local_crops_size: int = 98
    global_crops_scale: tuple[float, float] = (0.32, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.32)
    local_crops_number: int = 8


class MultiCrop:
    """Two global crops and `local_crops_number` local crops of one image (DINOv2's DataAugmentationDINO)."""

    def __init__(self, cfg: MultiCropConfig) -> None:
        self.cfg = cfg
        # The recipe's blur is in pixels of 224/98 px crops. Smaller crops get a proportionally smaller
        # blur: at 56 px an unscaled sigma of 2 px wipes out the fine patterns (stripes 3 px apart) and
        # training then taught invariance to exactly what tells the generated classes apart.
        ref = MultiCropConfig()
        self.global_blur = cfg.global_crops_size / ref.global_crops_size
        self.local_blur = cfg.local_crops_size / ref.local_crops_size

    def _flip_and_colour(self, img: PIL.Image.Image, rng: np.random.Generator) -> PIL.Image.Image:
        if rng.random() < 0.5:
            img = img.transpose(PIL.Image.FLIP_LEFT_RIGHT)
        if rng.random() < 0.8:
            img = color_jitter(img, rng)
        if rng.random() < 0.2:
            img = img.convert("L").convert("RGB")
        return img

    def __call__(
        self, img: PIL.Image.Image, rng: np.random.Generator
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        cfg = self.cfg
        if img.mode != "RGB":
            img = img.convert("RGB")
        globals_ = []
        for i in range(2):
            crop = random_resized_crop(img, cfg.global_crops_size, cfg.global_crops_scale, rng)
            crop = self._flip_and_colour(crop, rng)
            if i == 0:
                crop = gaussian_blur(crop, rng, self.global_blur)  # p = 1.0
            else:
                if rng.random() < 0.1:
                    crop = gaussian_blur(crop, rng, self.global_blur)
                if rng.random() < 0.2:
                    crop = ImageOps.solarize(crop, threshold=128)
            globals_.append(to_normalized_array(crop))
        locals_ = []
        for _ in range(cfg.local_crops_number):
            crop = random_resized_crop(img, cfg.local_crops_size, cfg.local_crops_scale, rng)
            crop = self._flip_and_colour(crop, rng)
            if rng.random() < 0.5:
                crop = gaussian_blur(crop, rng, self.local_blur)
            locals_.append(to_normalized_array(crop))
        return globals_, locals_


def sample_rng(seed: int, rank: int, step: int, index: int) -> np.random.Generator:
    """The generator of one sample's augmentation: a function of where it is, not of what ran before."""
    return np.random.default_rng([seed, rank, step, index])


def augment_batch(
    images: Sequence[PIL.Image.Image],
    multicrop: MultiCrop,
    *,
    seed: int,
    rank: int,
    step: int,
    pool: ThreadPoolExecutor | None = None,
) -> dict[str, torch.Tensor]:
    """Crops of a batch, view-major: global_crops [2B,3,G,G] (all first crops, then all second
    crops) and local_crops [L*B,3,l,l]. PIL releases the GIL, so a thread pool runs samples in parallel."""

    def one(i: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        return multicrop(images[i], sample_rng(seed, rank, step, i))

    results = (
        list(pool.map(one, range(len(images)))) if pool is not None else [one(i) for i in range(len(images))]
    )
    n_local = multicrop.cfg.local_crops_number
    global_crops = np.stack([r[0][v] for v in range(2) for r in results])
    out = {"global_crops": torch.from_numpy(global_crops)}
    if n_local:
        out["local_crops"] = torch.from_numpy(np.stack([r[1][v] for v in range(n_local) for r in results]))
    return out
