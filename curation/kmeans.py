"""k-means with FAISS, and hierarchical k-means with resampling after Vo et al. 2024
("Automatic Data Curation for Self-Supervised Learning: A Clustering-Based Approach").

One k-means = FAISS Lloyd iterations on a random sample capped at `max_points_per_centroid` per
centroid, a last centroid update over that sample with the sums in float64 (FAISS sums in float32),
optionally `lloyd_passes` Lloyd iterations over all points (assignment, float64 sums, update: the
sample's noise is what they remove), then a chunked assignment of every point.

That assignment pass is most of the time at scale (1M x 1000 x 384 is 0.77 TFLOP). On a GPU FAISS does
it; on a CPU with bf16 dot-product instructions (AVX512-BF16, AMX) a bf16 matmul through torch runs
~3.4x the fp32 FLOP/s (measured 470 vs 137 GFLOP/s on this shape), so `assign_dtype="auto"` uses it
there. Only the choice of the nearest centroid is bf16: a near tie may go to the runner-up (0.9% of
rows on random data, objective within 1e-5), and the distance returned is the float32 one to the chosen
centroid.

Hierarchy: level 0 clusters the points; level l clusters the centroids of level l - 1 (unweighted,
which is what spreads the top levels evenly over the data's support). A resampling step re-fits a
level on a balanced subset: the r members nearest each centroid (all of a smaller cluster), k-means
on their union warm-started from the current centroids, float64 means, then reassigns every member.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np
import torch

from lvd.curation.knn import use_gpu
from lvd.curation.seeded import KMEANS_SAMPLE, keyed_uniform
from lvd.embeddings.hardware import cpu_has_native_bf16

log = logging.getLogger("lvd")

ASSIGN_CHUNK = 65_536
BF16_CHUNK = 8_192  # rows per bf16 matmul: a score block that stays in cache for the max
AssignDtype = Literal["auto", "float32", "bfloat16"]
# Upper levels cluster a few centroids: several random inits cost little there and avoid a bad one.
UPPER_LEVEL_REDO = 5


def _flat_index(centroids: np.ndarray, spherical: bool) -> faiss.Index:
    d = centroids.shape[1]
    index = faiss.IndexFlatIP(d) if spherical else faiss.IndexFlatL2(d)
    if use_gpu():
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index


def resolve_assign_dtype(assign_dtype: AssignDtype) -> Literal["float32", "bfloat16"]:
    """auto: bfloat16 on a CPU with native bf16 and no GPU, else float32 (FAISS)."""
    if assign_dtype == "auto":
        return "bfloat16" if not use_gpu() and cpu_has_native_bf16() else "float32"
    if assign_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"assign_dtype must be auto, float32 or bfloat16, got {assign_dtype!r}")
    return assign_dtype


def _assign_bf16(
    x: np.ndarray,
    centroids: np.ndarray,
    spherical: bool,
    labels: np.ndarray,
    dist: np.ndarray,
    chunk_size: int,
) -> None:
    """Nearest centroid by a bf16 matmul (argmax of x.c - |c|^2/2 for L2, the bias as an extra column),
    then the float32 distance to it; at most BF16_CHUNK rows at a time."""
    c = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32))
    weights = c if spherical else torch.cat([c, -0.5 * (c * c).sum(1, keepdim=True)], 1)
    weights = weights.bfloat16().T.contiguous()
    chunk_size = min(chunk_size, BF16_CHUNK)
    d = c.shape[1]
    # Buffers reused by every chunk (allocating and concatenating per chunk cost as much as the
    # matmul): the rows in bf16 with the constant column of the L2 bias, and the float32 products.
    rows_bf16 = torch.ones((min(chunk_size, x.shape[0]), weights.shape[0]), dtype=torch.bfloat16)
    work = torch.empty((rows_bf16.shape[0], d), dtype=torch.float32)
    for start in range(0, x.shape[0], chunk_size):
        xc = torch.from_numpy(np.ascontiguousarray(x[start : start + chunk_size], dtype=np.float32))
        m = xc.shape[0]
        rows_bf16[:m, :d].copy_(xc)
        best = torch.argmax(rows_bf16[:m] @ weights, 1)
        chosen = torch.index_select(c, 0, best)
        if spherical:
            torch.mul(xc, chosen, out=work[:m])
            out = 1.0 - work[:m].sum(1)
        else:
            torch.sub(xc, chosen, out=work[:m])
            out = torch.linalg.vector_norm(work[:m], dim=1).square_()
        labels[start : start + m] = best.numpy()
        dist[start : start + m] = out.numpy()


def kmeans_assign(
    x: np.ndarray,
    centroids: np.ndarray,
    *,
    spherical: bool = True,
    chunk_size: int = ASSIGN_CHUNK,
    assign_dtype: AssignDtype = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (int64) of each row and its distance (float32): 1 - cosine when spherical,
    else squared L2. Searched in chunks of `chunk_size` rows; assign_dtype as in the module docstring."""
    labels = np.empty(x.shape[0], dtype=np.int64)
    dist = np.empty(x.shape[0], dtype=np.float32)
    if resolve_assign_dtype(assign_dtype) == "bfloat16":
        _assign_bf16(x, centroids, spherical, labels, dist, chunk_size)
        return labels, dist
    index = _flat_index(centroids, spherical)
    for start in range(0, x.shape[0], chunk_size):
        s, i = index.search(np.ascontiguousarray(x[start : start + chunk_size], dtype=np.float32), 1)
        labels[start : start + s.shape[0]] = i[:, 0]
        dist[start : start + s.shape[0]] = 1.0 - s[:, 0] if spherical else s[:, 0]
    return labels, dist


