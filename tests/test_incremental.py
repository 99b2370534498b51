"""Incremental runs: a source added to a finished job's spec reuses the per-image work of the images
seen before, and its dedup decisions equal those of a full run on the union of the sources.

Chained on the moved demo (conftest.moved_demo_job) so no extra full run is paid for the first run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import yaml
from conftest import make_image_bytes

from lvd.jobs.pipeline import run_job
from lvd.schemas import ids, layout
from lvd.schemas.job_spec import load_job_spec

FRESH = 8  # new images unlike any other
COPIES = 3  # byte copies of kept pool images of the first run


SAMPLES_PER_SHARD = 4  # small shards: many of them, so some hold only samples that stay the same


def _spec_file(job_yaml: Path, name: str, source: Path | None = None, out: str | None = None) -> Path:
    """A copy of the job spec with small shards, `source` added to the pool, another output folder."""
    doc = yaml.safe_load(job_yaml.read_text())
    doc["shards"]["samples_per_shard"] = SAMPLES_PER_SHARD
    if source is not None:
        doc["pool"].append({"uri": str(source)})
    if out is not None:
        doc["output_dir"] = out
    path = job_yaml.with_name(name)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _shard_files(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """(inode, mtime in ns, bytes) of every shard tar and parquet."""
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
        for p in folder.iterdir()
        if layout.shard_number(p.name) is not None
    }


@pytest.fixture(scope="module")
def grown(moved_demo_job, tmp_path_factory):
    """A copy of the moved demo job run again with a new pool source (incremental), and the same
    spec run from nothing in another output folder up to dedup (full). A copy: the moved job stays
    as test_ids reads it, whichever test runs first."""
    _, (moved, _), _ = moved_demo_job
    root = tmp_path_factory.mktemp("grown") / "demo"
    shutil.copytree(moved, root, symlinks=True)
    out = Path(load_job_spec(root / "job.yaml").output_dir)
    images = layout.read_table(out, layout.IMAGES, columns=["uri", "dataset", "status", "kind"])
    dedup = layout.read_table(out, layout.DEDUP, columns=["image_id", "keep"])
    kept = set(dedup.filter(dedup["keep"])["image_id"].to_pylist())
    ok_files = [
        r["uri"]
        for r, i in zip(
            images.to_pylist(), layout.read_table(out, layout.IMAGES)["image_id"].to_pylist(), strict=True
        )
        if r["dataset"] == layout.POOL and r["status"] == "ok" and r["kind"] == "file" and i in kept
    ]
    eval_files = [r["uri"] for r in images.to_pylist() if r["dataset"].startswith(layout.EVAL_PREFIX)]
    new = root / "data" / "new-source"
    new.mkdir()
    for i in range(FRESH):
        (new / f"fresh-{i}.png").write_bytes(make_image_bytes("png", (64, 64), seed=1000 + i))
    copied = sorted(ok_files)[:COPIES]
    for i, uri in enumerate(copied):
        (new / f"copy-{i}{Path(uri).suffix}").write_bytes(Path(uri).read_bytes())
    (new / f"eval-copy{Path(eval_files[0]).suffix}").write_bytes(Path(eval_files[0]).read_bytes())

    run_job(load_job_spec(_spec_file(root / "job.yaml", "job-first.yaml")), until="shards")
    before = _shard_files(layout.shards_dir(out))
    incremental = run_job(load_job_spec(_spec_file(root / "job.yaml", "job-grown.yaml", new)), until="shards")
    full_out = str(root / "full-out")
    full_spec = load_job_spec(_spec_file(root / "job.yaml", "job-full.yaml", new, full_out))
    full = run_job(full_spec, until="dedup")
    return out, Path(full_out), {r.name: r for r in incremental}, {r.name: r for r in full}, before


def test_moved_job_reused_its_embeddings(moved_demo_job):
    *_, reports = moved_demo_job
    embed = next(r for r in reports if r.name == "embed").summary
    assert embed.parts_reused > 0 and embed.parts_written == 0  # content unchanged, paths changed


def test_incremental_run_reuses_the_work_on_images_seen_before(grown):
    out, _, incremental, full, _ = grown
    ingest, embed = incremental["ingest"].summary, incremental["embed"].summary
    assert ingest.parts_written == 1 and ingest.parts_reused == ingest.parts - 1
    assert embed.parts_written == 1 and embed.parts_reused == embed.parts_skipped
    assert full["embed"].summary.parts_written == embed.parts_written + embed.parts_skipped
    assert not incremental["cluster"].summary.refit  # assigned to the first run's centroids
    assert not layout.previous_stage_dir(out, "embed").exists()  # removed once the stage finished


def _edges(
    queries: np.ndarray, database: np.ndarray, vectors: np.ndarray, k: int, threshold: float
) -> pa.Table:
    """The copy edges of a sharded dedup search: each query's k + 1 nearest in the database, thresholded
    (ids are row numbers of `vectors`)."""
    from lvd.curation.knn_sharded import EdgeWriter, Shard

    shard = Shard.from_vectors(database, vectors[database])
    shard.build(None, 1)
    sims, ids = shard.search(vectors[queries], k + 1)
    return EdgeWriter(".", threshold).rows(queries, sims, ids)


def test_carried_copy_edges_equal_a_full_search_of_the_union():
    """The incremental dedup's edges (the new images searched against the union, their edges turned
    around for the earlier images, the earlier edges carried, full lists searched again) are exactly a
    full search's, with groups of copies larger than k (full lists) and earlier images gone."""
    from lvd.curation.dedup import carried_copy_edges, fresh_edges_reversed, unique_edges
    from lvd.curation.knn import normalize

    k, threshold = 4, 0.9
    rng = np.random.default_rng(0)
    centres = normalize(rng.standard_normal((60, 16)).astype(np.float32))
    group = rng.integers(0, 60, 600)  # groups of about 10 copies: many lists are full at k
    vectors = normalize(centres[group] + 0.12 * rng.standard_normal((600, 16)).astype(np.float32))
    earlier_ids, new_ids = np.arange(540), np.arange(540, 600)
    gone = rng.choice(earlier_ids, 20, replace=False)  # e.g. now exact copies of a new image
    seen = np.setdiff1d(earlier_ids, gone)
    union = np.concatenate([seen, new_ids])

    full = _edges(union, union, vectors, k, threshold)
    earlier = _edges(earlier_ids, earlier_ids, vectors, k, threshold)
    fresh = _edges(new_ids, union, vectors, k, threshold)
    turned, full_lists = fresh_edges_reversed(fresh, k)
    to_full_lists = _edges(seen, full_lists, vectors, k, threshold)
    ends = np.unique(np.concatenate([earlier["src"].to_numpy(), earlier["dst"].to_numpy()]))
    alive = ends[np.isin(ends, seen)]
    seen_to_fresh = unique_edges(pa.concat_tables([turned, to_full_lists]))
    carried, again = carried_copy_edges(earlier, alive, seen_to_fresh, k)
    got = unique_edges(pa.concat_tables([carried, fresh, _edges(again, union, vectors, k, threshold)]))
    assert pairs(got) == pairs(full) and got.num_rows == full.num_rows
    assert 0 < again.size < seen.size / 2 and 0 < full_lists.size < new_ids.size  # both cases met
    assert carried.num_rows > 0 and turned.num_rows > 0


