import logging

import numpy as np
import pytest

from lvd.curation.kmeans import hierarchical_kmeans, kmeans, kmeans_assign, kmeans_fit, mean_by_label
from lvd.curation.knn import normalize


def _blobs(rng, centers, per, spread):
    x = np.concatenate([c + spread * rng.standard_normal((per, centers.shape[1])) for c in centers])
    truth = np.repeat(np.arange(len(centers)), per)
    return x.astype(np.float32), truth


def _same_partition(a, b):
    """Labelings equal up to renaming clusters."""
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_assign_matches_brute_force_both_metrics():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 16)).astype(np.float32)
    c = rng.standard_normal((7, 16)).astype(np.float32)
    d2 = ((x[:, None, :] - c[None]) ** 2).sum(-1)
    labels, dist = kmeans_assign(x, c, spherical=False, chunk_size=64, assign_dtype="float32")
    assert np.array_equal(labels, d2.argmin(1))
    assert np.allclose(dist, d2.min(1), rtol=1e-4, atol=1e-4)
    xn, cn = normalize(x), normalize(c)
    labels, dist = kmeans_assign(xn, cn, spherical=True, chunk_size=64, assign_dtype="float32")
    cos = xn @ cn.T
    assert np.array_equal(labels, cos.argmax(1))
    assert np.allclose(dist, 1 - cos.max(1), atol=1e-5)


