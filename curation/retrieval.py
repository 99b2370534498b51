"""Seed-set retrieval (DINOv2 paper, sec. 3): as-is, sample-based (kNN per seed image) and
cluster-based (pool clusters that hold enough seed images). Each returns RETRIEVED rows.

Cluster-based retrieval takes, from each selected cluster, the pool images nearest its centroid
(not a random draw): the most typical members first, deterministic, and the same ones a larger
`images_per_cluster` would extend. Clusters are taken in order of seed count (most seeds first,
ties by cluster id) until the seed set's `max_images` cap, the last one cut short if needed.
"""

from __future__ import annotations

import faiss
import numpy as np
import pyarrow as pa

from lvd.curation.kmeans import kmeans_assign
from lvd.curation.knn import search
from lvd.schemas.tables import RETRIEVED


def _rows(
    image_ids: np.ndarray,
    seed_set: str,
    strategy: str,
    seed_ids: np.ndarray | None,
    rank: np.ndarray | None,
    score: np.ndarray | None,
) -> pa.Table:
    n = len(image_ids)
    return pa.table(
        {
            "image_id": pa.array(np.asarray(image_ids, dtype=np.int64)),
            "seed_set": pa.array([seed_set] * n, pa.string()),
            "seed_id": pa.array(seed_ids, pa.int64()) if seed_ids is not None else pa.nulls(n, pa.int64()),
            "strategy": pa.array([strategy] * n, pa.string()),
            "rank": pa.array(rank, pa.int32()) if rank is not None else pa.nulls(n, pa.int32()),
            "score": pa.array(score, pa.float32()) if score is not None else pa.nulls(n, pa.float32()),
        },
        schema=RETRIEVED,
    )


def retrieve_as_is(seed_ids: np.ndarray, seed_set: str) -> pa.Table:
    """The seed set's own images, included whole (each is its own seed, rank 0)."""
    seed_ids = np.asarray(seed_ids, dtype=np.int64)
    return _rows(seed_ids, seed_set, "as_is", seed_ids, np.zeros(seed_ids.size, np.int32), None)


def retrieve_by_sample(
    pool_index: faiss.Index,
    pool_ids: np.ndarray,
    seed_vectors: np.ndarray,
    seed_ids: np.ndarray,
    seed_set: str,
    *,
    k: int = 4,
    chunk_size: int = 65_536,
) -> pa.Table:
    """The k nearest pool images of every seed image (rank 0 = nearest, score = cosine).

    `pool_index` holds the L2-normalised pool vectors in the order of `pool_ids`: the in-memory
    reference of the retrieve stage's sharded search (`curation.knn_ray.search_parts`).
    """
    sims, idx = search(pool_index, seed_vectors, k, chunk_size)
    pool_ids = np.asarray(pool_ids, dtype=np.int64)
    return topk_rows(seed_ids, sims, np.where(idx >= 0, pool_ids[np.maximum(idx, 0)], -1), seed_set)


def topk_rows(query_ids: np.ndarray, sims: np.ndarray, ids: np.ndarray, seed_set: str) -> pa.Table:
    """RETRIEVED rows of a kNN search: each query's neighbours (ids, -1 = none) in rank order."""
    valid = ids >= 0
    seed_of = np.repeat(np.asarray(query_ids, dtype=np.int64), ids.shape[1]).reshape(ids.shape)
    rank = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
    return _rows(ids[valid], seed_set, "sample", seed_of[valid], rank[valid], sims[valid])


