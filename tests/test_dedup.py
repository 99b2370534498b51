import numpy as np

from lvd.curation.dedup import dedup_pool, exact_duplicate_of
from lvd.curation.knn import build_index, exact_knn, normalize, recall_against_exact


def _near(rng, v, noise):
    """A vector at a known distance from v: v plus a random vector of norm `noise`."""
    u = rng.standard_normal(v.shape)
    return normalize((v + noise * u / np.linalg.norm(u))[None])[0]


def _planted_pool():
    """200 random 128-d vectors (pairwise cosine < 0.45) with hand-planted duplicate groups."""
    rng = np.random.default_rng(0)
    n = 200
    x = normalize(rng.standard_normal((n, 128)))
    x[1] = _near(rng, x[0], 0.3)  # A = {0, 1, 2}, all cos ~0.96
    x[2] = _near(rng, x[0], 0.3)
    x[4] = _near(rng, x[3], 1.0)  # chain {3, 4, 5}: cos(3,4), cos(4,5) ~0.71 but cos(3,5) ~0.5
    x[5] = _near(rng, x[4], 1.0)
    x[7] = x[6]  # 6 and 7: the same file (same sha256); 8 a near copy of it
    x[8] = _near(rng, x[6], 0.3)
    x[10] = _near(rng, x[9], 0.3)  # pair with equal areas
    ids = 10_000 - 3 * np.arange(n)  # ids decrease with the row: row 2 has the smallest id of A
    sha = [f"h{i}" for i in range(n)]
    sha[7] = sha[6]
    width, height = np.full(n, 100), np.full(n, 100)
    width[1], height[1] = 200, 200  # the largest of A
    width[8], height[8] = 50, 50
    width[9], height[9] = 300, 100
    width[10], height[10] = 100, 300
    return x, ids, sha, width, height


def test_exact_duplicate_of_keeps_smallest_id():
    ids = np.array([5, 3, 9, 1, 7])
    rep = exact_duplicate_of(["a", "b", "a", None, "a"], ids)
    assert rep.tolist() == [0, 1, 0, 3, 0]
    rep = exact_duplicate_of(["a", "a", None, None, "a"], np.array([5, 3, 9, 1, 2]))
    assert rep.tolist() == [4, 4, 2, 3, 4]


def test_planted_duplicates_one_kept_per_component_largest_rule():
    x, ids, sha, w, h = _planted_pool()
    res = dedup_pool(ids, x, sha256=sha, width=w, height=h, k=8, threshold=0.6, chunk_size=37)
    kept_rows = {0: 1, 1: 1, 2: 1, 3: 5, 4: 5, 5: 5, 6: 7, 7: 7, 8: 7, 9: 10, 10: 10}
    for row, kept in kept_rows.items():
        assert res.keep[row] == (row == kept), row
        assert res.duplicate_of[row] == (-1 if row == kept else ids[kept])
    assert res.component_id[[0, 1, 2]].tolist() == [ids[2]] * 3
    assert res.component_id[[3, 4, 5]].tolist() == [ids[5]] * 3
    assert res.component_id[[6, 7, 8]].tolist() == [ids[8]] * 3
    assert res.reason[6] == "exact" and res.reason[8] == "copy" and res.reason[0] == "copy"
    assert res.keep[11:].all() and (res.component_id[11:] == ids[11:]).all()
    assert res.counts() == {"images": 200, "exact": 1, "copy": 6, "eval_overlap": 0, "kept": 193}
    assert res.exact_search and res.ivf_recall is None


def test_smallest_id_rule():
    x, ids, sha, w, h = _planted_pool()
    res = dedup_pool(ids, x, sha256=sha, width=w, height=h, k=8, keep_rule="smallest_id")
    assert np.flatnonzero(~res.keep[:11]).tolist() == [0, 1, 3, 4, 6, 7, 9]


