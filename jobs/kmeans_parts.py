"""k-means over vector parts: workers read the parts and write label parts, the driver fits on a
capped sample and keeps per-cluster results only. Equal to `curation.kmeans.kmeans` /
`hierarchical_kmeans` on the same points (see the tests), pass by pass:

  count      each part's kept points (n: the fit sample's draw needs it)
  sample     each worker returns its points with keyed draw < cap / n (`in_fit_sample`); the driver
             sorts them by image_id and fits (FAISS, then the float64 mean update over the sample)
             on itself or on a GPU worker: at most about k * max_points_per_centroid rows
  lloyd      (lloyd_passes times, when the fit saw only a sample) per-cluster float64 sums of
             every point under the current centroids (parts grouped per task, folded in part
             order) -> the mean update
  assign     each worker assigns its points to the centroids, writes a label part (image_id,
             label, distance) and returns per-cluster counts and distance ranges
  resampling steps, each:
    nearest  the r members nearest each centroid: per-cluster cutoffs by `select_smallest` over
             the label parts (histograms, then only the boundary rows)
    sample   the subset's fit sample, drawn as above with n = the subset's size; fit warm-started
    sums     per-cluster float64 sums of the subset under the new centroids (parts grouped per
             task, folded in part order) -> the mean update
    assign   as above
Upper levels cluster centroids, on the driver (`curation.kmeans.cluster_centroids`).

The bf16 assignment gives a row the same label and distance whatever rows share its chunk, so
the label parts equal the whole-table assignment exactly. FAISS's float32 search can differ in the
last bit of a distance with the chunk's size (and with the thread count), as it already did in one
process; a part is always searched in the same chunks, so a run is repeatable.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lvd.curation.cluster_labels import read_labels, write_labels
from lvd.curation.kmeans import (
    AssignDtype,
    ClusterStats,
    assigned_sums,
    clamp_k,
    cluster_centroids,
    cluster_stats,
    fit_and_refine,
    fit_centroids,
    in_fit_sample,
    kmeans_assign,
    nearest_per_cluster,
    resolve_assign_dtype,
    update_from_sums,
)
from lvd.curation.knn_sharded import VectorPart, count_vector_part, read_vector_part
from lvd.curation.selection import Cutoffs
from lvd.jobs.selection import select_smallest
from lvd.jobs.workers import Fanout, RayFanout
from lvd.schemas.layout import part_index, part_path

log = logging.getLogger("lvd")

# Parts per task of the sums pass: k x d float64 per result, so few results, in a fixed grouping
# (the sums fold in the same order whatever the cluster's size).
SUM_TASKS = 64
RESULTS_BYTES = 1 << 30  # per-cluster results the driver may hold at once while folding


@dataclass
class PartsKMeans:
    """A k-means over parts: its centroids, per-cluster sizes and distance ranges, and one label
    part per vector part."""

    centroids: np.ndarray  # (k, d) float32
    stats: ClusterStats  # of the last assignment pass: counts, min and max distance per cluster
    label_parts: list[Path]  # image_id, label, distance of each kept point, in vector-part order
    images: int

    @property
    def sizes(self) -> np.ndarray:
        return self.stats.counts


@dataclass
class PartsHierarchy:
    """Hierarchical k-means over parts (finest level first); the points' labels are in label parts."""

    centroids: list[np.ndarray]
    parents: list[np.ndarray]
    sizes: list[np.ndarray]
    label_parts: list[Path]
    images: int

    @property
    def ks(self) -> list[int]:
        return [c.shape[0] for c in self.centroids]


# ---------------------------------------------------------------- tasks (one part, or a few)


