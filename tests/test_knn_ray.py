"""kNN search on Ray actors gives exactly the in-process results (flat and IVF), and so does dedup;
the sharded search over parts equals one index over the whole database."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from test_curation_stages import _run, world  # noqa: F401  (world is a fixture)

from lvd.curation.knn import build_index, normalize, recall_against_exact, search
from lvd.curation.knn_ray import search_parts
from lvd.curation.knn_sharded import Shard, TopKWriter, VectorPart, merge_topk, read_vector_part
from lvd.jobs.stages import dedup
from lvd.schemas import layout
from lvd.schemas.job_spec import RetrievalSpec
from lvd.schemas.tables import embeddings_schema, write_parquet_atomic

N, DIM, K, CHUNK = 4000, 32, 10, 300


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return normalize(np.random.default_rng(0).standard_normal((N, DIM)))


def test_dedup_stage_same_with_one_or_two_shards(ray_local, world):  # noqa: F811
    spec, out, _, _ = world
    tables = {}
    for actors in (1, 2):
        # small chunks so every query part sends several chunks to both shards
        s = spec.model_copy(
            update={"dedup": spec.dedup.model_copy(update={"chunk_size": 16, "search_actors": actors})}
        )
        summary = _run(s, out, "dedup", dedup)
        assert summary.shards == actors and summary.copy == 1 and summary.eval_overlap == 1
        tables[actors] = layout.read_table(out, layout.DEDUP)
    assert tables[2].equals(tables[1])


def _write_vector_parts(root: Path, n_parts: int, per_part: int, dim: int, seed: int) -> list[Path]:
    """Embed parts of random vectors (ids random, not sorted by part) and, beside each, a rows file
    with a `keep` flag (about 80% kept), like a DEDUP part."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(2**40, size=n_parts * per_part, replace=False).astype(np.int64)
    x = normalize(rng.standard_normal((ids.size, dim))).astype(np.float16)
    paths = []
    for p in range(n_parts):
        sel = slice(p * per_part, (p + 1) * per_part)
        emb = pa.table(
            {
                "image_id": pa.array(ids[sel]),
                "model": ["retrieval"] * per_part,
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(x[sel].ravel()), dim),
                "error": pa.nulls(per_part, pa.string()),
            },
            schema=embeddings_schema(dim),
        )
        path = layout.part_path(root / "embed", p, "retrieval")
        write_parquet_atomic(emb, path, emb.schema)
        keep = pa.table({"image_id": pa.array(ids[sel]), "keep": pa.array(rng.random(per_part) < 0.8)})
        (root / "kept").mkdir(exist_ok=True)
        pq.write_table(keep, layout.part_path(root / "kept", p))
        paths.append(path)
    return paths


@pytest.mark.parametrize("shards", [0, 2])
@pytest.mark.parametrize("build", ["flat", "ivf"])
def test_search_parts_top_k_equals_one_index(ray_local, tmp_path, build, shards):
    """The retrieval contract: top-k rows of every query part equal one in-process index's over the
    whole database (ids, ranks and scores), the database limited to the kept images of each part.
    Shard count 0 (lvd's choice): a small flat search runs in one task, an IVF one on one actor."""
    embed = _write_vector_parts(tmp_path, n_parts=4, per_part=700, dim=DIM, seed=1)
    database = [
        VectorPart(p, rows=layout.part_path(tmp_path / "kept", i), where=pc.field("keep"))
        for i, p in enumerate(embed)
    ]
    queries = [VectorPart(embed[0]), VectorPart(embed[3])]
    spec = RetrievalSpec(
        chunk_size=CHUNK,
        search_actors=shards,
        nprobe=4,
        index="IVF32,Flat",
        exact_below=0 if build == "ivf" else 10**6,
    )
    result = search_parts(queries, database, K, spec, write=TopKWriter(tmp_path / "topk"))
    assert (result.shards, result.exact, result.queries) == (max(shards, 1), build == "flat", 1400)

    parts = [read_vector_part(p) for p in database]
    db_ids, db_vec = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    assert result.database == db_ids.size < 4 * 700
    index, _ = build_index(
        db_vec, factory=spec.index, exact_below=spec.exact_below, nprobe=spec.nprobe, ids=db_ids
    )
    for i, part in enumerate(queries):
        q_ids, q_vec = read_vector_part(part)
        sims, pos = search(index, q_vec, K)
        got = pq.read_table(TopKWriter(tmp_path / "topk").output(i))
        assert got["query_id"].to_numpy().tolist() == np.repeat(q_ids, K).tolist()
        assert got["rank"].to_numpy().tolist() == np.tile(np.arange(K), q_ids.size).tolist()
        assert got["image_id"].to_numpy().tolist() == db_ids[pos].ravel().tolist()
        np.testing.assert_allclose(got["score"].to_numpy(), sims.ravel(), rtol=1e-6)
    if build == "ivf":
        assert result.recall is not None and 0.5 < result.recall < 1  # nprobe 4 of 32 lists
        assert result.recall == recall_against_exact(index, db_vec, K, ids=db_ids)


