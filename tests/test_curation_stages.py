"""dedup -> cluster -> retrieve -> sample drivers on a hand-made images + embeddings table."""

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lvd.curation.knn import normalize
from lvd.jobs.stage import StageContext
from lvd.jobs.stages import cluster, dedup, retrieve, sample
from lvd.schemas import layout
from lvd.schemas.job_spec import parse_job_spec
from lvd.schemas.tables import (
    CENTROIDS,
    DEDUP,
    IMAGES,
    embeddings_schema,
    write_parquet_atomic,
)

N_POOL = 120


def _images(rows):
    n = len(rows)
    cols = {name: [None] * n for name in IMAGES.names}
    for i, r in enumerate(rows):
        for k, v in r.items():
            cols[k][i] = v
    return pa.table(cols, schema=IMAGES)


def _embeddings(ids, vectors, model, dim):
    vec = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel().astype(np.float16)), dim)
    mask = pa.array([bool(np.isnan(v).any()) for v in vectors])
    vec = pa.FixedSizeListArray.from_arrays(vec.values, dim, mask=mask)
    return pa.table(
        {
            "image_id": pa.array(ids, pa.int64()),
            "model": [model] * len(ids),
            "vector": vec,
            "error": [None] * len(ids),
        },
        schema=embeddings_schema(dim),
    )


def _unit_near(rng, v, noise):
    u = rng.standard_normal(v.shape)
    return normalize((v + noise * u / np.linalg.norm(u))[None])[0]


@pytest.fixture()
def world(tmp_path):
    rng = np.random.default_rng(0)
    pool_ids = 1000 + np.arange(N_POOL)
    seed_core, seed_near, seed_clus, eval_ids = (
        [2001, 2002, 2003],
        [3001, 3002],
        [4000 + i for i in range(5)],
        [5001],
    )
    rows = [
        dict(
            image_id=int(i),
            dataset="pool",
            uri=f"p{i}",
            kind="file",
            path=f"p{i}",
            sha256=f"h{i}",
            width=64,
            height=64,
            format="png",
            status="ok",
        )
        for i in pool_ids
    ]
    rows[1]["sha256"] = rows[0]["sha256"]  # 1001: the same file as 1000
    rows[2]["width"] = 128  # 1002: the larger of the near pair (1002, 1003)
    rows[5].update(status="error", error="truncated", sha256=None, width=None, height=None)  # 1005
    for ds, ids in [
        ("seed:core", seed_core),
        ("seed:near", seed_near),
        ("seed:clus", seed_clus),
        ("eval:holdout", eval_ids),
    ]:
        rows += [
            dict(
                image_id=i,
                dataset=ds,
                uri=f"s{i}",
                kind="file",
                path=f"s{i}",
                sha256=f"h{i}",
                width=8,
                height=8,
                format="png",
                status="ok",
            )
            for i in ids
        ]
    # Ingest part 0 holds the pool, part 1 the seed and eval sets; embed part i holds part i's vectors.
    for i, part_rows in enumerate([rows[:N_POOL], rows[N_POOL:]]):
        write_parquet_atomic(
            _images(part_rows), layout.table_part(tmp_path / "out", layout.IMAGES, i), IMAGES
        )

    # retrieval vectors: 3 blobs of 40 pool images in 32-d; copy-detection vectors: random 128-d
    centers = normalize(rng.standard_normal((3, 32)))
    retr = normalize(np.repeat(centers, 40, axis=0) + 0.15 * rng.standard_normal((N_POOL, 32)))
    copy = normalize(rng.standard_normal((N_POOL, 128)))
    copy[1], retr[1] = copy[0], retr[0]
    copy[3] = _unit_near(rng, copy[2], 0.3)
    copy[6] = np.nan  # 1006: embed failed -> null vector
    retr[6] = np.nan
    seed_retr = {
        3001: _unit_near(rng, retr[50], 0.05),
        3002: _unit_near(rng, retr[90], 0.05),
        **{i: _unit_near(rng, centers[0], 0.1) for i in seed_clus},
        **{i: normalize(rng.standard_normal((1, 32)))[0] for i in seed_core},
    }
    eval_copy = _unit_near(rng, copy[4], 0.3)  # the eval image is a copy of 1004
    sid = list(seed_retr)
    tables = [
        (0, _embeddings(pool_ids, retr, "retrieval", 32)),
        (1, _embeddings(sid, np.stack([seed_retr[i] for i in sid]), "retrieval", 32)),
        (0, _embeddings(pool_ids, copy, "copy_detection", 128)),
        (1, _embeddings(eval_ids, eval_copy[None], "copy_detection", 128)),
    ]
    for i, t in tables:
        model = t["model"][0].as_py()
        write_parquet_atomic(t, layout.table_part(tmp_path / "out", layout.EMBEDDINGS, i, model), t.schema)
    src = [{"uri": "/nowhere"}]
    spec = parse_job_spec(
        {
            "name": "tiny",
            "output_dir": str(tmp_path / "out"),
            "pool": src,
            "seeds": [
                {"name": "core", "sources": src, "strategy": "as_is"},
                {"name": "near", "sources": src, "strategy": "sample", "k": 3},
                {
                    "name": "clus",
                    "sources": src,
                    "strategy": "cluster",
                    "min_seed_images": 3,
                    "images_per_cluster": 4,
                    "max_images": 10,
                },
            ],
            "eval_sets": [{"name": "holdout", "sources": src}],
            "embedding": {
                "retrieval": {"weights": "random"},
                "copy_detection": {"arch": "vit_small", "weights": "random"},
            },
            "dedup": {"k": 8},
            "clustering": {"levels": [{"k": 6}, {"k": 3, "resampling_steps": 1}]},
            "sampling": {"target_size": 30, "max_repeats": 2, "seed": 1},
        }
    )
    return spec, tmp_path / "out", retr, pool_ids


