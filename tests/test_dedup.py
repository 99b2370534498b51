import itertools
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from lvd.curation.dedup import (
    EVAL_OVERLAP,
    GROUPINGS,
    HASHES,
    KEEP_RULES,
    REASONS,
    bucket_pool_rows,
    component_decisions,
    copy_detection_edges,
    dedup_pool,
    eval_overlap,
    exact_duplicate_of,
    exact_edges_of_bucket,
    graph_nodes,
    hash_bucket,
)
from lvd.curation.knn import build_index, exact_knn, normalize, recall_against_exact
from lvd.curation.knn_ray import search_parts
from lvd.curation.knn_sharded import EDGES, EdgeWriter, VectorPart
from lvd.curation.stage_io import load_images, load_vectors
from lvd.jobs.stages.dedup import dedup_parts
from lvd.schemas import layout
from lvd.schemas.job_spec import DedupSpec
from lvd.schemas.layout import POOL, eval_dataset
from lvd.schemas.tables import IMAGES, embeddings_schema, write_parquet_atomic


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
    res = dedup_pool(
        ids, x, sha256=sha, width=w, height=h, k=8, threshold=0.6, chunk_size=37, grouping="components"
    )
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
    res = dedup_pool(
        ids, x, sha256=sha, width=w, height=h, k=8, keep_rule="smallest_id", grouping="components"
    )
    assert np.flatnonzero(~res.keep[:11]).tolist() == [0, 1, 3, 4, 6, 7, 9]


def test_eval_overlap_drops_whole_component():
    x, ids, sha, w, h = _planted_pool()
    rng = np.random.default_rng(5)
    evals = np.stack([_near(rng, x[3], 0.3), _near(rng, x[100], 0.3)])
    res = dedup_pool(ids, x, sha256=sha, width=w, height=h, eval_vectors=evals, k=8, grouping="components")
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


# ---------------------------------------------------------------- part by part against dedup_pool

MODEL = "copy_detection"
EVAL = eval_dataset("holdout")


def write_pool_parts(root: Path, n: int = 700, n_parts: int = 3, dim: int = 64, seed: int = 3) -> dict:
    """A pool of `n` images spread at random over `n_parts` ingest parts and their embed parts, with
    planted duplicates: near copies (cos ~0.96) and chains (~0.7 per link), exact copies (same
    sha256 and vector, often in another part), rows without a hash, a failed embed, a failed decode,
    and areas that tie. The last part also holds an eval set (near copies of two pool images and
    one unrelated image). Returns the folders and the settings the vectors were written with."""
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(2**40, size=n + 3, replace=False)).astype(np.int64)
    rng.shuffle(ids)  # ids say nothing about parts or rows
    pool_ids, eval_ids = ids[:n], ids[n:]
    x = normalize(rng.standard_normal((n, dim)))
    rows = rng.permutation(n)
    for a, b in zip(rows[0:80:2], rows[1:80:2], strict=True):
        x[b] = _near(rng, x[a], 0.3)
    for a, b, c in zip(rows[80:110:3], rows[81:110:3], rows[82:110:3], strict=True):
        x[b] = _near(rng, x[a], 1.0)
        x[c] = _near(rng, x[b], 1.0)
    sha = [f"h{i}" for i in range(n)]
    width = rng.choice([64, 128, 256], size=n)
    height = rng.choice([64, 128], size=n)
    exact_pairs = [*zip(rows[110:140:2], rows[111:140:2], strict=True), (rows[0], rows[140])]
    for a, b in exact_pairs:  # the same file; the last one a copy of a near-copy pair's member
        x[b], sha[b], width[b], height[b] = x[a], sha[a], width[a], height[a]
    sha[rows[141]] = sha[rows[142]] = None  # no hash
    status = np.full(n, "ok", dtype=object)
    status[rows[143]] = "error"  # failed decode: no vector either
    failed_embed = rows[144]
    unrelated = normalize(rng.standard_normal((1, dim)))[0]
    evals = np.stack([_near(rng, x[rows[2]], 0.3), _near(rng, x[rows[200]], 0.3), unrelated])
    part_of = rng.integers(0, n_parts, size=n)
    out = root / "out"
    for p in range(n_parts):
        sel = np.flatnonzero(part_of == p)
        recs = [
            dict(
                image_id=int(pool_ids[i]),
                dataset=POOL,
                uri=f"p{i}",
                kind="file",
                path=f"p{i}",
                sha256=sha[i],
                width=int(width[i]),
                height=int(height[i]),
                status=status[i],
            )
            for i in sel
        ]
        vec_ids, vecs = list(pool_ids[sel]), [x[i] for i in sel]
        if p == n_parts - 1:
            recs += [
                dict(
                    image_id=int(e),
                    dataset=EVAL,
                    uri=f"e{j}",
                    kind="file",
                    path=f"e{j}",
                    sha256=f"e{j}",
                    width=8,
                    height=8,
                    status="ok",
                )
                for j, e in enumerate(eval_ids)
            ]
            vec_ids += list(eval_ids)
            vecs += list(evals)
        table = pa.Table.from_pylist(
            [{name: r.get(name) for name in IMAGES.names} for r in recs], schema=IMAGES
        )
        write_parquet_atomic(table, layout.table_part(out, layout.IMAGES, p), IMAGES)
        keep = [j for j, i in enumerate(vec_ids) if i != pool_ids[rows[143]]]  # no vector row
        vec_ids = [vec_ids[j] for j in keep]
        vec = np.stack([vecs[j] for j in keep]).astype(np.float16) if keep else np.zeros((0, dim), np.float16)
        mask = pa.array([i == pool_ids[failed_embed] for i in vec_ids], pa.bool_())
        emb = pa.table(
            {
                "image_id": pa.array(vec_ids, pa.int64()),
                "model": [MODEL] * len(vec_ids),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), dim, mask=mask),
                "error": pa.nulls(len(vec_ids), pa.string()),
            },
            schema=embeddings_schema(dim),
        )
        write_parquet_atomic(emb, layout.table_part(out, layout.EMBEDDINGS, p, MODEL), emb.schema)
    return {"out": out, "pool_ids": pool_ids}


