"""Balanced sampling over a cluster hierarchy (Vo et al. 2024): top-down water-filling to an exact
target size, then a seeded random pick inside each leaf cluster.

At every node the budget is split across the children like water poured into vessels: a child
whose capacity is under the equal share is taken whole, and the rest split what remains equally.
A child's capacity is its images times `max_repeats`, so an image repeats only when its cluster is
too small to fill the share it is given. Integer remainders go one unit each to the children with
the most capacity (ties: the smaller cluster id), so the total is exact.

Over parts: `ClusterTree.of_labels` per part (cluster sizes and parents, merged), `leaf_budgets` on
the driver (it grows with clusters), the `budget % size` extra picks per leaf as cutoffs of the
keyed draw (`leaf_pick_keys`, chosen with `lvd.curation.selection`), then `leaf_repeats` per part.
`balanced_sample` is the same on one table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lvd.curation.seeded import LEAF_PICK, keyed_uniform
from lvd.curation.selection import Cutoffs


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


@dataclass
class ClusterTree:
    """The hierarchy as the sampler needs it: points under each cluster of each level, and each
    cluster's parent at the next level (-1 for clusters without points)."""

    sizes: list[np.ndarray]  # level l: (k_l,) int64
    parents: list[np.ndarray]  # level l < L-1: (k_l,) int64

    @staticmethod
    def of_labels(labels: np.ndarray) -> ClusterTree:
        """The tree of some points (a part's), labels (n, L) finest level first."""
        labels = np.asarray(labels, dtype=np.int64)
        if labels.ndim == 1:
            labels = labels[:, None]
        sizes = [np.bincount(labels[:, lv]) for lv in range(labels.shape[1])]
        parents = []
        for lv in range(labels.shape[1] - 1):
            parent = np.full(sizes[lv].size, -1, dtype=np.int64)
            parent[labels[:, lv]] = labels[:, lv + 1]
            parents.append(parent)
        return ClusterTree(sizes, parents)

    @staticmethod
    def merge(a: ClusterTree, b: ClusterTree) -> ClusterTree:
        def pad(x: np.ndarray, n: int, fill: int) -> np.ndarray:
            return np.concatenate([x, np.full(n - x.size, fill, dtype=x.dtype)])

        if len(a.sizes) != len(b.sizes):
            raise ValueError(f"cluster labels with {len(a.sizes)} and {len(b.sizes)} levels")
        sizes, parents = [], []
        for lv, (x, y) in enumerate(zip(a.sizes, b.sizes, strict=True)):
            n = max(x.size, y.size)
            sizes.append(pad(x, n, 0) + pad(y, n, 0))
            if lv < len(a.parents):
                pa_, pb = pad(a.parents[lv], n, -1), pad(b.parents[lv], n, -1)
                if np.any((pa_ >= 0) & (pb >= 0) & (pa_ != pb)):
                    raise ValueError(f"a level-{lv} cluster has two parents")
                parents.append(np.maximum(pa_, pb))
        return ClusterTree(sizes, parents)


def leaf_budgets(tree: ClusterTree, target: int, max_repeats: int) -> np.ndarray:
    """Samples each leaf (level-0 cluster) gets: top-down water-filling of `target` over the tree."""
    size = tree.sizes
    # Top level: the root's children are the top clusters that hold points.
    top = np.flatnonzero(size[-1])
    budget = np.zeros(size[-1].size, dtype=np.int64)
    budget[top] = water_fill(size[-1][top] * max_repeats, target)
    for lv in range(len(size) - 2, -1, -1):
        # Each level-lv cluster has one parent at lv + 1; split each parent's budget over its children.
        children = np.flatnonzero(size[lv])
        order, parents, spans = _group_by(tree.parents[lv][children])
        child_budget = np.zeros(size[lv].size, dtype=np.int64)
        for par, (a, b) in zip(parents, spans, strict=True):
            if budget[par]:
                kids = children[order[a:b]]
                child_budget[kids] = water_fill(size[lv][kids] * max_repeats, int(budget[par]))
        budget = child_budget
    return budget


def leaf_pick_keys(ids: np.ndarray, seed: int) -> np.ndarray:
    """The keyed draw that orders a leaf's members for its extra picks (smallest first, ties by id)."""
    return keyed_uniform(np.asarray(ids, dtype=np.int64), seed, LEAF_PICK)


def extra_picks(budget: np.ndarray, leaf_sizes: np.ndarray) -> np.ndarray:
    """Members of each leaf that get one copy more than budget // size: budget % size."""
    return np.where(leaf_sizes > 0, budget % np.maximum(leaf_sizes, 1), 0)


def leaf_repeats(
    leaf: np.ndarray,
    ids: np.ndarray,
    budget: np.ndarray,
    leaf_sizes: np.ndarray,
    extra: Cutoffs,
    seed: int,
) -> np.ndarray:
    """Copies of each point (of any part): budget // size of its leaf, plus one for the points within
    their leaf's `extra` cutoff (the budget % size smallest keyed draws of the leaf)."""
    leaf = np.asarray(leaf, dtype=np.int64)
    base = budget[leaf] // np.maximum(leaf_sizes[leaf], 1)
    return base + extra.members(leaf, leaf_pick_keys(ids, seed), ids)


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
    n = labels.shape[0]
    if n == 0 or target <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    tree = ClusterTree.of_labels(labels)
    budget = leaf_budgets(tree, target, max_repeats)

    # Leaves: every member gets budget // size copies, and a seeded random budget % size of them one more.
    leaf = labels[:, 0]
    ids = np.arange(n) if ids is None else np.asarray(ids, dtype=np.int64)
    order = np.lexsort((ids, leaf_pick_keys(ids, seed), leaf))
    sorted_leaf = leaf[order]
    rank = np.arange(n) - np.searchsorted(sorted_leaf, sorted_leaf, side="left")
    b, s = budget[sorted_leaf], tree.sizes[0][sorted_leaf]
    repeats = b // s + (rank < b % s)
    drawn = repeats > 0
    rows = order[drawn]
    by_row = np.argsort(rows)
    return rows[by_row], repeats[drawn][by_row].astype(np.int64)
