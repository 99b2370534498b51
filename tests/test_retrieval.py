import numpy as np
import pyarrow as pa

from lvd.curation.knn import build_index, normalize
from lvd.curation.retrieval import count_collisions, retrieve_as_is, retrieve_by_cluster, retrieve_by_sample
from lvd.schemas.tables import RETRIEVED

E = np.eye(4, dtype=np.float32)


def _unit(*coords):
    return normalize(np.array([coords], dtype=np.float32))[0]


def test_as_is_is_the_seed_set_itself():
    t = retrieve_as_is(np.array([7, 3, 9]), "core")
    assert t.schema == RETRIEVED
    assert t["image_id"].to_pylist() == [7, 3, 9] and set(t["strategy"].to_pylist()) == {"as_is"}
    assert t["seed_set"].to_pylist() == ["core"] * 3


def test_sample_returns_nearest_pool_images_and_collisions():
    # pool ids 100..105: two near e0, two near e1, one near e2, one near e3
    pool = np.stack(
        [
            _unit(1, 0.1, 0, 0),
            _unit(1, 0.3, 0, 0),
            _unit(0.2, 1, 0, 0),
            _unit(0, 1, 0.1, 0),
            _unit(0, 0, 1, 0),
            _unit(0, 0, 0, 1),
        ]
    )
    pool_ids = np.arange(100, 106)
    seeds = np.stack([_unit(1, 0, 0, 0), _unit(1, 0.5, 0, 0), _unit(0, 0.1, 1, 0)])
    seed_ids = np.array([1, 2, 3])
    index, _ = build_index(pool, exact_below=10**6)
    t = retrieve_by_sample(index, pool_ids, seeds, seed_ids, "s", k=2)
    got = {
        (s, i): (r, sc)
        for s, i, r, sc in zip(
            *(t[c].to_pylist() for c in ["seed_id", "image_id", "rank", "score"]), strict=True
        )
    }
    # Reference by brute force: cosines of every (seed, pool) pair, top 2 per seed.
    sims = seeds @ pool.T
    for s in range(3):
        top = np.argsort(-sims[s])[:2]
        for rank, j in enumerate(top):
            r, sc = got[(seed_ids[s], pool_ids[j])]
            assert r == rank and abs(sc - sims[s, j]) < 1e-5
    assert t.num_rows == 6
    # seeds 1 and 2 both retrieve 100 and 101: two collisions
    assert {i for (s, i) in got if s == 1} == {i for (s, i) in got if s == 2} == {100, 101}
    assert count_collisions(t) == 2


def test_cluster_based_by_hand():
    # 3 pool clusters (centroids e0, e1, e2); pool ids 10.. with their distance to the centroid
    centroids = E[:3]
    pool_ids = np.array([10, 11, 12, 13, 20, 21, 22, 30, 31, 32])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    dist = np.array([0.3, 0.1, 0.2, 0.4, 0.1, 0.2, 0.3, 0.05, 0.5, 0.01], dtype=np.float32)
    # 4 seeds near e0, 2 near e1, 5 near e2
    seeds = np.stack(
        [_unit(1, 0.1 * i, 0, 0) for i in range(4)]
        + [_unit(0, 1, 0.1 * i, 0) for i in range(2)]
        + [_unit(0, 0.05 * i, 1, 0) for i in range(5)]
    )
    t = retrieve_by_cluster(
        pool_ids, labels, dist, centroids, seeds, "c", min_seed_images=3, images_per_cluster=2, max_images=100
    )
    # clusters 2 (5 seeds) then 0 (4 seeds); cluster 1 has only 2 seeds; 2 nearest to each centroid
    assert t["image_id"].to_pylist() == [32, 30, 11, 12]
    assert t["rank"].to_pylist() == [0, 1, 0, 1]
    assert np.allclose(t["score"].to_numpy(), [0.99, 0.95, 0.9, 0.8])
    assert t["seed_id"].null_count == 4 and set(t["strategy"].to_pylist()) == {"cluster"}
    capped = retrieve_by_cluster(
        pool_ids, labels, dist, centroids, seeds, "c", min_seed_images=3, images_per_cluster=2, max_images=3
    )
    assert capped["image_id"].to_pylist() == [32, 30, 11]
    none = retrieve_by_cluster(
        pool_ids, labels, dist, centroids, seeds, "c", min_seed_images=5, images_per_cluster=2, max_images=3
    )
    assert none.num_rows == 0


def test_collisions_ignore_as_is_rows():
    t = pa.concat_tables([retrieve_as_is(np.array([1, 2]), "a"), retrieve_as_is(np.array([1]), "b")])
    assert count_collisions(t) == 0