def reference_dedup(out: Path, spec: DedupSpec):
    """The old whole-table dedup stage: every row loaded in one process, then `dedup_pool`."""
    image_parts = layout.list_parts(layout.table_dir(out, layout.IMAGES))
    vector_parts = layout.list_parts(layout.table_dir(out, layout.EMBEDDINGS), MODEL)
    pool = load_images(image_parts, POOL, ["image_id", "sha256", "width", "height"])
    ids, vectors = load_vectors(vector_parts, MODEL, pool["image_id"].to_numpy())
    pool = pool.take(np.searchsorted(pool["image_id"].to_numpy(), ids))
    eval_ids = load_images(image_parts, EVAL, ["image_id"])["image_id"].to_numpy()
    _, eval_vectors = load_vectors(vector_parts, MODEL, eval_ids)
    params = spec.model_dump(exclude={"search_actors", "max_component_share"})
    res = dedup_pool(
        ids,
        vectors,
        sha256=pool["sha256"].to_pylist(),
        width=pool["width"].to_numpy(zero_copy_only=False),
        height=pool["height"].to_numpy(zero_copy_only=False),
        eval_vectors=eval_vectors,
        **params,
    )
    return ids, res


def run_dedup_parts(out: Path, spec: DedupSpec):
    """The dedup stage's driver on the parts under `out`; (summary, DEDUP table sorted by image_id)."""
    stage_dir = layout.stage_dir(out, "dedup")
    summary = dedup_parts(
        layout.list_parts(layout.table_dir(out, layout.IMAGES)),
        layout.list_parts(layout.table_dir(out, layout.EMBEDDINGS), MODEL),
        [EVAL],
        spec,
        out_dir=layout.table_dir(out, layout.DEDUP),
        scratch=lambda name: layout.scratch_dir(stage_dir, name),
    )
    return summary, layout.read_table(out, layout.DEDUP).sort_by("image_id")


def assert_same_decisions(table: pa.Table, ids: np.ndarray, res) -> None:
    assert table["image_id"].to_numpy().tolist() == ids.tolist()
    assert table["component_id"].to_numpy().tolist() == res.component_id.tolist()
    assert table["keep"].to_numpy().tolist() == res.keep.tolist()
    assert table["reason"].to_pylist() == res.reason.tolist()
    dup = table["duplicate_of"].to_numpy(zero_copy_only=False)
    assert np.array_equal(np.nan_to_num(dup, nan=-1).astype(np.int64), res.duplicate_of)


@pytest.fixture(scope="module")
def pool_parts(tmp_path_factory) -> dict:
    return write_pool_parts(tmp_path_factory.mktemp("pool"))