def pairs(t: pa.Table) -> set[tuple[int, int]]:
    return set(zip(t["src"].to_pylist(), t["dst"].to_pylist(), strict=True))


def test_incremental_dedup_decisions_equal_a_full_rerun(grown):
    out, full_out, incremental, full, _ = grown
    dedup = incremental["dedup"].summary
    assert dedup.incremental  # the earlier images' edges were carried over
    assert 0 < dedup.queries_against_pool < full["dedup"].summary.queries_against_pool
    cols = ["image_id", "component_id", "keep", "reason", "duplicate_of"]

    def decisions(folder: Path) -> pd.DataFrame:
        t = ids.to_pandas(layout.read_table(folder, layout.DEDUP, columns=cols))
        return t.sort_values("image_id").reset_index(drop=True)

    inc, full = decisions(out), decisions(full_out)
    pd.testing.assert_frame_equal(inc, full)
    # Each copy in the new source and its original from the first run: the smallest id of the content
    # is kept (as a full run decides, even when that is the new copy), the others are exact duplicates.
    images = layout.read_table(out, layout.IMAGES, columns=["image_id", "uri", "sha256"]).to_pandas()
    new = images[images["uri"].str.contains("/new-source/")].set_index("image_id")
    by_id = inc.set_index("image_id")
    by_name = {Path(new.loc[i, "uri"]).stem: by_id.loc[i, "reason"] for i in new.index}
    for i in new.index:
        if not Path(new.loc[i, "uri"]).stem.startswith("copy-"):
            continue
        same = images[(images["sha256"] == new.loc[i, "sha256"])]["image_id"].tolist()
        assert len(same) >= 2 and [j for j in same if by_id.loc[j, "keep"]] == [min(same)]
        for lost in set(same) - {min(same)}:
            assert by_id.loc[lost, "reason"] == "exact" and by_id.loc[lost, "duplicate_of"] == min(same)
    assert by_name["eval-copy"] is not None  # the copy of an eval image was dropped
    assert any(by_name[f"fresh-{i}"] is None for i in range(FRESH))
    # Every kept new image is in a cluster.
    clusters = set(layout.read_table(out, layout.CLUSTERS, columns=["image_id"])["image_id"].to_pylist())
    assert {i for i in new.index if by_name[Path(new.loc[i, "uri"]).stem] is None} <= clusters


