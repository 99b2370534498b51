"""Balanced sampling over a cluster hierarchy (Vo et al. 2024): top-down water-filling to an exact
target size, then a seeded random pick inside each leaf cluster.

At every node the budget is split across the children like water poured into vessels: a child
whose capacity is under the equal share is taken whole, and the rest split what remains equally.
A child's capacity is its images times `max_repeats`, so an image repeats only when its cluster is
too small to fill the share it is given. Integer remainders go one unit each to the children with
the most capacity (ties: the smaller cluster id), so the total is exact.
"""

from __future__ import annotations

import numpy as np

from lvd.curation.seeded import LEAF_PICK, keyed_uniform


def water_fill(capacity: np.ndarray, budget: int) -> np.ndarray:
    """Split `budget` across children with these capacities; returns the integer allocation.

    Sums to min(budget, capacity.sum()) and never exceeds a capacity.
    """
    capacity = np.asarray(capacity, dtype=np.int64)
    m = capacity.size
    if budget >= capacity.sum():
        return capacity.copy()
    if budget <= 0:
        return np.zeros(m, dtype=np.int64)
    # Ascending capacity; among equals the larger id first, so the tail is (most capacity, smallest id).
    ids = np.arange(m)
    order = np.lexsort((-ids, capacity))
    cap = capacity[order]
    taken_before = np.r_[0, np.cumsum(cap)[:-1]]
    share = (budget - taken_before) // (m - ids)
    # The first child above its share, and every larger one after it, splits what is left equally.
    p = int(np.argmax(cap > share))  # exists: budget < capacity.sum()
    alloc = np.empty(m, dtype=np.int64)
    alloc[order[:p]] = cap[:p]
    rest = order[p:]
    alloc[rest] = share[p]
    extra = int(budget - taken_before[p] - share[p] * rest.size)
    if extra:
        alloc[rest[-extra:]] += 1
    return alloc


def _group_by(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted order of `keys`, the distinct keys, and each key's [start, end) in that order."""
    order = np.argsort(keys, kind="stable")
    k = keys[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    ends = np.r_[starts[1:], k.size]
    return order, k[starts], np.stack([starts, ends], axis=1)


def balanced_sample(
    labels: np.ndarray,
    target: int,
    *,
    max_repeats: int = 1,
    seed: int = 0,
    ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw `target` samples from points clustered by `labels` (n, levels), finest level first.

    Returns (rows, repeats): the point rows drawn and how many times each is drawn (1..max_repeats),
    with repeats.sum() == min(target, n * max_repeats). ids: the points' ids, which key the pick
    inside each leaf (row numbers when None), so one leaf's pick needs only that leaf's points.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim == 1:
        labels = labels[:, None]
    if max_repeats < 1:
        raise ValueError(f"max_repeats must be >= 1, got {max_repeats}")
    n, levels = labels.shape
    if n == 0 or target <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    size = [np.bincount(labels[:, lv]) for lv in range(levels)]

    # Top level: the root's children are the top clusters that hold points.
    top = np.flatnonzero(size[-1])
    budget = np.zeros(size[-1].size, dtype=np.int64)
    budget[top] = water_fill(size[-1][top] * max_repeats, target)

    for lv in range(levels - 2, -1, -1):
        # Each level-lv cluster has one parent at lv + 1; split each parent's budget over its children.
        children = np.flatnonzero(size[lv])
        parent = np.zeros(size[lv].size, dtype=np.int64)
        parent[labels[:, lv]] = labels[:, lv + 1]
        order, parents, spans = _group_by(parent[children])
        child_budget = np.zeros(size[lv].size, dtype=np.int64)
        for par, (a, b) in zip(parents, spans, strict=True):
            if budget[par]:
                kids = children[order[a:b]]
                child_budget[kids] = water_fill(size[lv][kids] * max_repeats, int(budget[par]))
        budget = child_budget

    # Leaves: every member gets budget // size copies, and a seeded random budget % size of them one more.
    leaf = labels[:, 0]
    ids = np.arange(n) if ids is None else np.asarray(ids, dtype=np.int64)
    order = np.lexsort((ids, keyed_uniform(ids, seed, LEAF_PICK), leaf))
    sorted_leaf = leaf[order]
    rank = np.arange(n) - np.searchsorted(sorted_leaf, sorted_leaf, side="left")
    b, s = budget[sorted_leaf], size[0][sorted_leaf]
    repeats = b // s + (rank < b % s)
    drawn = repeats > 0
    rows = order[drawn]
    by_row = np.argsort(rows)
    return rows[by_row], repeats[drawn][by_row].astype(np.int64)