SEARCHES = {
    "flat": dict(exact_below=1_000_000),
    "ivf": dict(index="IVF16,Flat", nprobe=4, exact_below=100),  # the 3 eval images: flat
    "tables": dict(index="IVF16,Flat", nprobe=2, exact_below=100, tables=2),
}
SEARCH_NAMES = {"flat": "exact", "ivf": "IVF16,Flat on cpu", "tables": "2 x IVF16,Flat on cpu"}


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("search", list(SEARCHES))
def test_part_by_part_equals_in_memory_reference(ray_local, pool_parts, tmp_path, search, shards):
    """Three ingest/embed parts, copies across parts, on 1 and 2 shard actors, flat and IVF: the
    DEDUP parts hold dedup_pool's decisions for the same images, and the summary its counts."""
    out = tmp_path / "out"
    shutil.copytree(pool_parts["out"], out)
    spec = DedupSpec(
        k=8, threshold=0.6, eval_threshold=0.45, chunk_size=50, search_actors=shards, **SEARCHES[search]
    )
    ids, res = reference_dedup(out, spec)
    summary, table = run_dedup_parts(out, spec)
    assert_same_decisions(table, ids, res)
    counts = res.counts()
    assert (summary.images, summary.exact, summary.copy, summary.eval_overlap, summary.kept) == (
        counts["images"],
        counts["exact"],
        counts["copy"],
        counts["eval_overlap"],
        counts["kept"],
    )
    assert summary.copy_edges == res.copy_edges and summary.shards == shards
    assert summary.search == SEARCH_NAMES[search]
    assert summary.ivf_recall == res.ivf_recall and (summary.ivf_recall is None) == (search == "flat")
    if search != "flat":  # probing a few of 16 lists misses edges: the approximate path is really compared
        assert summary.ivf_recall < 1
    # the planted data exercises every rule
    assert counts["exact"] == 16 and counts["copy"] >= 40 and counts["eval_overlap"] >= 2
    assert summary.eval_images == 3 and summary.images == 698  # a failed decode, a failed embed
    assert len(layout.list_parts(layout.table_dir(out, layout.DEDUP))) == 3
    assert [p.name for p in layout.stage_dir(out, "dedup").iterdir() if p.is_dir()] == []


def test_driver_reads_no_image_parts(ray_local, pool_parts, tmp_path, monkeypatch):
    """The driver opens no ingest or embed part (workers do); it reads only edge parts from scratch."""
    out = tmp_path / "out"
    shutil.copytree(pool_parts["out"], out)
    opened = []

    def spy(real):
        def wrapped(source, *args, **kwargs):
            opened.append(Path(str(source)))
            return real(source, *args, **kwargs)

        return wrapped

    for module, name in [(pq, "read_table"), (pq, "ParquetFile"), (pq, "read_metadata"), (ds, "dataset")]:
        monkeypatch.setattr(module, name, spy(getattr(module, name)))
    summary, _ = run_dedup_parts(out, DedupSpec(k=8, search_actors=2))
    assert summary.images == 698 and opened  # the spy works: the driver reads its edge parts
    stage_dir = layout.stage_dir(out, "dedup")
    driver_reads = {p for p in opened if layout.table_dir(out, layout.DEDUP) not in p.parents}
    assert all(p.parent.name.startswith("_") and stage_dir in p.parents for p in driver_reads), driver_reads


def test_search_resumes_from_written_edge_parts(ray_local, pool_parts, tmp_path):
    """A killed search left some edge parts: they are not searched again (a planted edge no search
    would find survives), the missing ones are, and with every part written no shard is started."""

    out = tmp_path / "out"
    shutil.copytree(pool_parts["out"], out)
    parts = [VectorPart(p) for p in layout.list_parts(layout.table_dir(out, layout.EMBEDDINGS), MODEL)]
    spec = DedupSpec(k=8, search_actors=2)
    clean = EdgeWriter(tmp_path / "clean", 0.6)
    full = search_parts(parts, parts, 9, spec, write=clean)
    assert full.resumed_parts == 0 and full.shards == 2 and full.rows > 0
    work = tmp_path / "work"
    shutil.copytree(clean.folder, work)
    (work / layout.part_name(2)).unlink()
    planted = pa.table({"src": [1], "dst": [2], "sim": [0.99]}, schema=EDGES)
    write_parquet_atomic(planted, work / layout.part_name(1), EDGES.with_metadata({b"lvd.queries": b"5"}))
    resumed = search_parts(parts, parts, 9, spec, write=EdgeWriter(work, 0.6))
    assert resumed.resumed_parts == 2 and resumed.shards == 2
    for i in (0, 2):
        assert pq.read_table(work / layout.part_name(i)).equals(pq.read_table(clean.output(i)))
    assert pq.read_table(work / layout.part_name(1)).equals(planted)
    again = search_parts(parts, parts, 9, spec, write=EdgeWriter(work, 0.6))
    assert again.shards == 0 and again.resumed_parts == 3 and again.database == full.database


# ---------------------------------------------------------------- the plain per-part functions