def cluster_sums(
    x: np.ndarray, labels: np.ndarray, k: int, *, chunk_size: int = ASSIGN_CHUNK
) -> tuple[np.ndarray, np.ndarray]:
    """Per-label float64 sums (k, d) of the rows of `x` and the label counts (int64): what a worker
    returns for its part of a centroid update (sums of several parts add up).

    Rows are added in row order (torch's CPU index_add_ is sequential), so the sums are repeatable."""
    sums = torch.zeros((k, x.shape[1]), dtype=torch.float64)
    label_t = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    for start in range(0, x.shape[0], chunk_size):
        rows = torch.from_numpy(np.ascontiguousarray(x[start : start + chunk_size])).double()
        sums.index_add_(0, label_t[start : start + chunk_size], rows)
    counts = np.bincount(labels, minlength=k).astype(np.int64)
    return sums.numpy(), counts


def mean_by_label(
    x: np.ndarray, labels: np.ndarray, k: int, *, chunk_size: int = ASSIGN_CHUNK
) -> tuple[np.ndarray, np.ndarray]:
    """Per-label float64 means of the rows of `x` (zeros for empty labels) and the label counts."""
    sums, counts = cluster_sums(x, labels, k, chunk_size=chunk_size)
    means = sums / np.maximum(counts, 1)[:, None]
    return means, counts


def update_from_sums(
    sums: np.ndarray, counts: np.ndarray, previous: np.ndarray, spherical: bool
) -> np.ndarray:
    """Float64 centroid update from per-cluster sums and counts; an empty cluster keeps its previous
    centroid."""
    means = sums / np.maximum(counts, 1)[:, None]
    if spherical:
        means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    means[counts == 0] = previous[counts == 0]
    return means.astype(np.float32)


def _update(x: np.ndarray, labels: np.ndarray, previous: np.ndarray, spherical: bool) -> np.ndarray:
    """Float64 centroid update over the rows of `x`; an empty cluster keeps its previous centroid."""
    return update_from_sums(*cluster_sums(x, labels, previous.shape[0]), previous, spherical)


def assigned_sums(
    x: np.ndarray, centroids: np.ndarray, *, spherical: bool, assign_dtype: AssignDtype
) -> tuple[np.ndarray, np.ndarray]:
    """Half of a Lloyd iteration over the rows of `x`: assign them to `centroids`, then their float64
    per-cluster sums and counts (sums over several row sets add up; `update_from_sums` finishes)."""
    k = centroids.shape[0]
    if x.shape[0] == 0:
        return np.zeros((k, centroids.shape[1])), np.zeros(k, dtype=np.int64)
    labels, _ = kmeans_assign(x, centroids, spherical=spherical, assign_dtype=assign_dtype)
    return cluster_sums(x, labels, k)


