import functools

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from lvd.curation import selection
from lvd.curation.curated import BALANCED, bucket_bounds, candidates, merge_candidates, split_by_bucket
from lvd.curation.sampling import (
    ClusterTree,
    balanced_sample,
    extra_picks,
    leaf_budgets,
    leaf_pick_keys,
    leaf_repeats,
    water_fill,
)
from lvd.curation.selection import Selection, boundary_rows, group_histogram


def _per_cluster(labels, rows, repeats, k):
    return np.bincount(labels[rows], weights=repeats, minlength=k).astype(int).tolist()


def test_water_fill_by_hand():
    assert water_fill(np.array([2, 5, 10]), 12).tolist() == [2, 5, 5]
    assert water_fill(np.array([10, 2, 5]), 12).tolist() == [5, 2, 5]
    # 7 over three equal children: 2 each, the spare unit to the smallest id among the largest
    assert water_fill(np.array([3, 3, 3]), 7).tolist() == [3, 2, 2]
    # 11 over [1, 4, 4, 20]: 1 whole, then 10 over three -> 3, 3, 3 and one spare to the 20
    assert water_fill(np.array([1, 4, 4, 20]), 11).tolist() == [1, 3, 3, 4]
    assert water_fill(np.array([1, 2]), 10).tolist() == [1, 2]
    assert water_fill(np.array([4, 4]), 0).tolist() == [0, 0]


def test_two_level_hierarchy_exact_counts():
    # top A = leaves {a1: 1 image, a2: 9 images}, top B = leaf {b1: 20 images}
    leaf = np.array([0] * 1 + [1] * 9 + [2] * 20)
    top = np.array([0] * 10 + [1] * 20)
    labels = np.stack([leaf, top], axis=1)
    # target 10: A and B get 5 each; in A, a1 is taken whole (1) and a2 gets 4.
    rows, rep = balanced_sample(labels, 10, seed=0)
    assert rep.sum() == 10 and (rep == 1).all() and np.unique(rows).size == rows.size
    assert _per_cluster(leaf, rows, rep, 3) == [1, 4, 5]
    # max_repeats 2, target 30: capacities A 20, B 40 -> 15 each; a1 gives 2 (its one image twice),
    # a2 the other 13 (4 images twice, 5 once), b1 15 distinct images.
    rows, rep = balanced_sample(labels, 30, max_repeats=2, seed=0)
    assert rep.sum() == 30 and _per_cluster(leaf, rows, rep, 3) == [2, 13, 15]
    assert rep[rows == 0].tolist() == [2]
    a2 = np.isin(rows, np.arange(1, 10))
    assert sorted(rep[a2].tolist()) == [1] * 5 + [2] * 4
    assert (rep[rows >= 10] == 1).all()


def test_three_levels_and_more_than_the_pool():
    # leaves of sizes 1, 1, 6 | 8 ; middle: {0,1} -> 0, {2} -> 1, {3} -> 2 ; top: {0,1} -> 0, {2} -> 1
    leaf = np.repeat([0, 1, 2, 3], [1, 1, 6, 8])
    mid = np.repeat([0, 0, 1, 2], [1, 1, 6, 8])
    top = np.repeat([0, 0, 0, 1], [1, 1, 6, 8])
    labels = np.stack([leaf, mid, top], axis=1)
    # target 9: top 0 (cap 8) and top 1 (cap 8) -> 5 and 4; top 0: mid 0 (cap 2) whole, mid 1 gets 3
    rows, rep = balanced_sample(labels, 9, seed=3)
    assert _per_cluster(leaf, rows, rep, 4) == [1, 1, 3, 4]
    rows, rep = balanced_sample(labels, 100, max_repeats=3, seed=3)
    assert rows.tolist() == list(range(16)) and (rep == 3).all()


def test_seeded_and_random_inside_leaves():
    labels = np.repeat(np.arange(4), 50)
    a = balanced_sample(labels, 40, seed=1)
    b = balanced_sample(labels, 40, seed=1)
    c = balanced_sample(labels, 40, seed=2)
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0], c[0])
    assert _per_cluster(labels, a[0], a[1], 4) == [10, 10, 10, 10]
    assert a[0].tolist() != list(range(10)) + list(range(50, 60)) + list(range(100, 110)) + list(
        range(150, 160)
    )


# ---------------------------------------------------------------- over parts