def test_exact_edges_by_bucket_equal_exact_duplicate_of(tmp_path):
    """Map (per part group) + reduce (per hash bucket) give every exact copy its smallest-id twin."""
    rng = np.random.default_rng(4)
    n = 400
    ids = rng.choice(10**9, size=n, replace=False).astype(np.int64)
    sha = [f"{h:064x}" for h in rng.integers(0, 150, size=n)]
    sha[5] = None
    rep = exact_duplicate_of(sha, ids)
    want = {(int(ids[i]), int(ids[rep[i]])) for i in range(n) if rep[i] != i}
    tables = []
    for start in range(0, n, 100):  # four groups' worth of hashed rows, as the map writes them
        sel = [i for i in range(start, start + 100) if sha[i] is not None]
        tables.append(pa.table({"sha256": [sha[i] for i in sel], "image_id": ids[sel]}, schema=HASHES))
    for g, table in enumerate(tables):
        bucket = hash_bucket(table["sha256"], 7)
        for b in np.unique(bucket):
            path = layout.part_path(layout.bucket_dir(tmp_path, int(b)), g)
            write_parquet_atomic(table.filter(pa.array(bucket == b)), path, HASHES)
    got = set()
    for bucket in layout.list_buckets(tmp_path):
        src, dst = exact_edges_of_bucket(bucket)
        got |= set(zip(src.tolist(), dst.tolist(), strict=True))
    assert got == want and len(want) > 100


def test_bucket_pool_rows_keeps_pool_rows_with_a_vector(pool_parts, tmp_path):
    out = pool_parts["out"]
    images = layout.list_parts(layout.table_dir(out, layout.IMAGES))
    embeds = layout.list_parts(layout.table_dir(out, layout.EMBEDDINGS), MODEL)
    group = [(layout.part_index(p), p, e) for p, e in zip(images, embeds, strict=True)]
    n = bucket_pool_rows(group, rows_dir=tmp_path / "rows", buckets_dir=tmp_path / "b", n_buckets=3)
    ids, _ = reference_dedup(out, DedupSpec(k=8))
    rows = [pq.read_table(layout.part_path(tmp_path / "rows", i)) for i, _, _ in group]
    got = np.concatenate([r["image_id"].to_numpy() for r in rows])
    assert n == ids.size == 698 and np.array_equal(np.sort(got), ids)
    assert all(np.all(np.diff(r["image_id"].to_numpy()) > 0) for r in rows)
    hashed = sum(
        pq.read_metadata(p).num_rows
        for b in layout.list_buckets(tmp_path / "b")
        for p in layout.list_parts(b)
    )
    assert hashed == 698 - 2  # two rows have no hash


def test_component_decisions_equal_dedup_pool_on_random_graphs():
    """On random vectors with planted copies: the decisions from the edges' nodes alone equal the
    whole-pool reference, for both keep rules, both groupings and with eval matches."""
    rng = np.random.default_rng(8)
    x, ids, sha, w, h = _planted_pool()
    evals = np.stack([_near(rng, x[3], 0.3), _near(rng, x[100], 0.3)])
    for keep_rule, grouping in itertools.product(KEEP_RULES, GROUPINGS):
        res = dedup_pool(
            ids,
            x,
            sha256=sha,
            width=w,
            height=h,
            eval_vectors=evals,
            k=8,
            keep_rule=keep_rule,
            grouping=grouping,
        )
        order = np.argsort(ids)
        rep = exact_duplicate_of(sha, ids)
        dup = np.flatnonzero(rep != np.arange(ids.size))
        exact_src, exact_dst = ids[dup], ids[rep[dup]]
        unique = np.flatnonzero(rep == np.arange(ids.size))
        edges = copy_detection_edges(x[unique], ids=ids[unique], k=8, threshold=0.6)
        copy_src, copy_dst = ids[unique][edges.src], ids[unique][edges.dst]
        matched = ids[eval_overlap(x, evals, threshold=0.45)]
        nodes = graph_nodes(exact_src, exact_dst, copy_src, copy_dst, matched)
        area = (w * h).astype(np.float64)[order][np.searchsorted(ids[order], nodes)]
        d = component_decisions(
            nodes, area, exact_src, exact_dst, copy_src, copy_dst, matched, keep_rule, grouping
        )
        rows = np.searchsorted(ids[order], nodes)
        ref_rows = order[rows]
        assert np.array_equal(d.component_id, res.component_id[ref_rows])
        assert np.array_equal(d.keep, res.keep[ref_rows])
        assert np.array_equal(d.duplicate_of, res.duplicate_of[ref_rows])
        assert [REASONS[r] for r in d.reason] == res.reason[ref_rows].tolist()
        others = np.setdiff1d(np.arange(ids.size), ref_rows)
        assert res.keep[others].all() and (res.component_id[others] == ids[others]).all()
        assert d.count(EVAL_OVERLAP) == res.counts()["eval_overlap"] > 0