def test_incremental_shards_keep_unchanged_shards_as_a_new_version(grown):
    from lvd.jobs.shard_verify import verify_shards
    from lvd.training.data.loader import resolve_shards

    out, _, incremental, _, before = grown
    folder = layout.shards_dir(out)
    index = json.loads((folder / layout.SHARD_INDEX_JSON).read_text())
    first = json.loads((folder / layout.shard_version_manifest(1)).read_text())
    assert index["version"] == 2 and first["version"] == 1
    assert index["unchanged"] and index["new"]  # some shards kept, the new samples in new shards
    assert set(index["unchanged"]) <= set(first["new"])
    after = _shard_files(folder)
    for name in index["unchanged"]:
        for member in (name, name.replace(".tar", ".parquet")):
            assert after[member] == before[member], member  # same bytes, same inode and mtime
    last_old = max(layout.shard_number(n) for n in first["new"])
    assert all(layout.shard_number(n) > last_old for n in index["new"])
    # Every curated sample is in exactly one shard of the new version.
    curated = layout.read_table(out, layout.CURATED, columns=["repeats"])["repeats"].to_pylist()
    assert index["total"]["samples"] == sum(curated) == incremental["shards"].summary.samples
    assert verify_shards(folder) == []
    # The loader reads the latest version by default, and any version by its manifest.
    assert [Path(u).name for u in resolve_shards(str(folder))] == sorted(index["unchanged"] + index["new"])
    v1 = resolve_shards(str(folder / layout.shard_version_manifest(1)))
    assert [Path(u).name for u in v1] == first["new"] and all(Path(u).exists() for u in v1)


