import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lvd.curation import selection
from lvd.curation.cluster_labels import read_labels
from lvd.curation.kmeans import (
    hierarchical_kmeans,
    kmeans,
    kmeans_assign,
    kmeans_fit,
    level_labels,
    mean_by_label,
)
from lvd.curation.knn import normalize
from lvd.curation.knn_sharded import read_vector_part
from lvd.curation.stage_io import load_vectors
from lvd.jobs.kmeans_parts import hierarchical_kmeans_over_parts, kept_pool_parts, kmeans_over_parts
from lvd.jobs.workers import LocalFanout
from lvd.schemas import layout
from lvd.schemas.tables import DEDUP, embeddings_schema, write_parquet_atomic


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


def test_lloyd_passes_update_to_the_means_of_all_points():
    """After a fit on a capped sample, a Lloyd pass moves each centroid to the float64 mean of all
    the points nearest it, and passes do not raise the objective."""
    rng = np.random.default_rng(4)
    x, _ = _blobs(rng, 6 * rng.standard_normal((8, 6)), 300, 1.5)
    kw = dict(spherical=False, niter=5, max_points_per_centroid=10, seed=0, assign_dtype="float32")
    fitted = kmeans(x, 8, **kw)
    one = kmeans(x, 8, lloyd_passes=1, **kw)
    for j in range(8):
        members = x[fitted.labels == j].astype(np.float64)
        assert np.allclose(one.centroids[j], members.mean(0), atol=1e-5)
    assert kmeans(x, 8, lloyd_passes=3, **kw).objective <= one.objective <= fitted.objective


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


# ---------------------------------------------------------------- k-means over parts


def _write_embed_parts(folder, ids, x, parts, rng, model="retrieval"):
    """`x` (rows keyed by `ids`) as float16 embedding parts in a random split; returns their paths."""
    paths = []
    for i, rows in enumerate(np.array_split(rng.permutation(len(ids)), parts)):
        vec = pa.FixedSizeListArray.from_arrays(pa.array(x[rows].ravel().astype(np.float16)), x.shape[1])
        table = pa.table(
            {
                "image_id": pa.array(ids[rows]),
                "model": [model] * len(rows),
                "vector": vec,
                "error": [None] * len(rows),
            },
            schema=embeddings_schema(x.shape[1]),
        )
        paths.append(layout.part_path(folder, i, model))
        write_parquet_atomic(table, paths[-1], table.schema)
    return paths


def _write_dedup_parts(folder, embed_paths, kept, shuffle=None):
    """One DEDUP part per embed part (same number), or, with `shuffle`, the same rows dealt at random."""
    tables = []
    for p in embed_paths:
        ids = pq.read_table(p, columns=["image_id"])["image_id"].to_numpy()
        tables.append(
            pa.table(
                {
                    "image_id": pa.array(ids),
                    "component_id": pa.array(ids),
                    "keep": pa.array(np.isin(ids, kept)),
                    "reason": pa.nulls(len(ids), pa.string()),
                    "duplicate_of": pa.nulls(len(ids), pa.int64()),
                },
                schema=DEDUP,
            )
        )
    if shuffle is not None:
        whole = pa.concat_tables(tables)
        order = shuffle.permutation(whole.num_rows)
        tables = [whole.take(pa.array(s)) for s in np.array_split(order, len(tables))]
    paths = [layout.part_path(folder, layout.part_index(p)) for p in embed_paths]
    for t, p in zip(tables, paths, strict=True):
        write_parquet_atomic(t, p, DEDUP)
    return paths


def _pool(rng, n=3000, d=16, centers=12):
    c = rng.standard_normal((centers, d))
    x = (c[rng.integers(0, centers, n)] + 0.7 * rng.standard_normal((n, d))).astype(np.float32)
    return rng.choice(2**62, n, replace=False).astype(np.int64), x


def _labels_of(result):
    """(ids, labels, distances) of all label parts, in id order."""
    got = [read_labels(p) for p in result.label_parts]
    ids = np.concatenate([g[0] for g in got])
    order = np.argsort(ids)
    return ids[order], np.concatenate([g[1] for g in got])[order], np.concatenate([g[2] for g in got])[order]


@pytest.mark.parametrize(
    "assign_dtype,steps,cap,force_histograms,passes",
    [
        ("bfloat16", 0, 256, False, 0),
        ("bfloat16", 2, 256, False, 0),
        ("bfloat16", 3, 20, True, 2),
        ("float32", 2, 30, True, 0),
    ],
)
def test_kmeans_over_parts_equals_kmeans(
    tmp_path, monkeypatch, assign_dtype, steps, cap, force_histograms, passes
):
    """Several parts, a fit sample capped below n, full-data Lloyd passes, resampling steps (the r
    nearest found by histogram passes when forced): the same centroids, labels and distances as the
    whole-table k-means."""
    histograms = []
    if force_histograms:
        monkeypatch.setattr(selection, "COLLECT_MIN", 50)
        monkeypatch.setattr(selection, "COLLECT_PER_GROUP", 4)
        real = selection.Selection.add_histograms
        monkeypatch.setattr(
            selection.Selection, "add_histograms", lambda self, h: histograms.append(1) or real(self, h)
        )
    rng = np.random.default_rng(7)
    ids, x = _pool(rng)
    paths = _write_embed_parts(tmp_path / "embed", ids, x, 5, rng)
    ref_ids, ref_x = load_vectors(paths, "retrieval", ids)
    ref = kmeans(
        ref_x,
        10,
        ids=ref_ids,
        resampling_steps=steps,
        max_points_per_centroid=cap,
        seed=3,
        assign_dtype=assign_dtype,
        lloyd_passes=passes,
    )
    fanout = LocalFanout()
    parts, counts = kept_pool_parts(paths, None, fanout=fanout)
    got = kmeans_over_parts(
        parts,
        10,
        tmp_path / "labels",
        n=sum(counts),
        resampling_steps=steps,
        max_points_per_centroid=cap,
        seed=3,
        assign_dtype=assign_dtype,
        fanout=fanout,
        lloyd_passes=passes,
    )
    got_ids, labels, dist = _labels_of(got)
    assert np.array_equal(got_ids, ref_ids) and got.images == len(ids)
    if assign_dtype == "bfloat16":  # row-by-row the same whatever the chunk: exactly equal
        assert np.array_equal(got.centroids, ref.centroids) and np.array_equal(dist, ref.distance)
    else:  # FAISS float32: a distance may differ in its last bit with the chunk's size
        assert np.allclose(got.centroids, ref.centroids, atol=1e-6) and np.allclose(
            dist, ref.distance, atol=1e-6
        )
    assert np.array_equal(labels, ref.labels)
    assert np.array_equal(got.sizes, np.bincount(ref.labels, minlength=10))
    assert bool(histograms) == force_histograms