def _lines_up(part: VectorPart) -> bool:
    """For a part that reads one dedup part (the one of its own number): True when that dedup part
    holds only images of this embed part, so the dedup rows of its images can be nowhere else when
    that holds for every part. Parts that read every dedup part need no check."""
    if not isinstance(part.rows, Path):
        return True
    embedded = pq.read_table(part.vectors, columns=["image_id"])["image_id"].to_numpy()
    deduped = pq.read_table(part.rows, columns=["image_id"])["image_id"].to_numpy()
    return bool(np.isin(deduped, embedded).all())


def _count_task(part: VectorPart) -> tuple[int, bool]:
    return count_vector_part(part), _lines_up(part)


def _subset(part: VectorPart, label_path: Path, cutoffs: Cutoffs | None):
    """The part's points (ids, vectors), restricted to those at or under their cluster's cutoff."""
    ids, x = read_vector_part(part)
    if cutoffs is None:
        return ids, x
    label_ids, labels, dist = read_labels(label_path)
    if not np.array_equal(label_ids, ids):
        raise RuntimeError(f"label part {label_path} does not match vector part {part.vectors}")
    keep = cutoffs.members(labels, dist, ids)
    return ids[keep], x[keep]


def _sample_task(
    item: tuple[VectorPart, Path],
    *,
    n: int,
    k: int,
    max_points_per_centroid: int,
    seed: int,
    cutoffs: Cutoffs | None,
) -> tuple[np.ndarray, np.ndarray]:
    ids, x = _subset(*item, cutoffs)
    take = in_fit_sample(ids, n, k, max_points_per_centroid, seed)
    return ids[take], x[take]


def _assign_task(
    item: tuple[VectorPart, Path], *, centroids: np.ndarray, spherical: bool, assign_dtype: AssignDtype
) -> ClusterStats:
    part, label_path = item
    ids, x = read_vector_part(part)
    k = centroids.shape[0]
    if ids.size == 0:
        labels, dist = np.zeros(0, np.int64), np.zeros(0, np.float32)
    else:
        labels, dist = kmeans_assign(x, centroids, spherical=spherical, assign_dtype=assign_dtype)
    write_labels(label_path, ids, labels, dist)
    return cluster_stats(labels, dist, k)