def lloyd_refine(
    x: np.ndarray, centroids: np.ndarray, passes: int, *, spherical: bool, assign_dtype: AssignDtype
) -> np.ndarray:
    """`passes` Lloyd iterations over all rows of `x` from `centroids` (float64 updates)."""
    for _ in range(passes):
        sums, counts = assigned_sums(x, centroids, spherical=spherical, assign_dtype=assign_dtype)
        centroids = update_from_sums(sums, counts, centroids, spherical)
    return centroids


@dataclass
class ClusterStats:
    """Per cluster: members, smallest and largest distance to the centroid (inf / -inf when empty)."""

    counts: np.ndarray  # (k,) int64
    min_distance: np.ndarray  # (k,) float64
    max_distance: np.ndarray  # (k,) float64

    @staticmethod
    def merge(parts: list[ClusterStats]) -> ClusterStats:
        return ClusterStats(
            np.sum([p.counts for p in parts], axis=0),
            np.min([p.min_distance for p in parts], axis=0),
            np.max([p.max_distance for p in parts], axis=0),
        )


def cluster_stats(labels: np.ndarray, distance: np.ndarray, k: int) -> ClusterStats:
    """Members of each cluster and the range of their distances: what an assignment pass over a part
    returns (stats of several parts merge with `ClusterStats.merge`)."""
    lo = np.full(k, np.inf)
    hi = np.full(k, -np.inf)
    np.minimum.at(lo, labels, distance.astype(np.float64))
    np.maximum.at(hi, labels, distance.astype(np.float64))
    return ClusterStats(np.bincount(labels, minlength=k).astype(np.int64), lo, hi)


def in_fit_sample(ids: np.ndarray, n: int, k: int, max_points_per_centroid: int, seed: int) -> np.ndarray:
    """Whether each of these points (of `n` in all) is in the fit sample of a k-means over them: all
    points when n <= k * max_points_per_centroid, else those whose id-keyed uniform draw is under
    cap / n. A worker decides for its own points knowing only n."""
    cap = k * max_points_per_centroid
    if n <= cap:
        return np.ones(len(ids), dtype=bool)
    return keyed_uniform(ids, seed, KMEANS_SAMPLE) < cap / n


def fit_sample(ids: np.ndarray, k: int, max_points_per_centroid: int, seed: int) -> np.ndarray | slice:
    """Rows a k-means fit uses: all, or about k * max_points_per_centroid of them (`in_fit_sample`;
    FAISS trims a sample that comes out over the cap)."""
    if len(ids) <= k * max_points_per_centroid:
        return slice(None)
    return np.flatnonzero(in_fit_sample(ids, len(ids), k, max_points_per_centroid, seed))