@pytest.mark.parametrize("spherical", [False, True])
def test_bf16_assign_is_nearest_up_to_bf16_ties_with_exact_distances(spherical):
    """bf16 picks the nearest centroid except within bf16 rounding of a tie; the distance it returns is
    the float32 one to the centroid it picked; on separated blobs it is the exact assignment."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((20_000, 64)).astype(np.float32)
    c = rng.standard_normal((300, 64)).astype(np.float32)
    if spherical:
        x, c = normalize(x), normalize(c)
    d = (1 - x @ c.T) if spherical else ((x[:, None, :] - c[None]) ** 2).sum(-1)
    labels, dist = kmeans_assign(x, c, spherical=spherical, assign_dtype="bfloat16")
    picked = d[np.arange(len(x)), labels]
    assert np.allclose(dist, picked, rtol=1e-4, atol=1e-4)
    assert (labels == d.argmin(1)).mean() > 0.9
    # bf16 keeps 8 significant bits: a wrong pick is a near tie, never a far centroid.
    slack = 2.0**-6 * (1.0 if spherical else (x * x).sum(1) + (c * c).sum(1).max())
    assert np.all(picked - d.min(1) <= slack)
    centers = 10 * rng.standard_normal((6, 32))
    blobs, _ = _blobs(rng, centers, 100, 0.5)
    blob_centroids = centers.astype(np.float32)
    if spherical:
        blobs, blob_centroids = normalize(blobs), normalize(blob_centroids)
    exact = kmeans_assign(blobs, blob_centroids, spherical=spherical, assign_dtype="float32")[0]
    fast = kmeans_assign(blobs, blob_centroids, spherical=spherical, assign_dtype="bfloat16")[0]
    assert np.array_equal(exact, fast)


def test_assign_dtype_auto_resolves_and_bad_value_is_refused():
    from lvd.curation.kmeans import cpu_has_native_bf16, resolve_assign_dtype

    assert resolve_assign_dtype("auto") == ("bfloat16" if cpu_has_native_bf16() else "float32")
    with pytest.raises(ValueError, match="assign_dtype"):
        resolve_assign_dtype("float16")


def test_mean_by_label_in_float64():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1000, 8)).astype(np.float32)
    labels = rng.integers(0, 6, 1000)
    labels[labels == 4] = 5  # an empty label
    means, counts = mean_by_label(x, labels, 6, chunk_size=100)
    for j in range(6):
        ref = x[labels == j].astype(np.float64).mean(0) if (labels == j).any() else np.zeros(8)
        assert np.allclose(means[j], ref, atol=1e-12)
    assert counts.tolist() == np.bincount(labels, minlength=6).tolist()


def test_kmeans_recovers_blobs_and_objective_is_brute_force():
    rng = np.random.default_rng(2)
    centers = 10 * rng.standard_normal((5, 8))
    x, truth = _blobs(rng, centers, 200, 0.5)
    res = kmeans(x, 5, spherical=False, niter=20, seed=0)
    assert _same_partition(res.labels, truth)
    d2 = ((x[:, None, :].astype(np.float64) - res.centroids[None]) ** 2).sum(-1)
    assert res.objective == pytest.approx(d2.min(1).sum(), rel=1e-4)
    # centroids are the float64 means of their members
    for j in range(5):
        assert np.allclose(res.centroids[j], x[res.labels == j].astype(np.float64).mean(0), atol=1e-5)


def test_fit_on_capped_sample_and_bad_k():
    x = np.random.default_rng(3).standard_normal((2000, 4)).astype(np.float32)
    assert kmeans_fit(x, 10, max_points_per_centroid=20).shape == (10, 4)
    with pytest.raises(ValueError, match="k-means needs"):
        kmeans_fit(x[:5], 6)


def test_hierarchy_levels_and_parents(caplog):
    rng = np.random.default_rng(4)
    # 4 far-apart groups, each of 5 tight sub-blobs: level 1 (k=4) must find the groups.
    groups = normalize(rng.standard_normal((4, 32)))
    subs = np.concatenate([normalize(g + 0.08 * rng.standard_normal((5, 32))) for g in groups])
    x, sub_truth = _blobs(rng, subs, 40, 0.01)
    x = normalize(x)
    group_truth = sub_truth // 5
    hier = hierarchical_kmeans(x, [(20, 0), (4, 2)], niter=25, seed=0)
    assert hier.ks == [20, 4]
    assert hier.labels.shape == (800, 2)
    assert np.array_equal(hier.labels[:, 1], hier.parents[0][hier.labels[:, 0]])
    assert _same_partition(hier.labels[:, 1], group_truth)
    assert hier.sizes(1).sum() == 800 and sorted(hier.sizes(1).tolist()) == [200] * 4
    assert np.allclose(np.linalg.norm(hier.centroids[1], axis=1), 1, atol=1e-5)
    # tiny pools: k is clamped with a warning
    with caplog.at_level(logging.WARNING, logger="lvd"):
        small = hierarchical_kmeans(x[:6], [(10, 0), (3, 1)], seed=0)
    assert small.ks == [6, 3] and "using k=6" in caplog.text


def test_resampling_refits_on_the_points_nearest_each_centroid():
    rng = np.random.default_rng(5)
    # Blob A: a dense core at 0 with a tail on [1, 3]; blob B far away at 10.
    core, tail, far = rng.normal(0, 0.1, 1000), rng.uniform(1, 3, 200), rng.normal(10, 0.1, 500)
    x = np.concatenate([core, tail, far]).astype(np.float32)[:, None]
    plain = kmeans(x, 2, spherical=False, seed=0, max_points_per_centroid=1000)  # fit on all points
    a = int(np.argmin(plain.centroids[:, 0]))
    members = x[:1200, 0].astype(np.float64)
    assert plain.centroids[a, 0] == pytest.approx(members.mean(), abs=1e-5)  # tail pulls it to ~0.33
    resampled = kmeans(
        x, 2, spherical=False, seed=0, max_points_per_centroid=1000, resampling_steps=1, resample_size=500
    )
    # Reference: the mean of the 500 members of A nearest its plain centroid (all in the core).
    nearest = members[np.argsort(np.abs(members - plain.centroids[a, 0]))[:500]]
    ra = int(np.argmin(resampled.centroids[:, 0]))
    assert resampled.centroids[ra, 0] == pytest.approx(nearest.mean(), abs=1e-4)
    assert resampled.centroids[ra, 0] < plain.centroids[a, 0] - 0.2
    assert np.array_equal(
        resampled.labels, (x[:, 0] > 5).astype(int) if ra == 0 else (x[:, 0] < 5).astype(int)
    )


def test_resampling_on_degenerate_data_keeps_a_valid_clustering(caplog):
    # 20 copies of one point and 2 of another: k=4 leaves clusters empty, so resampling has < k points.
    x = np.concatenate([np.tile([[1.0, 0.0]], (20, 1)), np.tile([[0.0, 1.0]], (2, 1))]).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="lvd"):
        res = kmeans(x, 4, spherical=True, seed=0, resampling_steps=3, resample_size=1)
    assert "resampling found only" in caplog.text
    # every point sits on its nearest centroid: the two distinct points end in different clusters
    assert res.labels[0] != res.labels[-1] and np.allclose(res.distance, 0, atol=1e-6)