def _sums_task(
    items: list[tuple[VectorPart, Path | None]],
    *,
    cutoffs: Cutoffs | None,
    centroids: np.ndarray,
    spherical: bool,
    assign_dtype: AssignDtype,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums and counts of the parts' points (all, or those under `cutoffs`) assigned
    to `centroids`, folded in part order."""
    k = centroids.shape[0]
    sums, counts = np.zeros((k, centroids.shape[1])), np.zeros(k, dtype=np.int64)
    for part, label_path in items:
        _, x = _subset(part, label_path, cutoffs)
        s, c = assigned_sums(x, centroids, spherical=spherical, assign_dtype=assign_dtype)
        sums += s
        counts += c
    return sums, counts


def _add_sums(a, b):
    return a[0] + b[0], a[1] + b[1]


def _merge_stats(a: ClusterStats, b: ClusterStats) -> ClusterStats:
    return ClusterStats.merge([a, b])


def _window(result_bytes: int) -> int:
    """Results of `result_bytes` each that a fold may have in flight."""
    return max(2, RESULTS_BYTES // max(1, result_bytes))


def label_rows(label_path: Path | str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cluster, distance, image_id) of a label part: the rows `select_smallest` reads."""
    ids, labels, dist = read_labels(label_path)
    return labels, dist, ids


def clusters_rows(clusters_part: Path | str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(level-0 cluster, distance, image_id) of a CLUSTERS part, as `label_rows` for label parts."""
    t = pq.read_table(clusters_part, columns=["image_id", "cluster_ids", "distance"])
    leaf = (
        pc.list_element(t["cluster_ids"], 0).to_numpy().astype(np.int64)
        if t.num_rows
        else np.zeros(0, np.int64)
    )
    return leaf, t["distance"].to_numpy(), t["image_id"].to_numpy()


def _stats_task(item, *, load, k: int) -> ClusterStats:
    labels, dist, _ = load(item)
    return cluster_stats(labels, dist, k)


def cluster_ranges(items: list, load, k: int, *, fanout: Fanout | None = None) -> ClusterStats:
    """Per-cluster counts and distance ranges over parts read by `load` (`label_rows`,
    `clusters_rows`): the sizes and key ranges `select_smallest` starts from."""
    fanout = fanout or RayFanout()
    stats = fanout.fold(
        _stats_task, items, _merge_stats, name="cluster sizes", max_in_flight=_window(k * 24), load=load, k=k
    )
    return stats or ClusterStats(np.zeros(k, np.int64), np.full(k, np.inf), np.full(k, -np.inf))


# ---------------------------------------------------------------- driver


def _gather_sample(fanout, items, *, name: str, **kwargs) -> np.ndarray:
    """The fit sample from the workers, in image_id order (the order of the whole-table code)."""
    got = [r for r in fanout.map(_sample_task, items, name=name, **kwargs) if r[0].size]
    if not got:
        raise ValueError("k-means: the fit sample is empty")
    ids = np.concatenate([g[0] for g in got])
    x = np.concatenate([g[1] for g in got])
    return x[np.argsort(ids, kind="stable")]


def _sum_all(
    fanout, groups, centroids, cutoffs, *, spherical, assign_dtype, name
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums and counts over every group of parts (`_sums_task`), folded in group order."""
    return fanout.fold(
        _sums_task,
        groups,
        _add_sums,
        name=name,
        max_in_flight=_window(centroids.size * 8),
        **fanout.gpu_task_options(),
        cutoffs=cutoffs,
        centroids=centroids,
        spherical=spherical,
        assign_dtype=assign_dtype,
    )


def _assign_all(fanout, items, centroids, *, spherical, assign_dtype, name) -> ClusterStats:
    return fanout.fold(
        _assign_task,
        items,
        _merge_stats,
        name=name,
        max_in_flight=_window(centroids.shape[0] * 24),
        **fanout.gpu_task_options(),
        centroids=centroids,
        spherical=spherical,
        assign_dtype=assign_dtype,
    )


def kept_pool_parts(
    embed_parts: list[Path], dedup_parts: list[Path] | None, *, fanout: Fanout | None = None
) -> tuple[list[VectorPart], list[int]]:
    """The vector parts of the kept pool and each one's number of kept points with a vector, counted
    by the workers. Embed and dedup write one part per ingest part, so each embed part's kept images
    are listed in the dedup part of its number. When the numbers differ, or a dedup part turns out
    not to line up with the embed part of its number, every worker reads every dedup part instead:
    correct, but that grows with the number of parts. Embed parts are per model, so `embed_parts`
    (one model's) says which vectors these are."""
    fanout = fanout or RayFanout()
    if dedup_parts is None:
        parts = [VectorPart(p) for p in embed_parts]
        return parts, fanout.map(count_vector_part, parts, name="count points")
    keep = pc.field("keep")
    by_index = {part_index(p): p for p in dedup_parts}
    if set(by_index) == {part_index(p) for p in embed_parts}:
        parts = [VectorPart(p, rows=by_index[part_index(p)], where=keep) for p in embed_parts]
        results = fanout.map(_count_task, parts, name="count points")
        if all(ok for _, ok in results):
            return parts, [c for c, _ in results]
        log.warning("dedup parts do not line up with the embed parts; each worker reads all of them")
    every = tuple(dedup_parts)
    parts = [VectorPart(p, rows=every, where=keep) for p in embed_parts]
    return parts, fanout.map(count_vector_part, parts, name="count points")


def fit_options(clustering) -> dict:
    """The fit settings of a job spec's `clustering` section, as the keyword arguments of
    `kmeans_over_parts` and `hierarchical_kmeans_over_parts` (the cluster and retrieve stages fit
    with the same settings)."""
    return {
        "niter": clustering.niter,
        "spherical": clustering.spherical,
        "max_points_per_centroid": clustering.max_points_per_centroid,
        "seed": clustering.seed,
        "assign_dtype": clustering.assign_dtype,
        "lloyd_passes": clustering.lloyd_passes,
    }


def kmeans_over_parts(
    parts: list[VectorPart],
    k: int,
    label_dir: Path,
    *,
    n: int,
    niter: int = 20,
    spherical: bool = True,
    max_points_per_centroid: int = 256,
    seed: int = 0,
    resampling_steps: int = 0,
    resample_size: int | None = None,
    nredo: int = 1,
    assign_dtype: AssignDtype = "auto",
    fanout: Fanout | None = None,
    lloyd_passes: int = 0,
) -> PartsKMeans:
    """`curation.kmeans.kmeans` over the points of `parts` (n of them in all, from `kept_pool_parts`),
    keyed by image_id. Writes label_dir/part-NNNNN.parquet (image_id, label, distance, in id order)
    for each part, numbered as the part."""
    fanout = fanout or RayFanout()
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= number of points, got k={k} for {n} points")
    # One precision for every pass, chosen here: FAISS float32 on a cluster with GPUs (the passes
    # run on GPU workers), else what this machine's CPU does best.
    if assign_dtype == "auto" and fanout.gpu_task_options():
        assign_dtype = "float32"
    assign_dtype = resolve_assign_dtype(assign_dtype)
    items = [(p, part_path(label_dir, part_index(p.vectors))) for p in parts]
    mppc = max_points_per_centroid
    sample = _gather_sample(
        fanout,
        _without_labels(items),
        name=f"k-means k={k}: fit sample",
        n=n,
        k=k,
        max_points_per_centroid=mppc,
        seed=seed,
        cutoffs=None,
    )
    centroids = fanout.one_place(
        fit_and_refine,
        sample,
        k,
        niter=niter,
        spherical=spherical,
        max_points_per_centroid=mppc,
        seed=seed,
        nredo=nredo,
        assign_dtype=assign_dtype,
    )
    del sample
    sum_groups = _groups(items, SUM_TASKS)
    sums_over = functools.partial(_sum_all, fanout, spherical=spherical, assign_dtype=assign_dtype)
    if n > k * mppc:  # else the fit saw every point already
        for p in range(lloyd_passes):
            sums, counts = sums_over(
                _groups(_without_labels(items), SUM_TASKS),
                centroids,
                None,
                name=f"k-means k={k}: Lloyd pass {p + 1}",
            )
            centroids = update_from_sums(sums, counts, centroids, spherical)
    assign = functools.partial(_assign_all, fanout, items, spherical=spherical, assign_dtype=assign_dtype)
    stats = assign(centroids, name=f"k-means k={k}: assign")
    r = nearest_per_cluster(n, k, resample_size)
    for step in range(resampling_steps):
        take = np.minimum(stats.counts, r)
        if take.sum() < k:  # most clusters empty (degenerate data): nothing to re-balance
            log.warning(
                "k-means: resampling found only %d points for k=%d; stopping after %d steps",
                take.sum(),
                k,
                step,
            )
            break
        cutoffs = select_smallest(
            [path for _, path in items],
            label_rows,
            stats.counts,
            take,
            stats.min_distance,
            stats.max_distance,
            name=f"k-means k={k}: {r} nearest per centroid",
            fanout=fanout,
        )
        sample = _gather_sample(
            fanout,
            items,
            name=f"k-means k={k}: resampling fit sample",
            n=int(take.sum()),
            k=k,
            max_points_per_centroid=mppc,
            seed=seed + 1 + step,
            cutoffs=cutoffs,
        )
        centroids = fanout.one_place(
            fit_centroids,
            sample,
            k,
            niter=niter,
            spherical=spherical,
            max_points_per_centroid=mppc,
            seed=seed + 1 + step,
            init_centroids=centroids,
        )
        del sample
        sums, counts = sums_over(sum_groups, centroids, cutoffs, name=f"k-means k={k}: resampling means")
        centroids = update_from_sums(sums, counts, centroids, spherical)
        stats = assign(centroids, name=f"k-means k={k}: assign")
    return PartsKMeans(centroids, stats, [path for _, path in items], n)


def _without_labels(items):
    """The first fit sample reads vectors only (no label parts yet)."""
    return [(p, None) for p, _ in items]


def _groups(items: list, tasks: int) -> list[list]:
    """items in at most `tasks` consecutive groups (a grouping that depends on the items only)."""
    size = max(1, -(-len(items) // tasks))
    return [items[i : i + size] for i in range(0, len(items), size)]


def hierarchical_kmeans_over_parts(
    parts: list[VectorPart],
    levels: list[tuple[int, int]],
    label_dir: Path,
    *,
    n: int,
    niter: int = 20,
    spherical: bool = True,
    max_points_per_centroid: int = 256,
    seed: int = 0,
    assign_dtype: AssignDtype = "auto",
    fanout: Fanout | None = None,
    lloyd_passes: int = 0,
) -> PartsHierarchy:
    """`curation.kmeans.hierarchical_kmeans` over the points of `parts`: level 0 over the parts
    (labels in label parts), the upper levels on the driver over the centroids."""
    if not levels:
        raise ValueError("hierarchical k-means needs at least one level")
    if n == 0:
        raise ValueError("hierarchical k-means needs at least one point")
    k, steps = levels[0]
    leaf = kmeans_over_parts(
        parts,
        clamp_k(0, k, n),
        label_dir,
        n=n,
        niter=niter,
        spherical=spherical,
        max_points_per_centroid=max_points_per_centroid,
        seed=seed,
        resampling_steps=steps,
        nredo=1,
        assign_dtype=assign_dtype,
        fanout=fanout,
        lloyd_passes=lloyd_passes,
    )
    centroids, parents = cluster_centroids(
        leaf.centroids,
        levels[1:],
        niter=niter,
        spherical=spherical,
        max_points_per_centroid=max_points_per_centroid,
        seed=seed,
        assign_dtype=assign_dtype,
    )
    sizes = [leaf.sizes]
    for lv, parent in enumerate(parents):
        sizes.append(
            np.bincount(parent, weights=sizes[-1], minlength=centroids[lv + 1].shape[0]).astype(np.int64)
        )
    return PartsHierarchy(centroids, parents, sizes, leaf.label_parts, n)


def assign_to_hierarchy(
    parts: list[VectorPart],
    centroids: list[np.ndarray],
    parents: list[np.ndarray],
    label_dir: Path,
    *,
    n: int,
    spherical: bool = True,
    assign_dtype: AssignDtype = "auto",
    fanout: Fanout | None = None,
) -> PartsHierarchy:
    """The points of `parts` assigned to a fitted hierarchy (an earlier run's): one nearest-centroid
    pass at level 0 writing the label parts; upper levels follow the parents. No fit."""
    fanout = fanout or RayFanout()
    if assign_dtype == "auto" and fanout.gpu_task_options():
        assign_dtype = "float32"
    assign_dtype = resolve_assign_dtype(assign_dtype)
    items = [(p, part_path(label_dir, part_index(p.vectors))) for p in parts]
    stats = _assign_all(
        fanout,
        items,
        centroids[0],
        spherical=spherical,
        assign_dtype=assign_dtype,
        name=f"k-means k={centroids[0].shape[0]}: assign to the earlier centroids",
    )
    sizes = [stats.counts]
    for lv, parent in enumerate(parents):
        sizes.append(
            np.bincount(parent, weights=sizes[-1], minlength=centroids[lv + 1].shape[0]).astype(np.int64)
        )
    return PartsHierarchy(centroids, parents, sizes, [path for _, path in items], n)
