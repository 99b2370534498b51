"""Seeded randomness keyed by image id: the same draw for an image wherever it is computed.

A random stream over "all rows" (numpy's `rng.random(n)`, `rng.permutation(n)`) depends on how many
rows there are and in which order they come, so only a process that holds every row can draw it.
Keyed draws (SplitMix64 of the id, the seed and a stream number) are the same for an image in any
worker, any part and any order: what lets workers sample, rank and pick without a central table.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def keyed_bits(ids: np.ndarray, seed: int, stream: int) -> np.ndarray:
    """64 random bits (uint64) per id, a pure function of (id, seed, stream)."""
    with np.errstate(over="ignore"):
        salt = _splitmix64(np.array([(seed & 0xFFFFFFFF) << 32 | (stream & 0xFFFFFFFF)], dtype=np.uint64))[0]
        return _splitmix64(np.asarray(ids).astype(np.int64).view(np.uint64) ^ salt)


def keyed_uniform(ids: np.ndarray, seed: int, stream: int) -> np.ndarray:
    """A uniform float64 in [0, 1) per id, a pure function of (id, seed, stream)."""
    return (keyed_bits(ids, seed, stream) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# Streams: one per use, so that draws for different purposes are independent.
KMEANS_SAMPLE = 1
LEAF_PICK = 2
SHARD_ORDER = 3
KNN_TRAIN_SAMPLE = 4  # the vectors an IVF index is trained on
KNN_RECALL_SAMPLE = 5  # the queries of the IVF recall check
ABLATE_SAMPLE = 6  # the images an `lvd ablate` arm samples from its pool
