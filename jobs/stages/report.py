"""report stage: the DECISIONS table (one row per pool image, the story of its path through the job)
and the HTML report (`jobs.report_html`), after the shards.

Passes, each on Ray workers (the driver holds per-part and per-bucket results, and the ids of the
images that duplicates lost to, which grow with the duplicates as dedup's edges do; ARCHITECTURE.md):
  ranges   each ingest part's pool id range, and the images its duplicates lost to
  eval     a kNN search of the eval-overlap images against the eval sets (their nearest eval image)
  scatter  per ingest part: pool rows with their dedup and cluster columns into buckets of the id
           range; duplicates' vectors into the bucket of the image they lost to, beside its vector.
           Retrieved, curated, shard and eval rows into the buckets of their image ids
  cosines  per bucket: each duplicate's cosine to the image it lost to, into its own id's bucket
  merge    per bucket: one DECISIONS part (`curation.decisions.merge_bucket`), sorted by image_id
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from lvd.curation import decisions as dec
from lvd.curation.curated import ROWS_PER_BUCKET, bucket_bounds
from lvd.curation.knn_sharded import TopKWriter, VectorPart
from lvd.curation.sampling import leaf_pick_keys
from lvd.curation.stage_io import copy_detection_model
from lvd.jobs.stage import Resources, Stage, StageContext, StageSummary
from lvd.jobs.workers import run_tasks
from lvd.schemas import layout
from lvd.schemas.layout import POOL, eval_dataset
from lvd.schemas.tables import DECISIONS, read_parts, write_parquet_atomic

log = logging.getLogger("lvd")

SCATTER_TASKS = 512  # writers per source: a bucket folder holds at most this many files per source

DUPS = "dups"  # scratch source: duplicates' vectors, by the id of the image they lost to
REPS = "reps"  # scratch source: vectors of the images duplicates lost to


@dataclass
class ReportSummary(StageSummary):
    FUNNEL = ()
    images: int = 0  # DECISIONS rows (pool images)
    in_output: int = 0
    report_bytes: int = 0
    report_seconds: float = 0.0


@dataclass(frozen=True)
class _Part:
    index: int
    ingest: Path
    dedup: Path | None
    clusters: Path | None
    vectors: Path | None  # the copy-detection (dedup) model's embed part


def _range_task(part: _Part) -> tuple[int, int | None, int | None, np.ndarray]:
    """(pool rows, min id, max id, the images this part's duplicates lost to) of one ingest part."""
    ids = ds.dataset(part.ingest, format="parquet").to_table(
        columns=["image_id"], filter=pc.field("dataset") == POOL
    )["image_id"]
    reps = np.zeros(0, np.int64)
    if part.dedup is not None:
        dup = pq.read_table(part.dedup, columns=["duplicate_of"])["duplicate_of"].drop_null()
        reps = np.unique(dup.to_numpy())
    if len(ids) == 0:
        return 0, None, None, reps
    mm = pc.min_max(ids)
    return len(ids), mm["min"].as_py(), mm["max"].as_py(), reps


def pool_rows(part: _Part, seed: int) -> pa.Table:
    """One ingest part's pool images with their ingest, dedup and cluster columns (`dec.POOL`)."""
    images = ds.dataset(part.ingest, format="parquet").to_table(
        columns=["image_id", "uri", "status", "error"], filter=pc.field("dataset") == POOL
    )
    ids = images["image_id"].to_numpy()
    n = ids.size
    dedup = pq.read_table(part.dedup) if part.dedup is not None else None
    clusters = pq.read_table(part.clusters) if part.clusters is not None else None

    def aligned(table: pa.Table | None, column: str, typ: pa.DataType) -> pa.Array:
        if table is None:
            return pa.nulls(n, typ)
        return dec.align_to_ids(ids, table, column, typ)

    keep = aligned(dedup, "keep", pa.bool_())
    reason = aligned(dedup, "reason", pa.string())
    dedup_status = pc.if_else(keep, pa.scalar(dec.KEPT), reason)
    cluster_ids = aligned(clusters, "cluster_ids", pa.list_(pa.int32()))
    draw = np.where(cluster_ids.is_valid().to_numpy(zero_copy_only=False), leaf_pick_keys(ids, seed), np.nan)
    return pa.table(
        {
            "image_id": images["image_id"],
            "uri": images["uri"],
            "ingest": images["status"],
            "ingest_error": images["error"],
            "embedded": keep.is_valid(),
            "dedup": dedup_status,
            "component_id": aligned(dedup, "component_id", pa.int64()),
            "duplicate_of": aligned(dedup, "duplicate_of", pa.int64()),
            "cluster_ids": cluster_ids,
            "cluster_distance": aligned(clusters, "distance", pa.float32()),
            "draw": pa.array(draw, pa.float64(), mask=np.isnan(draw)),
        },
        schema=dec.POOL,
    )


def _pool_task(
    item: tuple[int, list[_Part]], *, scratch: Path, bounds: np.ndarray, reps: np.ndarray, seed: int
) -> int:
    """Scatters a group of ingest parts: pool rows, duplicates' and representatives' vectors."""
    writer, parts = item
    pools, dups, rep_rows = [], [], []
    for part in parts:
        pool = pool_rows(part, seed)
        pools.append(pool)
        if part.vectors is None or part.dedup is None:
            continue
        dedup = pq.read_table(part.dedup, columns=["image_id", "duplicate_of"])
        lost = dedup.filter(dedup["duplicate_of"].is_valid())
        ids = dedup["image_id"].to_numpy()
        rep_ids = ids[np.isin(ids, reps)]
        wanted = np.union1d(lost["image_id"].to_numpy(), rep_ids)
        if wanted.size == 0:
            continue
        vectors = ds.dataset(part.vectors, format="parquet").to_table(
            columns=["image_id", "vector"], filter=pc.field("image_id").isin(wanted)
        )
        vectors = vectors.filter(vectors["vector"].is_valid())
        lost_ids = lost["image_id"].to_numpy()
        lost_vectors = dec.align_to_ids(lost_ids, vectors, "vector", vectors.schema.field("vector").type)
        lost = lost.append_column("vector", lost_vectors).filter(lost_vectors.is_valid())
        dups.append(lost)
        rep_rows.append(vectors.filter(pc.is_in(vectors["image_id"], pa.array(rep_ids))))
    rows = 0
    for name, tables in (("pool", pools), (DUPS, dups), (REPS, rep_rows)):
        if not tables:
            continue
        table = pa.concat_tables(tables)
        key = "duplicate_of" if name == DUPS else "image_id"
        rows += dec.scatter(table, bounds, scratch / name, writer, table.schema, key)
    return rows


def _rows_of(kind: str, path: Path) -> pa.Table:
    """The rows one part of a stage table gives its images' stories (`dec.SOURCES[kind]`)."""
    if kind == "retrieved":
        return pq.read_table(path, columns=dec.RETRIEVED_ROWS.names)
    if kind == "curated":
        return pq.read_table(path, columns=dec.CURATED_ROWS.names)
    if kind == "shard":
        return pq.read_table(path, columns=["image_id", "shard", "key"])
    if kind == "eval":
        t = pq.read_table(path).filter(pc.field("rank") == 0)
        return pa.table(
            {"image_id": t["query_id"], "eval_match": t["image_id"], "eval_cosine": t["score"]},
            schema=dec.EVAL_ROWS,
        )
    raise ValueError(kind)


def _table_task(item: tuple[int, list[tuple[str, str]]], *, scratch: Path, bounds: np.ndarray) -> int:
    writer, parts = item
    by_kind: dict[str, list[pa.Table]] = {}
    for kind, path in parts:
        by_kind.setdefault(kind, []).append(_rows_of(kind, Path(path)))
    schema = dec.SOURCES
    return sum(
        dec.scatter(pa.concat_tables(t).cast(schema[k]), bounds, scratch / k, writer, schema[k])
        for k, t in by_kind.items()
    )


def _cosine_task(bucket: int, *, scratch: Path, bounds: np.ndarray) -> int:
    """One bucket of duplicates (by the image they lost to) -> their cosines, into their own buckets."""
    dups = layout.list_parts(layout.bucket_dir(scratch / DUPS, bucket))
    reps = layout.list_parts(layout.bucket_dir(scratch / REPS, bucket))
    if not dups or not reps:
        return 0
    cosines = dec.pair_cosines(read_parts(dups), read_parts(reps))
    return dec.scatter(cosines, bounds, scratch / "cosine", bucket, dec.COSINE_ROWS)


def _merge_task(bucket: int, *, scratch: Path, out_dir: Path) -> tuple[int, int]:
    tables = {k: dec.read_bucket(scratch / k, bucket, s) for k, s in dec.SOURCES.items()}
    table = dec.merge_bucket(
        tables["pool"],
        tables["retrieved"],
        tables["curated"],
        tables["shard"],
        tables["eval"],
        tables["cosine"],
    )
    write_parquet_atomic(table, layout.part_path(out_dir, bucket), DECISIONS)
    return table.num_rows, int(pc.sum(pc.equal(table["outcome"], dec.IN_OUTPUT)).as_py() or 0)


def _eval_matches(ctx: StageContext, parts: list[_Part], scratch: Path) -> list[Path]:
    """Result parts of the search of the eval-overlap images against the eval sets (nearest only)."""
    from lvd.curation.knn_ray import search_parts
    from lvd.jobs.pipeline import read_marker

    spec = ctx.spec
    dedup = read_marker(layout.stage_dir(ctx.out_dir, "dedup")) or {}
    if not spec.eval_sets or not dedup.get("summary", {}).get("eval_overlap", 1):
        return []  # no pool image overlaps the eval sets: no search to start
    with_vectors = [p for p in parts if p.vectors is not None and p.dedup is not None]
    queries = [
        VectorPart(p.vectors, rows=p.dedup, where=pc.field("reason") == "eval-overlap") for p in with_vectors
    ]
    evals = [eval_dataset(e.name) for e in spec.eval_sets]
    is_eval = pc.field("dataset").isin(evals) & (pc.field("status") == "ok")
    database = [VectorPart(p.vectors, rows=p.ingest, where=is_eval) for p in with_vectors]
    writer = TopKWriter(scratch)
    search_parts(
        queries, database, 1, spec.dedup, write=writer, check_recall=False, name="report: eval matches"
    )
    return [writer.output(i) for i in range(len(queries)) if writer.output(i).exists()]


def build_decisions(ctx: StageContext) -> tuple[int, int]:
    """Writes the DECISIONS parts; returns (pool images, images in the output)."""
    spec = ctx.spec
    out_dir = ctx.output_dir(layout.DECISIONS)
    model = copy_detection_model(spec)
    dedup = {layout.part_index(p): p for p in ctx.parts(layout.DEDUP)}
    clusters = {layout.part_index(p): p for p in ctx.parts(layout.CLUSTERS)}
    vectors = {layout.part_index(p): p for p in ctx.parts(layout.EMBEDDINGS, model)}
    parts = [
        _Part(i, p, dedup.get(i), clusters.get(i), vectors.get(i))
        for i, p in ((layout.part_index(p), p) for p in ctx.parts(layout.IMAGES))
    ]
    scratch = ctx.scratch_dir("buckets")
    shutil.rmtree(scratch, ignore_errors=True)
    ctx.ray()
    ranges = run_tasks(_range_task, parts, name="report: id ranges")
    rows = sum(r[0] for r in ranges)
    ends = [e for r in ranges for e in r[1:3] if e is not None]
    reps = np.unique(np.concatenate([np.zeros(0, np.int64), *(r[3] for r in ranges)]))
    buckets = max(1, -(-rows // ROWS_PER_BUCKET))
    bounds = bucket_bounds(min(ends, default=0), max(ends, default=0), buckets)

    eval_parts = _eval_matches(ctx, parts, ctx.scratch_dir("eval_search"))
    size = max(1, -(-len(parts) // SCATTER_TASKS))
    groups = list(enumerate(parts[i : i + size] for i in range(0, len(parts), size)))
    seed = spec.sampling.seed
    run_tasks(
        _pool_task, groups, name="report: pool rows", scratch=scratch, bounds=bounds, reps=reps, seed=seed
    )
    shard_parts = layout.shard_tables(ctx.input_dir(layout.SHARDS))  # the latest version's
    sources = [("retrieved", str(p)) for p in ctx.parts(layout.RETRIEVED)]
    sources += [("curated", str(p)) for p in ctx.parts(layout.CURATED)]
    sources += [("shard", str(p)) for p in shard_parts]
    sources += [("eval", str(p)) for p in eval_parts]
    size = max(1, -(-len(sources) // SCATTER_TASKS))
    writers = list(enumerate(sources[i : i + size] for i in range(0, len(sources), size)))
    run_tasks(_table_task, writers, name="report: stage rows", scratch=scratch, bounds=bounds)
    run_tasks(
        _cosine_task, list(range(buckets)), name="report: duplicate cosines", scratch=scratch, bounds=bounds
    )
    merged = run_tasks(
        _merge_task, list(range(buckets)), name="report: decisions", scratch=scratch, out_dir=out_dir
    )
    for stale in layout.list_parts(out_dir)[buckets:]:
        stale.unlink()
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.rmtree(ctx.scratch_dir("eval_search"), ignore_errors=True)
    return sum(m[0] for m in merged), sum(m[1] for m in merged)


def run(ctx: StageContext) -> ReportSummary:
    import time

    from lvd.jobs.report_html import write_report

    images, in_output = build_decisions(ctx)
    t0 = time.perf_counter()
    path = write_report(ctx.out_dir, ctx.spec)
    seconds = time.perf_counter() - t0
    size = path.stat().st_size
    log.info("report: %s (%d bytes, %.1f s)", path, size, seconds)
    return ReportSummary(
        images=images, in_output=in_output, report_bytes=size, report_seconds=round(seconds, 2)
    )


STAGE = Stage(
    name="report",
    reads=(
        layout.IMAGES,
        layout.EMBEDDINGS,
        layout.DEDUP,
        layout.CLUSTERS,
        layout.CENTROIDS,
        layout.RETRIEVED,
        layout.CURATED,
        layout.SHARDS,
    ),
    writes=(layout.DECISIONS,),
    spec_sections=("embedding", "dedup", "sampling"),
    resources=Resources(engine="ray"),
    summary=ReportSummary,
    run=run,
)
