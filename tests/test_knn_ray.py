"""kNN search on Ray actors gives exactly the in-process results (flat and IVF), and so does dedup."""

import numpy as np
import pytest
from test_curation_stages import _run, world  # noqa: F401  (world is a fixture)

from lvd.curation import knn_ray
from lvd.curation.knn import build_index, normalize, search
from lvd.curation.knn_ray import search_chunks_parallel, search_parallel
from lvd.curation.retrieval import retrieve_by_sample
from lvd.jobs.stages import dedup
from lvd.schemas import layout

N, DIM, K, CHUNK = 4000, 32, 10, 300


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return normalize(np.random.default_rng(0).standard_normal((N, DIM)))


@pytest.mark.parametrize(
    "build",
    [
        dict(exact_below=N + 1),  # flat
        dict(factory="IVF32,Flat", exact_below=0, nprobe=4, train_size=N),
    ],
    ids=["flat", "ivf"],
)
def test_parallel_search_equals_in_process(ray_local, vectors, build):
    index, info = build_index(vectors, **build)
    assert info.exact == ("factory" not in build)
    queries = vectors[::2]  # several chunks, the last one short
    d0, i0 = search(index, queries, K, CHUNK)
    d1, i1 = search_parallel(index, queries, K, CHUNK, n_actors=2, nprobe=build.get("nprobe"))
    np.testing.assert_array_equal(i1, i0)
    np.testing.assert_array_equal(d1, d0)
    if "nprobe" in build:  # nprobe reaches the actors: probing every list changes the results
        _, i_all = search_parallel(index, queries, K, CHUNK, n_actors=2, nprobe=32)
        assert not np.array_equal(i_all, i0)


def test_chunks_come_back_in_query_order(ray_local, vectors):
    index, _ = build_index(vectors, exact_below=N + 1)
    # 5 actors do not fit the 2-CPU test cluster: capped instead of waiting forever
    starts = [s for s, _, _ in search_chunks_parallel(index, vectors, 3, 250, n_actors=5)]
    assert starts == list(range(0, N, 250))


def test_empty_queries(ray_local, vectors):
    index, _ = build_index(vectors, exact_below=N + 1)
    d, i = search_parallel(index, vectors[:0], K, CHUNK, n_actors=2)
    assert d.shape == (0, K) and i.shape == (0, K)


def test_dedup_stage_same_with_search_actors(ray_local, world, monkeypatch):  # noqa: F811
    spec, out, _, _ = world
    calls = []  # the actor path must really run: copy detection and eval overlap
    for name in ("search_chunks_parallel", "search_parallel"):
        real = getattr(knn_ray, name)
        monkeypatch.setattr(
            knn_ray, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw)
        )
    tables = {}
    for actors in (0, 2):
        # small chunks so both actors get work
        s = spec.model_copy(
            update={"dedup": spec.dedup.model_copy(update={"chunk_size": 16, "search_actors": actors})}
        )
        summary = _run(s, out, "dedup", dedup)
        tables[actors] = layout.read_table(out, layout.DEDUP)
    assert summary.copy == 1 and summary.eval_overlap == 1
    assert tables[2].equals(tables[0])
    # copy detection streams chunks; eval overlap collects them (search_parallel streams too)
    assert calls == ["search_chunks_parallel", "search_parallel", "search_chunks_parallel"]


def test_retrieve_by_sample_same_with_search_actors(ray_local, vectors):
    index, _ = build_index(vectors, exact_below=N + 1)
    pool_ids = 10_000 + np.arange(N)
    seeds = vectors[:50]
    args = (index, pool_ids, seeds, np.arange(50), "s")
    serial = retrieve_by_sample(*args, k=5, chunk_size=20)
    parallel = retrieve_by_sample(*args, k=5, chunk_size=20, search_actors=2)
    assert parallel.equals(serial) and parallel.num_rows == 250