def rank_cluster_members(
    image_ids: np.ndarray,
    labels: np.ndarray,
    distance: np.ndarray,
    priority: np.ndarray,
    seed_set: str,
    *,
    spherical: bool = True,
) -> pa.Table:
    """RETRIEVED rows of the chosen members of selected clusters: rank = position by (distance,
    image_id) inside the cluster, rows in order of cluster priority (`priority[c]`, 0 first) then
    rank; score = cosine to the centroid when spherical, else minus the squared distance."""
    image_ids = np.asarray(image_ids, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    order = np.lexsort((image_ids, distance, labels))
    lab = labels[order]
    rank = np.arange(order.size) - np.searchsorted(lab, lab, side="left")
    by_priority = np.lexsort((rank, priority[lab]))
    chosen, rank = order[by_priority], rank[by_priority]
    dist = np.asarray(distance)[chosen]
    score = 1.0 - dist if spherical else -dist
    return _rows(
        image_ids[chosen], seed_set, "cluster", None, rank.astype(np.int32), score.astype(np.float32)
    )


def retrieve_by_cluster(
    pool_ids: np.ndarray,
    pool_labels: np.ndarray,
    pool_distance: np.ndarray,
    centroids: np.ndarray,
    seed_vectors: np.ndarray,
    seed_set: str,
    *,
    spherical: bool = True,
    min_seed_images: int = 3,
    images_per_cluster: int = 10_000,
    max_images: int = 1_000_000,
) -> pa.Table:
    """Pool images of the clusters holding more than `min_seed_images` seed images.

    `pool_labels`/`pool_distance`: each pool image's cluster among `centroids` and its distance to
    it (1 - cosine when spherical). rank = position by distance inside the cluster; score = cosine
    to the centroid when spherical, else minus the squared distance.
    """
    pool_ids = np.asarray(pool_ids, dtype=np.int64)
    pool_labels = np.asarray(pool_labels, dtype=np.int64)
    k = centroids.shape[0]
    if seed_vectors.shape[0] == 0 or pool_ids.size == 0:
        return _rows(
            np.zeros(0, np.int64), seed_set, "cluster", None, np.zeros(0, np.int32), np.zeros(0, np.float32)
        )
    seed_labels, _ = kmeans_assign(seed_vectors, centroids, spherical=spherical)
    seeds_in = np.bincount(seed_labels, minlength=k)
    # Priority of each cluster: most seeds first, ties by cluster id; unselected clusters last.
    priority = np.empty(k, dtype=np.int64)
    priority[np.lexsort((np.arange(k), -seeds_in))] = np.arange(k)
    order = np.lexsort((pool_ids, pool_distance, pool_labels))
    lab = pool_labels[order]
    rank = np.arange(order.size) - np.searchsorted(lab, lab, side="left")
    take = (seeds_in[lab] > min_seed_images) & (rank < images_per_cluster)
    chosen, lab, rank = order[take], lab[take], rank[take]
    chosen = chosen[np.lexsort((rank, priority[lab]))[:max_images]]
    return rank_cluster_members(
        pool_ids[chosen], pool_labels[chosen], pool_distance[chosen], priority, seed_set, spherical=spherical
    )


def count_collisions(retrieved: pa.Table) -> int:
    """Pool images retrieved by more than one seed image (rows with a seed_id; as-is rows excluded)."""
    strategy = retrieved.column("strategy").to_numpy(zero_copy_only=False)
    seed = retrieved.column("seed_id").to_numpy(zero_copy_only=False)
    mask = strategy == "sample"
    if not mask.any():
        return 0
    ids = retrieved.column("image_id").to_numpy()[mask]
    pairs = np.unique(np.stack([ids, seed[mask].astype(np.int64)], axis=1), axis=0)
    _, per_image = np.unique(pairs[:, 0], return_counts=True)
    return int((per_image > 1).sum())


# ---------------------------------------------------------------- incremental (a source added)
#
# A sample-based seed set's lists on a grown pool, from the earlier run's lists. The pool now is the
# earlier kept pool less the images dedup no longer keeps (`dropped`), plus the images it newly keeps
# (new images, and earlier ones whose keep flipped). A seed's top k of the union is the top k of its
# earlier list less the dropped images merged with its top k among the newly kept, whenever the earlier
# list lost none of its images or held fewer than k (then it held the whole earlier pool). Any other
# seed (`stale_seeds`) is searched again against the whole pool.


def stale_seeds(earlier: pa.Table, dropped: np.ndarray, k: int) -> np.ndarray:
    """The sorted seed ids of `earlier` (RETRIEVED rows of one seed set) whose list held k images and
    lost one to `dropped` (sorted ids of images no longer in the pool): its next image is unknown."""
    seeds = earlier["seed_id"].to_numpy()
    lost = np.isin(earlier["image_id"].to_numpy(), dropped)
    values, counts = np.unique(seeds, return_counts=True)
    full = values[counts >= k]
    return np.intersect1d(np.unique(seeds[lost]), full)


def merge_seed_lists(
    earlier: pa.Table, newly: pa.Table, dropped: np.ndarray, k: int, seed_set: str
) -> pa.Table:
    """RETRIEVED rows of a sample-based seed set on the grown pool: each seed's top k by (score
    descending, image_id ascending) among its `earlier` rows less the `dropped` images and its rows
    of `newly` (its top k among the newly kept images, RETRIEVED rows). For seeds not in
    `stale_seeds` (the caller searches those again); ranks are renumbered, rows in seed order."""
    earlier = earlier.filter(pa.array(~np.isin(earlier["image_id"].to_numpy(), dropped)))
    both = pa.concat_tables([earlier.select(RETRIEVED.names), newly.select(RETRIEVED.names).cast(RETRIEVED)])
    seed = both["seed_id"].to_numpy()
    image = both["image_id"].to_numpy()
    score = both["score"].to_numpy().astype(np.float64)
    order = np.lexsort((image, -score, seed))
    seed, image = seed[order], image[order]
    start = np.searchsorted(seed, seed, side="left")
    rank = np.arange(seed.size) - start
    take = rank < k
    return _rows(
        image[take], seed_set, "sample", seed[take], rank[take].astype(np.int32),
        both["score"].to_numpy()[order][take],
    )  # fmt: skip