def test_hierarchical_over_parts_equals_hierarchical(tmp_path):
    rng = np.random.default_rng(8)
    ids, x = _pool(rng, n=2500, d=24, centers=20)
    paths = _write_embed_parts(tmp_path / "embed", ids, x, 4, rng)
    ref_ids, ref_x = load_vectors(paths, "retrieval", ids)
    levels = [(16, 2), (5, 2), (2, 0)]
    ref = hierarchical_kmeans(
        ref_x, levels, seed=5, assign_dtype="bfloat16", ids=ref_ids, max_points_per_centroid=40
    )
    fanout = LocalFanout()
    parts, counts = kept_pool_parts(paths, None, fanout=fanout)
    got = hierarchical_kmeans_over_parts(
        parts,
        levels,
        tmp_path / "labels",
        n=sum(counts),
        seed=5,
        assign_dtype="bfloat16",
        max_points_per_centroid=40,
        fanout=fanout,
    )
    assert got.ks == ref.ks == [16, 5, 2]
    assert all(np.array_equal(a, b) for a, b in zip(got.centroids, ref.centroids, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(got.parents, ref.parents, strict=True))
    assert all(np.array_equal(got.sizes[lv], ref.sizes(lv)) for lv in range(3))
    _, labels, dist = _labels_of(got)
    assert np.array_equal(level_labels(labels, got.parents), ref.labels)
    assert np.array_equal(dist, ref.distance)


def test_kept_pool_from_aligned_and_unaligned_dedup_parts(tmp_path, caplog):
    """Kept points are the same whether each worker reads the dedup part of its number (aligned),
    every dedup part (numbers differ), or finds that same-numbered parts do not line up."""
    rng = np.random.default_rng(9)
    ids, x = _pool(rng, n=400)
    x[5] = np.nan  # a failed embed: no vector
    paths = _write_embed_parts(tmp_path / "embed", ids, x, 4, rng)
    kept = ids[rng.random(400) < 0.7]
    want, _ = load_vectors(paths, "retrieval", kept)
    fanout = LocalFanout()
    cases = {
        "aligned": _write_dedup_parts(tmp_path / "aligned", paths, kept),
        "shuffled": _write_dedup_parts(tmp_path / "shuffled", paths, kept, shuffle=rng),
        "one part": [_write_one_dedup(tmp_path / "one", paths, kept)],
    }
    for name, dedup in cases.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lvd"):
            parts, counts = kept_pool_parts(paths, dedup, fanout=fanout)
        got = np.sort(np.concatenate([read_vector_part(p)[0] for p in parts]))
        assert np.array_equal(got, want) and sum(counts) == want.size, name
        assert ("do not line up" in caplog.text) == (name == "shuffled"), name
        assert all(isinstance(p.rows, Path) for p in parts) == (name == "aligned"), name


def _write_one_dedup(folder, embed_paths, kept):
    ids = np.concatenate([pq.read_table(p, columns=["image_id"])["image_id"].to_numpy() for p in embed_paths])
    table = pa.table(
        {
            "image_id": pa.array(ids),
            "component_id": pa.array(ids),
            "keep": pa.array(np.isin(ids, kept)),
            "reason": pa.nulls(len(ids), pa.string()),
            "duplicate_of": pa.nulls(len(ids), pa.int64()),
        },
        schema=DEDUP,
    )
    path = layout.part_path(folder, 0)
    write_parquet_atomic(table, path, DEDUP)
    return path


def test_kmeans_over_parts_on_ray_equals_in_process(ray_local, tmp_path):
    rng = np.random.default_rng(10)
    ids, x = _pool(rng, n=1500)
    paths = _write_embed_parts(tmp_path / "embed", ids, x, 3, rng)
    results = []
    for name, fanout in (("local", LocalFanout()), ("ray", None)):
        parts, counts = kept_pool_parts(paths, None, fanout=fanout)
        res = kmeans_over_parts(
            parts,
            8,
            tmp_path / name,
            n=sum(counts),
            resampling_steps=1,
            max_points_per_centroid=50,
            assign_dtype="bfloat16",
            fanout=fanout,
        )
        results.append((res.centroids, *_labels_of(res)))
    assert all(np.array_equal(a, b) for a, b in zip(*results, strict=True))
