"""Connected components of a graph given as edge arrays, vectorised with numpy.

Union-find by "hook and compress": every round, each edge whose two endpoints have different
roots hooks the larger root under the smaller one (np.minimum.at), then every node jumps straight
to its root. Pointers only ever go down (parent[x] <= x), so the forest never has a cycle and the
root of each component is its smallest node. Rounds are few (logarithmic in practice) and each is a
handful of array operations over the still-unresolved edges, so 100M edges need no Python loop per
edge.
"""

from __future__ import annotations

import numpy as np


def _compress(parent: np.ndarray) -> np.ndarray:
    """Point every node at its root (pointer jumping until nothing changes)."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand


def connected_components(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Component label of each of `n` nodes: the smallest node index in its component.

    `src`/`dst` are the endpoints of undirected edges (any integer dtype, self-loops allowed).
    """
    src = np.asarray(src, dtype=np.int64).ravel()
    dst = np.asarray(dst, dtype=np.int64).ravel()
    if src.shape != dst.shape:
        raise ValueError(f"src and dst differ in length: {src.size} vs {dst.size}")
    if src.size and (min(src.min(), dst.min()) < 0 or max(src.max(), dst.max()) >= n):
        raise ValueError(f"edge endpoints must lie in [0, {n})")
    parent = np.arange(n, dtype=np.int64)
    while src.size:
        ra, rb = parent[src], parent[dst]
        open_ = ra != rb
        if not open_.any():
            break
        src, dst, ra, rb = src[open_], dst[open_], ra[open_], rb[open_]
        lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
        # hi is a root (parent was fully compressed), so this only re-points roots, always downwards.
        np.minimum.at(parent, hi, lo)
        parent = _compress(parent)
    return parent


def component_sizes(labels: np.ndarray) -> np.ndarray:
    """Size of the component of each node."""
    counts = np.bincount(labels, minlength=labels.size)
    return counts[labels]