def _run(spec, out, name, module):
    ctx = StageContext(spec=spec, out_dir=out, stage=module.STAGE)
    ctx.stage_dir.mkdir(parents=True, exist_ok=True)
    return module.run(ctx)


def _run_all(spec, out):
    return {
        name: _run(spec, out, name, m)
        for name, m in [("dedup", dedup), ("cluster", cluster), ("retrieve", retrieve), ("sample", sample)]
    }


def test_stages_on_a_tiny_pool(ray_local, world):
    spec, out, retr, pool_ids = world
    s = _run_all(spec, out)

    assert s["dedup"].images == N_POOL - 2  # 1005 failed to decode, 1006 to embed
    d = s["dedup"]
    assert (d.exact, d.copy, d.eval_overlap, d.kept) == (1, 1, 1, N_POOL - 5)
    assert s["dedup"].ivf_recall is None and s["dedup"].model == "copy_detection"
    # resume files go once the table is written
    assert [p.name for p in layout.stage_dir(out, "dedup").iterdir() if p.is_dir()] == []
    d = {r["image_id"]: r for r in layout.read_table(out, layout.DEDUP).to_pylist()}
    assert d[1001] == {
        "image_id": 1001,
        "component_id": 1000,
        "keep": False,
        "reason": "exact",
        "duplicate_of": 1000,
    }
    assert d[1003] == {
        "image_id": 1003,
        "component_id": 1002,
        "keep": False,
        "reason": "copy",
        "duplicate_of": 1002,
    }
    assert d[1004]["reason"] == "eval-overlap" and not d[1004]["keep"]
    assert 1005 not in d and 1006 not in d
    kept = sorted(i for i, r in d.items() if r["keep"])

    assert s["cluster"] == cluster.ClusterSummary(images=N_POOL - 5, levels=[6, 3], requested_levels=[6, 3])
    cl = layout.read_table(out, layout.CLUSTERS)
    assert sorted(cl["image_id"].to_pylist()) == kept
    cent = layout.read_table(out, layout.CENTROIDS)
    assert cent.schema.equals(CENTROIDS, check_metadata=False)
    lv0 = cent.filter(pa.compute.equal(cent["level"], 0)).to_pylist()
    assert len(lv0) == 6 and sum(r["size"] for r in lv0) == len(kept)
    # each level-0 cluster's parent is the level-1 cluster of its members
    parent = {r["cluster_id"]: r["parent_id"] for r in lv0}
    assert all(parent[c[0]] == c[1] for c in cl["cluster_ids"].to_pylist())

    assert s["retrieve"].per_seed_set["core"] == 3 and s["retrieve"].per_seed_set["near"] == 6
    assert 0 < s["retrieve"].per_seed_set["clus"] <= 10
    rt = layout.read_table(out, layout.RETRIEVED)
    near = rt.filter(pa.compute.equal(rt["seed_set"], "near"))
    # brute force over the kept pool: the 3 nearest of seed 3001 (made next to pool row 50)
    kept_rows = np.searchsorted(pool_ids, kept)
    seed_part = pq.read_table(layout.table_part(out, layout.EMBEDDINGS, 1, "retrieval"))
    seed_vec = seed_part.filter(pa.compute.equal(seed_part["image_id"], 3001))
    q = normalize(np.array(seed_vec["vector"][0].as_py(), dtype=np.float32)[None])
    ref = np.array(kept)[np.argsort(-(normalize(retr[kept_rows]) @ q[0]))[:3]]
    got = near.filter(pa.compute.equal(near["seed_id"], 3001)).sort_by("rank")["image_id"].to_pylist()
    assert got == ref.tolist() and got[0] == 1050
    clus = rt.filter(pa.compute.equal(rt["seed_set"], "clus"))["image_id"].to_numpy()
    assert (clus < 1040).all() and set(clus) <= set(kept)  # the seeds sit in blob 0: rows 0..39

    cur = layout.read_table(out, layout.CURATED)
    assert cur["image_id"].to_pylist() == sorted(set(cur["image_id"].to_pylist()))
    assert s["sample"].balanced == 30
    retrieved_ids = set(rt["image_id"].to_pylist())
    by_id = {r["image_id"]: r for r in cur.to_pylist()}
    assert retrieved_ids <= set(by_id)
    assert {2001, 2002, 2003} <= set(by_id) and by_id[2001]["sources"] == ["core"]
    balanced = {i for i, r in by_id.items() if "balanced" in r["sources"]}
    assert balanced <= set(kept)
    # balanced images appear as often as drawn (retrieval adds no extra copy), retrieved-only ones once
    assert sum(r["repeats"] for r in by_id.values() if "balanced" in r["sources"]) == 30
    assert all(r["repeats"] == 1 for r in by_id.values() if "balanced" not in r["sources"])
    assert s["sample"].samples == sum(r["repeats"] for r in by_id.values())
    assert s["sample"].images == len(by_id) and s["sample"].retrieved == len(retrieved_ids)


