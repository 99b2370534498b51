"""The decisions table's plain pieces: bucket scatter, duplicate cosines, the per-bucket join."""

import numpy as np
import pyarrow as pa

from lvd.curation import decisions as dec
from lvd.curation.curated import bucket_bounds, bucket_of


def _pool(rows: list[dict]) -> pa.Table:
    base = {
        "uri": "u",
        "ingest": "ok",
        "ingest_error": None,
        "embedded": True,
        "dedup": "kept",
        "component_id": None,
        "duplicate_of": None,
        "cluster_ids": [0, 0],
        "cluster_distance": 0.1,
        "draw": 0.5,
    }
    return pa.Table.from_pylist([{**base, **r} for r in rows], schema=dec.POOL)


def test_scatter_puts_every_row_in_the_bucket_of_its_key(tmp_path):
    ids = np.array([5, 900, 17, 450, 999, 0], np.int64)
    bounds = bucket_bounds(0, 999, 4)
    table = pa.table({"image_id": ids, "eval_match": ids + 1, "eval_cosine": np.ones(6, np.float32)})
    table = table.cast(dec.EVAL_ROWS)
    assert dec.scatter(table, bounds, tmp_path, 3, dec.EVAL_ROWS) == 6
    seen = []
    for b in range(4):
        got = dec.read_bucket(tmp_path, b, dec.EVAL_ROWS)["image_id"].to_numpy()
        assert (bucket_of(got, bounds) == b).all()
        seen += got.tolist()
    assert sorted(seen) == sorted(ids.tolist())


def test_pair_cosines_are_dot_products_with_the_image_lost_to():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(4, 8)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    vec = pa.list_(pa.float32(), 8)
    dups = pa.table(
        {
            "image_id": pa.array([10, 11, 12], pa.int64()),
            "duplicate_of": pa.array([1, 2, 3], pa.int64()),  # 3 is not among the representatives
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(v[[0, 1, 2]].ravel()), 8).cast(vec),
        }
    )
    reps = pa.table(
        {
            "image_id": pa.array([2, 1], pa.int64()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(v[[3, 2]].ravel()), 8).cast(vec),
        }
    )
    got = dec.pair_cosines(dups, reps).to_pydict()
    assert got["image_id"] == [10, 11]
    np.testing.assert_allclose(got["duplicate_cosine"], [v[0] @ v[2], v[1] @ v[3]], rtol=1e-5)


def test_merge_bucket_tells_each_image_where_it_ended():
    pool = _pool(
        [
            {"image_id": 1, "ingest": "error", "ingest_error": "truncated", "embedded": False, "dedup": None},
            {"image_id": 2, "embedded": False, "dedup": None},
            {"image_id": 3, "dedup": "copy", "duplicate_of": 4},
            {"image_id": 4},
            {"image_id": 5},
            {"image_id": 6},
        ]
    )
    retrieved = pa.Table.from_pylist(
        [
            {"image_id": 6, "seed_set": "s", "seed_id": 100, "strategy": "sample", "rank": 1, "score": 0.9},
            {"image_id": 6, "seed_set": "c", "seed_id": None, "strategy": "cluster", "rank": 0, "score": 0.8},
            {"image_id": 77, "seed_set": "s", "seed_id": 101, "strategy": "sample", "rank": 0, "score": 0.7},
        ],
        schema=dec.RETRIEVED_ROWS,
    )
    curated = pa.Table.from_pylist(
        [
            {"image_id": 4, "sources": ["balanced"], "repeats": 2},
            {"image_id": 6, "sources": ["c", "s"], "repeats": 1},
        ],
        schema=dec.CURATED_ROWS,
    )
    shards = pa.Table.from_pylist(
        [
            {"image_id": 4, "shard": "lvd-000000.tar", "key": "k4b"},
            {"image_id": 4, "shard": "lvd-000000.tar", "key": "k4a"},
            {"image_id": 6, "shard": "lvd-000001.tar", "key": "k6"},
        ],
        schema=dec.SHARD_ROWS,
    )
    cosines = pa.Table.from_pylist([{"image_id": 3, "duplicate_cosine": 0.93}], schema=dec.COSINE_ROWS)
    out = dec.merge_bucket(pool, retrieved, curated, shards, dec.EVAL_ROWS.empty_table(), cosines)
    rows = {r["image_id"]: r for r in out.to_pylist()}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]  # pool images only (77 is another bucket's or a seed)
    assert (rows[1]["stage"], rows[1]["reason"]) == ("ingest", "unreadable")
    assert rows[2]["stage"] == "embed"
    assert (rows[3]["stage"], rows[3]["reason"]) == ("dedup", "copy")
    assert abs(rows[3]["duplicate_cosine"] - 0.93) < 1e-6
    assert rows[4]["outcome"] == dec.IN_OUTPUT and rows[4]["repeats"] == 2
    assert rows[4]["keys"] == ["k4a", "k4b"] and rows[4]["reason"] == "balanced"
    assert (rows[5]["outcome"], rows[5]["stage"], rows[5]["repeats"]) == (dec.DROPPED, "sample", 0)
    assert [r["seed_set"] for r in rows[6]["retrieved_by"]] == ["c", "s"]
    assert rows[6]["retrieved_by"][1]["seed_id"] == 100 and rows[6]["reason"] == "c+s"
    assert rows[5]["retrieved_by"] == [] and rows[5]["keys"] is None
    story = dec.story(rows[6])
    assert "neighbour #2 of seed image 100" in story and "IN THE OUTPUT" in story