def test_eval_overlap_drops_whole_component():
    x, ids, sha, w, h = _planted_pool()
    rng = np.random.default_rng(5)
    evals = np.stack([_near(rng, x[3], 0.3), _near(rng, x[100], 0.3)])
    res = dedup_pool(ids, x, sha256=sha, width=w, height=h, eval_vectors=evals, k=8)
    assert not res.keep[[3, 4, 5, 100]].any()
    assert res.reason[[3, 4, 5, 100]].tolist() == ["copy", "copy", "eval-overlap", "eval-overlap"]
    assert res.keep[[1, 7, 10]].all()
    assert res.counts()["eval_overlap"] == 2 and res.counts()["kept"] == 191


def test_ivf_path_finds_planted_pairs_and_reports_recall():
    rng = np.random.default_rng(1)
    n, pairs = 4000, 150
    x = normalize(rng.standard_normal((n, 128)))
    src = rng.choice(n, size=2 * pairs, replace=False)
    a, b = src[:pairs], src[pairs:]
    for i, j in zip(a, b, strict=True):
        x[j] = _near(rng, x[i], 0.3)
    ids = np.arange(n) + 1
    common = dict(k=8, threshold=0.6, index="IVF16,Flat", nprobe=4)
    ivf = dedup_pool(ids, x, exact_below=1000, **common)
    exact = dedup_pool(ids, x, exact_below=10**9, **common)
    assert not ivf.exact_search and exact.exact_search
    assert 0.9 <= ivf.ivf_recall <= 1.0
    assert (ivf.component_id[a] == ivf.component_id[b]).all()
    assert ivf.counts()["copy"] == pairs == exact.counts()["copy"]
    assert np.array_equal(ivf.keep, exact.keep)
    assert (~ivf.keep[np.maximum(a, b)]).all()  # equal areas: the smaller id (= row + 1) is kept


def test_recall_is_one_when_every_list_is_probed():
    x = normalize(np.random.default_rng(2).standard_normal((3000, 32)))
    index, _ = build_index(x, factory="IVF8,Flat", exact_below=0, nprobe=8)
    assert recall_against_exact(index, x, 10, sample_size=200) == 1.0
    # and the brute-force reference matches a plain numpy top-k
    sims, ids = exact_knn(x[:5], x, 4)
    ref = np.argsort(-(x[:5] @ x.T), axis=1)[:, :4]
    assert np.array_equal(ids, ref)


def test_interrupted_search_resumes_from_saved_chunks(tmp_path):
    """Chunks saved by an earlier run are loaded, not searched again; missing ones are searched.

    A saved chunk is replaced by a planted edge no search would find: the resumed run must return it.
    The chunks that were deleted (as a kill would leave them) must come back equal to a clean run."""
    from lvd.curation.dedup import copy_detection_edges, load_edge_chunks, save_edge_chunk

    x, *_ = _planted_pool()
    common = dict(k=8, threshold=0.6, chunk_size=50)
    clean = copy_detection_edges(x, **common)
    work = tmp_path / "edges"
    first = copy_detection_edges(x, work_dir=work, **common)
    assert sorted(load_edge_chunks(work)) == [0, 50, 100, 150]
    assert np.array_equal(first.src, clean.src) and np.array_equal(first.dst, clean.dst)

    (work / "edges-000000000100.npz").unlink()
    (work / "edges-000000000150.npz").unlink()
    (work / ".tmp-edges-000000000150.npz").write_bytes(b"half a file")  # a kill mid-write
    planted = (np.array([60]), np.array([199]), np.array([0.99], np.float32))
    save_edge_chunk(work, 50, *planted)
    resumed = copy_detection_edges(x, work_dir=work, **common)
    got = set(zip(resumed.src.tolist(), resumed.dst.tolist(), strict=True))
    want = {(s, d) for s, d in zip(clean.src.tolist(), clean.dst.tolist(), strict=True) if not 50 <= s < 100}
    assert got == want | {(60, 199)}
    assert sorted(load_edge_chunks(work)) == [0, 50, 100, 150]