def test_rerun_is_deterministic(ray_local, world, tmp_path):
    spec, out, _, _ = world
    _run_all(spec, out)
    tables = (layout.DEDUP, layout.CLUSTERS, layout.RETRIEVED, layout.CURATED)
    first = {t: layout.read_table(out, t) for t in tables}
    cent = layout.read_table(out, layout.CENTROIDS)
    _run_all(spec, out)
    for t, table in first.items():
        assert layout.read_table(out, t).equals(table), t.name
        # dedup: one part per ingest part (the seed/eval part's is empty); retrieve: per seed set, one
        # per ingest part (as_is: 2), per query part with vectors (sample: 2) or one (cluster)
        want_parts = {layout.DEDUP: 2, layout.RETRIEVED: 5}.get(t, 1)
        assert len(layout.list_parts(layout.table_dir(out, t))) == want_parts
    assert layout.read_table(out, layout.CENTROIDS).equals(cent)


def _split_pool_parts(src, dst, rng):
    """A copy of a job's output whose pool retrieval vectors lie in three embed parts (numbers 0, 2
    and 3; the seeds stay in 1), with DEDUP dealt into parts of the same numbers (1: empty)."""
    shutil.copytree(src, dst)
    pool = pq.read_table(layout.table_part(dst, layout.EMBEDDINGS, 0, "retrieval"))
    dedup_rows = layout.read_table(dst, layout.DEDUP)
    layout.table_part(dst, layout.DEDUP, 0).unlink()
    pieces = np.array_split(rng.permutation(pool.num_rows), 3)
    for number, rows in zip((0, 2, 3), pieces, strict=True):
        part = pool.take(pa.array(rows))
        write_parquet_atomic(
            part, layout.table_part(dst, layout.EMBEDDINGS, number, "retrieval"), part.schema
        )
        mine = dedup_rows.filter(pa.compute.is_in(dedup_rows["image_id"], part["image_id"]))
        write_parquet_atomic(mine, layout.table_part(dst, layout.DEDUP, number), DEDUP)
    write_parquet_atomic(DEDUP.empty_table(), layout.table_part(dst, layout.DEDUP, 1), DEDUP)


