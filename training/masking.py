"""iBOT block masking: rectangles of patches, random aspect, on about half of the global crops."""

from __future__ import annotations

import math

import numpy as np
import torch


class BlockMaskGenerator:
    """Masks of a (height, width) patch grid made of random rectangles (BEiT-style block masking)."""

    def __init__(
        self,
        grid: tuple[int, int],
        min_num_patches: int = 4,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        self.height, self.width = grid
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = max_num_patches if max_num_patches is not None else int(0.5 * self.num_patches)
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def _add_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        """Mask one rectangle adding at most `budget` new patches; returns how many were added."""
        for _ in range(10):
            area = rng.uniform(self.min_num_patches, max(budget, self.min_num_patches))
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if 0 < h < self.height and 0 < w < self.width:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                block = mask[top : top + h, left : left + w]
                added = h * w - int(block.sum())
                if 0 < added <= budget:
                    block[:] = True
                    return added
        return 0

    def __call__(self, num_masking_patches: int, rng: np.random.Generator) -> np.ndarray:
        """A bool [height, width] mask with at most `num_masking_patches` patches set."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            added = self._add_block(mask, min(num_masking_patches - count, self.max_num_patches), rng)
            if added == 0:
                break
            count += added
        return mask


def sample_masks(
    n_crops: int,
    generator: BlockMaskGenerator,
    rng: np.random.Generator,
    mask_probability: float = 0.5,
    ratio_min_max: tuple[float, float] = (0.1, 0.5),
) -> torch.Tensor:
    """Bool [n_crops, N] masks: int(n_crops * p) crops masked, their ratios spread evenly over the
    range (crop i draws from the i-th slice, as in DINOv2), the rest unmasked, in random order."""
    n = generator.num_patches
    n_masked = int(n_crops * mask_probability)
    bounds = np.linspace(ratio_min_max[0], ratio_min_max[1], n_masked + 1)
    masks = [generator(int(n * rng.uniform(bounds[i], bounds[i + 1])), rng).ravel() for i in range(n_masked)]
    masks += [np.zeros(n, dtype=bool)] * (n_crops - n_masked)
    order = rng.permutation(n_crops)
    return torch.from_numpy(np.stack([masks[i] for i in order]))