def test_merged_seed_lists_equal_a_full_search_of_the_grown_pool():
    """A sample-based seed set's lists on a grown pool, from the earlier lists, a search of the seeds
    among the newly kept images and a full search of the stale seeds only, are a full search's: with
    earlier images dropped by dedup (some in full lists), earlier ones newly kept, new images, and a
    seed that sees fewer than k images."""
    import faiss

    from lvd.curation.knn import normalize
    from lvd.curation.retrieval import merge_seed_lists, retrieve_by_sample, stale_seeds

    k, rng = 5, np.random.default_rng(3)
    vectors = normalize(rng.standard_normal((400, 8)).astype(np.float32))
    seeds, seed_ids = vectors[:30] + 0.05, np.arange(10_000, 10_030)
    seeds = normalize(seeds.astype(np.float32))
    kept_before = np.sort(rng.choice(300, 260, replace=False))
    new_ids = np.arange(300, 400)

    def search(pool: np.ndarray, queries: np.ndarray, ids: np.ndarray) -> pa.Table:
        index = faiss.IndexFlatIP(8)
        index.add(vectors[pool])
        return retrieve_by_sample(index, pool, queries, ids, "s", k=k)

    earlier = search(kept_before, seeds, seed_ids)
    # Dropped: some images of the earlier lists (so some full lists lose one) and others.
    listed = np.unique(earlier["image_id"].to_numpy())
    dropped = np.sort(np.concatenate([rng.choice(listed, 6, replace=False), kept_before[:4]]))
    flipped_in = np.setdiff1d(np.arange(300), kept_before)[:8]  # earlier images dedup now keeps
    newly = np.concatenate([new_ids, flipped_in])
    now = np.sort(np.concatenate([np.setdiff1d(kept_before, dropped), newly]))
    full = search(now, seeds, seed_ids)

    stale = stale_seeds(earlier, dropped, k)
    fresh = ~np.isin(seed_ids, stale)
    merged = merge_seed_lists(earlier, search(newly, seeds[fresh], seed_ids[fresh]), dropped, k, "s")
    merged = merged.filter(pa.array(~np.isin(merged["seed_id"].to_numpy(), stale)))
    again = search(now, seeds[~fresh], seed_ids[~fresh])
    got = pa.concat_tables([merged, again])

    def rows(t: pa.Table) -> list[tuple]:
        return sorted(zip(*(t[c].to_pylist() for c in ("seed_id", "rank", "image_id")), strict=True))

    assert rows(got) == rows(full)
    order = np.lexsort((got["rank"].to_numpy(), got["seed_id"].to_numpy()))
    want = np.lexsort((full["rank"].to_numpy(), full["seed_id"].to_numpy()))
    np.testing.assert_allclose(got["score"].to_numpy()[order], full["score"].to_numpy()[want], rtol=1e-6)
    assert 0 < stale.size < seed_ids.size / 2  # both paths taken
    assert np.isin(merged["image_id"].to_numpy(), newly).any() and not np.isin(got["image_id"], dropped).any()
    # A pool smaller than k: the earlier lists were short; a dropped image does not make them stale.
    small = search(kept_before[:3], seeds[:2], seed_ids[:2])
    assert stale_seeds(small, kept_before[:1], k).size == 0
    grown = merge_seed_lists(small, search(new_ids[:1], seeds[:2], seed_ids[:2]), kept_before[:1], k, "s")
    assert rows(grown) == rows(search(np.r_[kept_before[1:3], new_ids[:1]], seeds[:2], seed_ids[:2]))


def test_incremental_retrieve_equals_a_full_search(grown):
    """The grown run's sample-based seed set started from the earlier lists; its rows are a full
    search's of the grown kept pool (computed here in memory from the tables)."""
    import faiss
    import pyarrow.compute as pc

    from lvd.curation.knn_sharded import VectorPart, read_vector_part
    from lvd.curation.retrieval import retrieve_by_sample
    from lvd.schemas.layout import RETRIEVAL, seed_dataset

    out, _, incremental, _, _ = grown
    assert "merged" in incremental["retrieve"].summary.incremental
    spec = load_job_spec(out.parent / "job-grown.yaml")
    seed = next(s for s in spec.seeds if s.strategy == "sample")
    embed = layout.list_parts(layout.table_dir(out, layout.EMBEDDINGS), RETRIEVAL)
    dedup = {layout.part_index(p): p for p in layout.list_parts(layout.table_dir(out, layout.DEDUP))}
    images = {layout.part_index(p): p for p in layout.list_parts(layout.table_dir(out, layout.IMAGES))}

    def vectors(parts: list[VectorPart]) -> tuple[np.ndarray, np.ndarray]:
        read = [read_vector_part(p) for p in parts]
        return np.concatenate([r[0] for r in read]), np.concatenate([r[1] for r in read])

    pool_ids, pool = vectors(
        [
            VectorPart(p, dedup[layout.part_index(p)], pc.field("keep"))
            for p in embed
            if layout.part_index(p) in dedup
        ]
    )
    is_seed = (pc.field("dataset") == seed_dataset(seed.name)) & (pc.field("status") == "ok")
    seed_ids, seeds = vectors([VectorPart(p, images[layout.part_index(p)], is_seed) for p in embed])
    index = faiss.IndexFlatIP(pool.shape[1])
    index.add(pool)
    want = retrieve_by_sample(index, pool_ids, seeds, seed_ids, seed.name, k=seed.k)
    got = layout.read_table(out, layout.RETRIEVED).filter(pc.equal(pc.field("seed_set"), seed.name))

    def rows(t: pa.Table) -> list[tuple]:
        return sorted(zip(*(t[c].to_pylist() for c in ("seed_id", "rank", "image_id")), strict=True))

    assert len(rows(got)) == seed_ids.size * seed.k and rows(got) == rows(want)