def test_cluster_and_sample_over_several_parts_equal_one_part(ray_local, world, tmp_path, monkeypatch):
    """The per-part passes see only parts: the same clusters, centroids, retrievals and curated rows
    whether the pool's vectors come in one part or in three (dedup parts lining up with them), and
    whatever the number of curated buckets."""
    spec, out, _, _ = world
    _run(spec, out, "dedup", dedup)
    split = tmp_path / "split"
    _split_pool_parts(out, split, np.random.default_rng(5))
    stages = (("cluster", cluster), ("retrieve", retrieve), ("sample", sample))
    for name, m in stages:
        _run(spec, out, name, m)
    monkeypatch.setattr(sample, "ROWS_PER_BUCKET", 7)  # the split run merges in several buckets
    for name, m in stages:
        _run(spec, split, name, m)
    assert [layout.part_index(p) for p in layout.list_parts(layout.table_dir(split, layout.CLUSTERS))] == [
        0,
        2,
        3,
    ]
    for t, keys in ((layout.CLUSTERS, ["image_id"]), (layout.RETRIEVED, ["seed_set", "image_id", "seed_id"])):
        one, three = (layout.read_table(f, t).sort_by([(k, "ascending") for k in keys]) for f in (out, split))
        assert three.equals(one), t.name
    assert layout.read_table(split, layout.CENTROIDS).equals(layout.read_table(out, layout.CENTROIDS))
    curated_parts = layout.list_parts(layout.table_dir(split, layout.CURATED))
    assert len(curated_parts) > 3
    # parts in order are sorted by image_id like the one-part table, and hold the same rows
    assert layout.read_table(split, layout.CURATED).equals(layout.read_table(out, layout.CURATED))


def test_retrieve_over_parts_equals_the_in_memory_reference(ray_local, world):
    """Sample-based retrieval (sharded search) and cluster-based retrieval with the seed set's own
    k-means (`num_clusters`, k-means over parts) give the rows of the whole-table functions."""
    from lvd.curation.kmeans import kmeans
    from lvd.curation.knn import build_index
    from lvd.curation.retrieval import retrieve_by_cluster, retrieve_by_sample
    from lvd.curation.stage_io import kept_pool_ids, load_images, load_vectors

    spec, out, _, _ = world
    seeds = [s.model_copy(update={"num_clusters": 5}) if s.name == "clus" else s for s in spec.seeds]
    spec = spec.model_copy(update={"seeds": seeds})
    for name, m in (("dedup", dedup), ("cluster", cluster), ("retrieve", retrieve)):
        _run(spec, out, name, m)
    got = layout.read_table(out, layout.RETRIEVED)

    embed_parts = layout.list_parts(layout.table_dir(out, layout.EMBEDDINGS), "retrieval")
    image_parts = layout.list_parts(layout.table_dir(out, layout.IMAGES))
    pool_ids, pool = load_vectors(
        embed_parts, "retrieval", kept_pool_ids(layout.list_parts(layout.table_dir(out, layout.DEDUP)))
    )

    def seed_vectors(name):
        ids = load_images(image_parts, f"seed:{name}", ["image_id"])["image_id"].to_numpy()
        return load_vectors(embed_parts, "retrieval", ids)

    def rows(name):
        t = got.filter(pa.compute.equal(got["seed_set"], name))
        return t.sort_by([("seed_id", "ascending"), ("rank", "ascending"), ("image_id", "ascending")])

    near_ids, near = seed_vectors("near")
    index, _ = build_index(pool, exact_below=pool.shape[0] + 1)
    want = retrieve_by_sample(index, pool_ids, near, near_ids, "near", k=3)
    assert rows("near").equals(want) and want.num_rows == 6

    cfg = spec.clustering
    km = kmeans(pool, 5, niter=cfg.niter, spherical=cfg.spherical, seed=cfg.seed,
                max_points_per_centroid=cfg.max_points_per_centroid, assign_dtype=cfg.assign_dtype,
                ids=pool_ids)  # fmt: skip
    _, clus = seed_vectors("clus")
    want = retrieve_by_cluster(
        pool_ids, km.labels, km.distance, km.centroids, clus, "clus",
        min_seed_images=3, images_per_cluster=4, max_images=10,
    )  # fmt: skip
    have = got.filter(pa.compute.equal(got["seed_set"], "clus"))
    assert have.equals(want) and 0 < want.num_rows <= 10
