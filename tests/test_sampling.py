import numpy as np

from lvd.curation.sampling import balanced_sample, water_fill


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