def _hierarchy(rng, n, leaves=60, mids=10, tops=3):
    """(n, 3) labels with some leaf and mid ids unused, and random int64 ids."""
    leaf_ids = rng.choice(leaves + 15, leaves, replace=False)  # ids with gaps: empty clusters
    mid_of = rng.integers(0, mids, leaf_ids.max() + 1)
    top_of = rng.integers(0, tops, mids)
    leaf = leaf_ids[np.minimum(rng.zipf(1.6, n) - 1, leaves - 1)]  # skewed sizes
    labels = np.stack([leaf, mid_of[leaf], top_of[mid_of[leaf]]], axis=1)
    return labels, rng.choice(2**62, n, replace=False).astype(np.int64)


@pytest.mark.parametrize(
    "target,max_repeats,force_histograms",
    [(300, 1, False), (2000, 3, False), (2000, 3, True), (10**6, 2, False)],
)
def test_per_part_sampling_equals_balanced_sample(monkeypatch, target, max_repeats, force_histograms):
    """Trees of parts merged, budgets on the merged tree, the leaf pick by cutoffs over parts, repeats
    per part: the same repeats for every point as `balanced_sample` on the whole table."""
    if force_histograms:
        monkeypatch.setattr(selection, "COLLECT_MIN", 20)
        monkeypatch.setattr(selection, "COLLECT_PER_GROUP", 2)
    rng = np.random.default_rng(11)
    n, seed = 4000, 4
    labels, ids = _hierarchy(rng, n)
    rows, reps = balanced_sample(labels, target, max_repeats=max_repeats, seed=seed, ids=ids)
    want = np.zeros(n, np.int64)
    want[rows] = reps

    parts = np.array_split(rng.permutation(n), 6)
    tree = functools.reduce(ClusterTree.merge, [ClusterTree.of_labels(labels[p]) for p in parts])
    whole = ClusterTree.of_labels(labels)
    assert all(np.array_equal(a, b) for a, b in zip(tree.sizes, whole.sizes, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(tree.parents, whole.parents, strict=True))
    budget = leaf_budgets(tree, target, max_repeats)
    sizes = tree.sizes[0]
    sel = Selection(sizes, extra_picks(budget, sizes), 0.0, 1.0)
    keys = leaf_pick_keys(ids, seed)
    while (req := sel.next_request()) is not None:
        if req.kind == "histogram":
            sel.add_histograms([group_histogram(labels[p, 0], keys[p], req) for p in parts])
        else:
            sel.add_boundary([boundary_rows(labels[p, 0], keys[p], ids[p], req) for p in parts])
    assert (sel.histogram_passes > 0) == force_histograms
    got = np.zeros(n, np.int64)
    for p in parts:
        got[p] = leaf_repeats(labels[p, 0], ids[p], budget, sizes, sel.cutoffs, seed)
    assert np.array_equal(got, want)
    assert got.sum() == min(target, n * max_repeats) and got.max() <= max_repeats


def test_curated_buckets_merge_like_one_groupby():
    """Candidates written by several workers into id-range buckets and merged per bucket: the parts in
    bucket order equal the old whole-table merge (sources sorted and unique, repeats the max)."""
    rng = np.random.default_rng(12)
    pool = rng.choice(2**62, 500, replace=False).astype(np.int64)
    balanced_ids = rng.choice(pool, 200, replace=False)
    balanced_rep = rng.integers(1, 4, 200)
    retrieved = [(rng.choice(pool, 120), name) for name in ("zeta", "alpha", "mid")]  # repeats inside a set
    frames = [pd.DataFrame({"image_id": balanced_ids, "source": BALANCED, "repeats": balanced_rep})]
    frames += [pd.DataFrame({"image_id": ids, "source": name, "repeats": 1}) for ids, name in retrieved]
    ref = (
        pd.concat(frames, ignore_index=True)
        .groupby("image_id", sort=True)
        .agg(sources=("source", lambda s: sorted(set(s))), repeats=("repeats", "max"))
        .reset_index()
    )
    writers = [candidates(balanced_ids, BALANCED, balanced_rep, retrieved=False)]
    writers += [candidates(ids, name, np.ones(ids.size), retrieved=True) for ids, name in retrieved]
    bounds = bucket_bounds(pool.min(), pool.max(), 5)
    buckets = {}
    for w in writers:
        for b, rows in split_by_bucket(w, bounds).items():
            buckets.setdefault(b, []).append(rows)
    assert sorted(buckets) == list(range(5))
    merged = [merge_candidates(pa.concat_tables(buckets[b])) for b in range(5)]
    table = pa.concat_tables([m[0] for m in merged])
    assert table["image_id"].to_pylist() == ref["image_id"].tolist()
    assert table["sources"].to_pylist() == ref["sources"].tolist()
    assert table["repeats"].to_pylist() == ref["repeats"].tolist()
    assert sum(m[1] for m in merged) == len(set(np.concatenate([ids for ids, _ in retrieved])))
