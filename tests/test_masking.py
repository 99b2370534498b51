"""iBOT block masks: budgets, rectangles, batch composition, determinism."""

from __future__ import annotations

import numpy as np

from lvd.training.masking import BlockMaskGenerator, sample_masks


def test_block_mask_respects_budget_and_is_made_of_rectangles():
    gen = BlockMaskGenerator((16, 16), min_num_patches=4, max_num_patches=128)
    rng = np.random.default_rng(0)
    counts = []
    for target in [0, 10, 40, 100]:
        for _ in range(20):
            m = gen(target, rng)
            assert m.shape == (16, 16) and m.dtype == bool
            assert m.sum() <= target
            counts.append((target, int(m.sum())))
    assert all(c == 0 for t, c in counts if t == 0)
    # Blocks are added until the budget is (nearly) spent: on average most of the target is masked.
    for target in (40, 100):
        mean = np.mean([c for t, c in counts if t == target])
        assert mean >= 0.75 * target, (target, mean)
    # A single block is a filled rectangle: its bounding box is fully masked.
    one = BlockMaskGenerator((16, 16), min_num_patches=4, max_num_patches=30)
    mask = np.zeros((16, 16), bool)
    added = one._add_block(mask, 30, np.random.default_rng(5))
    rows, cols = np.nonzero(mask)
    assert added == mask.sum() > 0
    box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert box.all() and box.size == mask.sum()  # exactly its bounding box: one filled rectangle


def test_sample_masks_half_the_crops_with_spread_ratios():
    gen = BlockMaskGenerator((8, 8), max_num_patches=32)
    masks = sample_masks(10, gen, np.random.default_rng(1), mask_probability=0.5, ratio_min_max=(0.1, 0.5))
    assert masks.shape == (10, 64) and masks.dtype.is_floating_point is False
    counts = masks.sum(dim=1)
    assert int((counts > 0).sum()) == 5
    assert int(counts.max()) <= int(64 * 0.5)
    # Ratio slices 0.1-0.18, ..., 0.42-0.5: the most masked crop is in the top slice's range.
    assert int(counts.max()) >= int(64 * 0.42) * 0.75
    again = sample_masks(10, gen, np.random.default_rng(1), mask_probability=0.5, ratio_min_max=(0.1, 0.5))
    assert (again == masks).all()
    other = sample_masks(10, gen, np.random.default_rng(2), mask_probability=0.5, ratio_min_max=(0.1, 0.5))
    assert not (other == masks).all()