def fit_centroids(
    sample: np.ndarray,
    k: int,
    *,
    niter: int = 20,
    spherical: bool = True,
    max_points_per_centroid: int = 256,
    seed: int = 0,
    init_centroids: np.ndarray | None = None,
    nredo: int = 1,
) -> np.ndarray:
    """FAISS k-means centroids (k, d) float32 fitted on exactly these rows (the fit sample, drawn)."""
    n, d = sample.shape
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= number of points, got k={k} for {n} points")
    km = faiss.Kmeans(
        d,
        k,
        niter=niter,
        nredo=1 if init_centroids is not None else nredo,
        spherical=spherical,
        max_points_per_centroid=max_points_per_centroid,
        min_points_per_centroid=1,  # small pools: no warning spam, we clamp k ourselves
        seed=seed,
        gpu=use_gpu(),
        verbose=False,
    )
    km.train(
        np.ascontiguousarray(sample, dtype=np.float32),
        init_centroids=None if init_centroids is None else np.ascontiguousarray(init_centroids, np.float32),
    )
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def kmeans_fit(
    x: np.ndarray,
    k: int,
    *,
    niter: int = 20,
    spherical: bool = True,
    max_points_per_centroid: int = 256,
    seed: int = 0,
    init_centroids: np.ndarray | None = None,
    nredo: int = 1,
    ids: np.ndarray | None = None,
) -> np.ndarray:
    """FAISS k-means centroids (k, d) float32, fitted on about k * max_points_per_centroid rows.

    nredo: independent runs from random inits, the best objective kept (ignored with init_centroids).
    ids: the points' ids, which key the fit sample (row numbers when None).
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= number of points, got k={k} for {n} points")
    ids = np.arange(n) if ids is None else ids
    return fit_centroids(
        x[fit_sample(ids, k, max_points_per_centroid, seed)],
        k,
        niter=niter,
        spherical=spherical,
        max_points_per_centroid=max_points_per_centroid,
        seed=seed,
        init_centroids=init_centroids,
        nredo=nredo,
    )


def fit_and_refine(
    sample: np.ndarray,
    k: int,
    *,
    niter: int,
    spherical: bool,
    max_points_per_centroid: int,
    seed: int,
    nredo: int,
    assign_dtype: AssignDtype,
) -> np.ndarray:
    """A k-means's first centroids from its fit sample (rows in id order): the FAISS fit, then a last
    update of the means over that sample in float64. Runs in one place (driver or GPU actor)."""
    centroids = kmeans_fit(
        sample,
        k,
        niter=niter,
        spherical=spherical,
        max_points_per_centroid=max_points_per_centroid,
        seed=seed,
        nredo=nredo,
    )
    sample_labels, _ = kmeans_assign(sample, centroids, spherical=spherical, assign_dtype=assign_dtype)
    return _update(sample, sample_labels, centroids, spherical)


def nearest_per_cluster(n: int, k: int, resample_size: int | None) -> int:
    """Members nearest each centroid that a resampling step re-fits on (default: half the mean
    cluster size, so dense clusters weigh no more than sparse ones)."""
    return resample_size or max(1, n // (2 * k))


@dataclass
class KMeansResult:
    centroids: np.ndarray  # (k, d) float32
    labels: np.ndarray  # (n,) int64
    distance: np.ndarray  # (n,) float32: 1 - cosine (spherical) or squared L2

    @property
    def objective(self) -> float:
        return float(self.distance.astype(np.float64).sum())


def kmeans(
    x: np.ndarray,
    k: int,
    *,
    niter: int = 20,
    spherical: bool = True,
    max_points_per_centroid: int = 256,
    seed: int = 0,
    resampling_steps: int = 0,
    resample_size: int | None = None,
    nredo: int = 1,
    assign_dtype: AssignDtype = "auto",
    ids: np.ndarray | None = None,
    lloyd_passes: int = 0,
) -> KMeansResult:
    """Fit on a capped sample, a float64 mean update over it, assign all rows; then resampling steps.

    resample_size: members nearest each centroid that a resampling step re-fits on
    (default: half the mean cluster size, so dense clusters weigh no more than sparse ones).
    assign_dtype: of the assignment passes (module docstring); the fit itself is FAISS float32.
    ids: the points' ids, which key the fit samples (row numbers when None).
    lloyd_passes: Lloyd iterations over all rows after a fit on a sample (before any resampling step).
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= number of points, got k={k} for {n} points")
    ids = np.arange(n) if ids is None else np.asarray(ids)
    centroids = fit_and_refine(
        x[fit_sample(ids, k, max_points_per_centroid, seed)],
        k,
        niter=niter,
        spherical=spherical,
        max_points_per_centroid=max_points_per_centroid,
        seed=seed,
        nredo=nredo,
        assign_dtype=assign_dtype,
    )
    if n > k * max_points_per_centroid:  # else the fit saw every row already
        centroids = lloyd_refine(x, centroids, lloyd_passes, spherical=spherical, assign_dtype=assign_dtype)
    # Then one pass over every point.
    labels, dist = kmeans_assign(x, centroids, spherical=spherical, assign_dtype=assign_dtype)
    r = nearest_per_cluster(n, k, resample_size)
    for step in range(resampling_steps):
        # The r members nearest each centroid: sort by (cluster, distance), keep the first r per cluster.
        order = np.lexsort((dist, labels))
        lab = labels[order]
        starts = np.searchsorted(lab, lab, side="left")
        subset = np.sort(order[np.arange(n) - starts < r])
        if subset.size < k:  # most clusters empty (degenerate data): nothing to re-balance
            log.warning(
                "k-means: resampling found only %d points for k=%d; stopping after %d steps",
                subset.size,
                k,
                step,
            )
            break
        xs = x[subset]
        centroids = kmeans_fit(
            xs,
            k,
            niter=niter,
            spherical=spherical,
            max_points_per_centroid=max_points_per_centroid,
            seed=seed + 1 + step,
            init_centroids=centroids,
            ids=ids[subset],
        )
        sub_labels, _ = kmeans_assign(xs, centroids, spherical=spherical, assign_dtype=assign_dtype)
        centroids = _update(xs, sub_labels, centroids, spherical)
        labels, dist = kmeans_assign(x, centroids, spherical=spherical, assign_dtype=assign_dtype)
    return KMeansResult(centroids, labels, dist)


