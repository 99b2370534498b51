"""The distributed k-smallest-per-group selection against the whole-table reference."""

import numpy as np
import pyarrow as pa
import pytest

from lvd.curation import selection
from lvd.curation.cluster_labels import write_labels
from lvd.curation.kmeans import kmeans_assign
from lvd.curation.knn import normalize
from lvd.curation.retrieval import retrieve_by_cluster
from lvd.curation.selection import Selection, boundary_rows, group_histogram, smallest_per_group
from lvd.jobs.kmeans_parts import cluster_ranges, clusters_rows, label_rows
from lvd.jobs.selection import select_smallest
from lvd.jobs.workers import LocalFanout
from lvd.schemas.layout import part_path
from lvd.schemas.tables import CLUSTERS, write_parquet_atomic


def _rows(rng, n, groups, tie_levels=None):
    g = rng.integers(0, groups, n)
    keys = rng.random(n)
    if tie_levels:  # many equal keys: ties are broken by image id
        keys = np.round(keys * tie_levels) / tie_levels
    ids = rng.choice(10**12, n, replace=False).astype(np.int64)
    return g, keys, ids


def _by_hand(groups, keys, ids, counts):
    """The chosen rows: per group, the counts[g] smallest (key, id), by Python sorting."""
    chosen = set()
    for g in np.unique(groups):
        rows = sorted(np.flatnonzero(groups == g), key=lambda r: (keys[r], ids[r]))
        chosen.update(rows[: max(0, counts[g])])
    return np.isin(np.arange(groups.size), list(chosen))


def _distributed(groups, keys, ids, counts, parts, lo=0.0, hi=1.0):
    """Selection driven by hand over `parts` row slices with the per-part functions."""
    size = np.bincount(groups, minlength=counts.size)
    sel = Selection(size, counts, lo, hi)
    splits = np.array_split(np.arange(groups.size), parts)
    while (req := sel.next_request()) is not None:
        if req.kind == "histogram":
            sel.add_histograms([group_histogram(groups[s], keys[s], req) for s in splits])
        else:
            sel.add_boundary([boundary_rows(groups[s], keys[s], ids[s], req) for s in splits])
    return sel


def test_reference_equals_sorting_by_hand():
    rng = np.random.default_rng(0)
    groups, keys, ids = _rows(rng, 2000, 30, tie_levels=20)
    counts = rng.integers(-2, 120, 30)
    cut = smallest_per_group(groups, keys, ids, counts)
    assert np.array_equal(cut.members(groups, keys, ids), _by_hand(groups, keys, ids, counts))


@pytest.mark.parametrize("tie_levels", [None, 7])
@pytest.mark.parametrize("force_histograms", [False, True])
def test_parts_equal_reference(monkeypatch, tie_levels, force_histograms):
    if force_histograms:  # tiny collect limits: several histogram passes before the collect
        monkeypatch.setattr(selection, "COLLECT_MIN", 10)
        monkeypatch.setattr(selection, "COLLECT_PER_GROUP", 2)
        monkeypatch.setattr(selection, "MIN_BINS", 4)
        monkeypatch.setattr(selection, "HISTOGRAM_CELLS", 64)
    rng = np.random.default_rng(1)
    groups, keys, ids = _rows(rng, 5000, 40, tie_levels)
    size = np.bincount(groups, minlength=41)  # group 40 is empty
    counts = rng.integers(0, 200, 41)
    counts[:5] = [0, size[1], size[2] + 3, 1, size[4] - 1]
    sel = _distributed(groups, keys, ids, counts, parts=7)
    assert (sel.histogram_passes > 0) == force_histograms
    ref = smallest_per_group(groups, keys, ids, counts)
    got = sel.cutoffs
    assert np.array_equal(got.members(groups, keys, ids), ref.members(groups, keys, ids))
    assert np.array_equal(got.members(groups, keys, ids), _by_hand(groups, keys, ids, counts))
    chosen = np.bincount(groups[got.members(groups, keys, ids)], minlength=41)
    assert np.array_equal(chosen, np.minimum(np.maximum(counts, 0), size))


def test_distance_keys_in_each_groups_own_range(monkeypatch):
    monkeypatch.setattr(selection, "COLLECT_MIN", 10)
    monkeypatch.setattr(selection, "COLLECT_PER_GROUP", 1)
    rng = np.random.default_rng(2)
    groups = rng.integers(0, 5, 3000)
    keys = (groups * 10 + rng.random(3000) ** 3).astype(np.float32)  # float32, skewed, far apart
    ids = np.arange(3000, dtype=np.int64)[::-1].copy()
    lo = np.array([keys[groups == g].min() for g in range(5)], dtype=np.float64)
    hi = np.array([keys[groups == g].max() for g in range(5)], dtype=np.float64)
    counts = np.array([1, 10, 100, 300, 599])
    sel = _distributed(groups, keys, ids, counts, parts=4, lo=lo, hi=hi)
    assert sel.histogram_passes >= 2
    assert np.array_equal(
        sel.cutoffs.members(groups, keys, ids), _by_hand(groups, keys.astype(np.float64), ids, counts)
    )