@pytest.mark.parametrize("shards", [1, 2])
def test_search_parts_with_index_tables_equals_one_in_process_index(ray_local, tmp_path, shards):
    """Several IVF tables, searched together and re-ranked exactly: with exact list scans (IVF,Flat)
    the shards' merged top-k equals one in-process `IndexTables` over the whole database, and two
    tables with 2 probes each find more of the exact neighbours than one."""
    embed = _write_vector_parts(tmp_path, n_parts=2, per_part=700, dim=DIM, seed=2)
    database = queries = [VectorPart(p) for p in embed]
    spec = RetrievalSpec(
        chunk_size=CHUNK, search_actors=shards, nprobe=2, index="IVF32,Flat", exact_below=0, tables=2
    )
    result = search_parts(queries, database, K, spec, write=TopKWriter(tmp_path / "topk"))
    assert (result.index, result.device, result.exact) == ("2 x IVF32,Flat", "cpu", False)
    parts = [read_vector_part(p) for p in database]
    db_ids, db_vec = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    index, info = build_index(db_vec, factory=spec.index, exact_below=0, nprobe=2, ids=db_ids, tables=2)
    assert info.description == "2 x IVF32,Flat" and index.ntotal == db_ids.size
    got = pa.concat_tables([pq.read_table(TopKWriter(tmp_path / "topk").output(i)) for i in range(2)])
    sims, pos = search(index, db_vec, K)  # queries: each part's images in image_id order
    assert got["query_id"].to_numpy().tolist() == np.repeat(db_ids, K).tolist()
    assert got["image_id"].to_numpy().tolist() == db_ids[pos].ravel().tolist()
    np.testing.assert_allclose(got["score"].to_numpy(), sims.ravel(), rtol=1e-6)
    one, _ = build_index(db_vec, factory=spec.index, exact_below=0, nprobe=2, ids=db_ids)
    exact_sims, _ = search(build_index(db_vec, exact_below=10**9)[0], db_vec, K)
    one_sims, _ = search(one, db_vec, K)
    assert np.isclose(sims, exact_sims).mean() > np.isclose(one_sims, exact_sims).mean()


def test_plain_shards_merge_like_one_flat_index(vectors):
    """Without Ray: two `Shard`s, their answers merged per query, equal one flat index."""
    ids = np.arange(N, dtype=np.int64) * 7 + 3
    shards = [
        Shard.from_vectors(ids[: N // 3], vectors[: N // 3]),
        Shard.from_vectors(ids[N // 3 :], vectors[N // 3 :]),
    ]
    for shard in shards:
        shard.build(None, 1)
    sims, got = merge_topk([s.search(vectors[:50], K) for s in shards], K)
    index, _ = build_index(vectors, exact_below=N + 1)
    ref_sims, ref_pos = search(index, vectors[:50], K)
    np.testing.assert_allclose(sims, ref_sims, rtol=1e-6)
    assert np.array_equal(got, ids[ref_pos])


def test_merge_orders_by_similarity_then_image_id():
    a = (np.array([[0.9, 0.5, 0.5]], np.float32), np.array([[40, 7, 9]]))
    b = (np.array([[0.5, 0.95, -3.4e38]], np.float32), np.array([[8, 2, -1]]))  # -1: no hit
    sims, ids = merge_topk([a, b], 5)
    assert ids.tolist() == [[2, 40, 7, 8, 9]] and sims[0, 0] == np.float32(0.95)
    assert merge_topk([a, b], 6)[1].tolist() == [[2, 40, 7, 8, 9, -1]]


@pytest.mark.parametrize(
    "shards,node_cpus", [(1, [2.0]), (2, [2.0]), (3, [2.0]), (1, [32.0]), (5, [32.0, 16.0])]
)
def test_shards_leave_room_for_query_tasks(shards, node_cpus):
    """However many shards share the nodes, a query task still fits beside them on every node, and a
    shard alone on a big node gets many CPUs (its FAISS threads)."""
    from lvd.curation.knn_ray import _resources

    options, task_cpus = _resources(shards, 0, node_cpus)
    per_node = -(-shards // len(node_cpus))
    assert 0 < task_cpus <= 1
    assert all(per_node * options["num_cpus"] + task_cpus <= cpus for cpus in node_cpus)
    if shards == 1 and node_cpus == [32.0]:
        assert options["num_cpus"] == 16
    gpu_options, _ = _resources(shards, 4, node_cpus)
    assert gpu_options["num_gpus"] == 1