@dataclass
class Hierarchy:
    """Hierarchical clustering, finest level first."""

    centroids: list[np.ndarray]  # level l: (k_l, d) float32
    parents: list[np.ndarray]  # level l < L-1: cluster at level l+1 of each level-l cluster (int64)
    labels: np.ndarray  # (n, L) int64: cluster of each point at each level
    distance: np.ndarray  # (n,) float32: to its level-0 centroid

    @property
    def ks(self) -> list[int]:
        return [c.shape[0] for c in self.centroids]

    def sizes(self, level: int) -> np.ndarray:
        """Points under each cluster of `level`."""
        return np.bincount(self.labels[:, level], minlength=self.centroids[level].shape[0])


def clamp_k(level: int, k: int, points: int) -> int:
    """k, or the number of points (or centroids) below the level when there are fewer, with a warning."""
    if k > points:
        log.warning("cluster: level %d asks k=%d but has %d points; using k=%d", level, k, points, points)
        return points
    return k


def cluster_centroids(
    leaf_centroids: np.ndarray,
    upper_levels: list[tuple[int, int]],
    *,
    niter: int = 20,
    spherical: bool = True,
    max_points_per_centroid: int = 256,
    seed: int = 0,
    assign_dtype: AssignDtype = "auto",
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The levels above level 0: level l clusters the centroids of level l - 1 (unweighted).
    Returns every level's centroids (level 0's first) and the parents of levels 0 .. L-2."""
    centroids, parents = [leaf_centroids], []
    for level, (k, steps) in enumerate(upper_levels, start=1):
        points = centroids[-1]
        res = kmeans(
            points,
            clamp_k(level, k, points.shape[0]),
            niter=niter,
            spherical=spherical,
            max_points_per_centroid=max_points_per_centroid,
            seed=seed + 1000 * level,
            resampling_steps=steps,
            nredo=UPPER_LEVEL_REDO,
            assign_dtype=assign_dtype,
        )
        parents.append(res.labels)
        centroids.append(res.centroids)
    return centroids, parents


def level_labels(leaf_labels: np.ndarray, parents: list[np.ndarray]) -> np.ndarray:
    """(n, L) cluster of each point at each level, from its level-0 cluster and the parents."""
    labels = [np.asarray(leaf_labels)]
    for parent in parents:
        labels.append(parent[labels[-1]])
    return np.stack(labels, axis=1)


def hierarchical_kmeans(
    x: np.ndarray,
    levels: list[tuple[int, int]],
    *,
    niter: int = 20,
    spherical: bool = True,
    max_points_per_centroid: int = 256,
    seed: int = 0,
    assign_dtype: AssignDtype = "auto",
    ids: np.ndarray | None = None,
    lloyd_passes: int = 0,
) -> Hierarchy:
    """`levels` = [(k, resampling_steps), ...], finest first, k decreasing. Each k is clamped to the
    number of points (or centroids) below it, with a warning. ids: of the points (level 0), keying
    its fit samples; the upper levels key theirs by centroid number. lloyd_passes: of level 0 (`kmeans`)."""
    if not levels:
        raise ValueError("hierarchical_kmeans needs at least one level")
    if x.shape[0] == 0:
        raise ValueError("hierarchical_kmeans needs at least one point")
    k, steps = levels[0]
    res = kmeans(
        x,
        clamp_k(0, k, x.shape[0]),
        niter=niter,
        spherical=spherical,
        max_points_per_centroid=max_points_per_centroid,
        seed=seed,
        resampling_steps=steps,
        nredo=1,
        assign_dtype=assign_dtype,
        ids=ids,
        lloyd_passes=lloyd_passes,
    )
    centroids, parents = cluster_centroids(
        res.centroids,
        levels[1:],
        niter=niter,
        spherical=spherical,
        max_points_per_centroid=max_points_per_centroid,
        seed=seed,
        assign_dtype=assign_dtype,
    )
    return Hierarchy(centroids, parents, level_labels(res.labels, parents), res.distance)