def test_parts_that_change_between_passes_are_refused():
    rng = np.random.default_rng(3)
    groups, keys, ids = _rows(rng, 100, 3)
    sel = Selection(np.bincount(groups, minlength=3), [5, 5, 5], 0.0, 1.0)
    req = sel.next_request()
    with pytest.raises(RuntimeError, match="changed between passes"):
        sel.add_boundary([boundary_rows(groups[:50], keys[:50], ids[:50], req)])


def test_select_smallest_over_label_parts(ray_local, tmp_path):
    """The Ray glue (and the in-process one) over parquet parts read by a library loader."""
    rng = np.random.default_rng(4)
    groups, keys, ids = _rows(rng, 3000, 12, tie_levels=50)
    keys = keys.astype(np.float32)
    paths = []
    for i, s in enumerate(np.array_split(np.arange(3000), 5)):
        paths.append(part_path(tmp_path, i))
        write_labels(paths[-1], ids[s], groups[s], keys[s])
    counts = rng.integers(0, 300, 12)
    size = np.bincount(groups, minlength=12)
    ref = smallest_per_group(groups, keys, ids, counts).members(groups, keys, ids)
    for fanout in (LocalFanout(), None):  # None: Ray tasks
        cut = select_smallest(paths, label_rows, size, counts, 0.0, 1.0, name="t", fanout=fanout)
        assert np.array_equal(cut.members(groups, keys, ids), ref)


def test_cluster_retrieval_by_cutoffs_equals_retrieve_by_cluster(tmp_path):
    """The recipe for cluster-based retrieval over parts: per-cluster counts from the seeds (in
    priority order, capped by max_images), cutoffs over the CLUSTERS parts, membership per part:
    the images `retrieve_by_cluster` picks from the whole table."""
    rng = np.random.default_rng(6)
    k, n = 9, 2000
    centroids = normalize(rng.standard_normal((k, 8)).astype(np.float32))
    pool = normalize(rng.standard_normal((n, 8)).astype(np.float32))
    ids = rng.choice(2**62, n, replace=False).astype(np.int64)
    labels, dist = kmeans_assign(pool, centroids, assign_dtype="float32")
    seeds = normalize(
        centroids[rng.integers(0, 4, 40)] + 0.3 * rng.standard_normal((40, 8)).astype(np.float32)
    )
    paths = []
    for i, rows in enumerate(np.array_split(rng.permutation(n), 4)):
        table = pa.table(
            {
                "image_id": pa.array(ids[rows]),
                "cluster_ids": pa.array([[int(v)] for v in labels[rows]], pa.list_(pa.int32())),
                "distance": pa.array(dist[rows]),
            }
        )
        paths.append(part_path(tmp_path, i))
        write_parquet_atomic(table, paths[-1], CLUSTERS)
    min_seed_images, per_cluster, max_images = 3, 150, 500
    want = retrieve_by_cluster(
        ids,
        labels,
        dist,
        centroids,
        seeds,
        "s",
        min_seed_images=min_seed_images,
        images_per_cluster=per_cluster,
        max_images=max_images,
    )["image_id"].to_numpy()

    fanout = LocalFanout()
    stats = cluster_ranges(paths, clusters_rows, k, fanout=fanout)
    seeds_in = np.bincount(kmeans_assign(seeds, centroids)[0], minlength=k)
    take = np.where(seeds_in > min_seed_images, np.minimum(per_cluster, stats.counts), 0)
    order = np.lexsort((np.arange(k), -seeds_in))  # priority: most seeds first, ties by cluster id
    counts = np.zeros(k, np.int64)
    counts[order] = np.clip(max_images - (np.cumsum(take[order]) - take[order]), 0, take[order])
    cut = select_smallest(
        paths,
        clusters_rows,
        stats.counts,
        counts,
        stats.min_distance,
        stats.max_distance,
        name="t",
        fanout=fanout,
    )
    got = np.concatenate([ids_[cut.members(g, d, ids_)] for g, d, ids_ in map(clusters_rows, paths)])
    assert want.size == min(max_images, take.sum()) and 0 < want.size
    assert np.array_equal(np.sort(got), np.sort(want))
