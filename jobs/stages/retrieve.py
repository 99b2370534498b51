"""retrieve stage: pool images for each seed set (as_is / sample / cluster), part by part on Ray.

The pool is the kept pool (after dedup) with its retrieval vectors. Each seed set writes its own
RETRIEVED parts, numbered `seed set index * parts + query part`:
- as_is: a task per ingest part writes the seed set's own images.
- sample: the k nearest kept pool images of every seed image, searched by shard actors that hold
  the pool (`curation.knn_ray.search_parts` with the `retrieval` spec section); each query part's
  task writes its rows.
- cluster: seed images are assigned to the level-0 centroids of the cluster stage (or of a k-means
  of the kept pool with the seed set's own `num_clusters`) by tasks that return per-cluster counts;
  the driver picks the clusters and how many members each gives (most seeds first, capped by
  `max_images`); the members nearest each centroid are found with per-cluster cutoffs
  (`jobs.selection.select_smallest`), and one task ranks the chosen members (at most `max_images`
  rows) and writes the seed set's part.
The summary's distinct images and collisions are counted by tasks over ranges of image ids.
The driver holds per-part results and per-cluster counts only (ARCHITECTURE.md).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from lvd.curation.curated import bucket_bounds
from lvd.curation.kmeans import kmeans_assign
from lvd.curation.knn_sharded import PartWriter, VectorPart, read_vector_part
from lvd.curation.retrieval import count_collisions, rank_cluster_members, retrieve_as_is, topk_rows
from lvd.jobs.kmeans_parts import (
    cluster_ranges,
    clusters_rows,
    fit_options,
    kept_pool_parts,
    kmeans_over_parts,
    label_rows,
)
from lvd.jobs.selection import select_smallest
from lvd.jobs.stage import Resources, Stage, StageContext, StageSummary
from lvd.jobs.workers import run_tasks
from lvd.schemas import layout
from lvd.schemas.job_spec import SeedSet
from lvd.schemas.layout import RETRIEVAL, part_path, seed_dataset
from lvd.schemas.tables import RETRIEVED, write_parquet_atomic

log = logging.getLogger("lvd")

ROWS_PER_COUNT_TASK = 1_000_000  # retrieved rows per id-range task of the summary counts


@dataclass
class RetrieveSummary(StageSummary):
    FUNNEL = (("retrieved by seed sets", "images"),)
    images: int = 0
    rows: int = 0
    collisions: int = 0
    per_seed_set: dict[str, int] = field(default_factory=dict)


def _seed_filter(seed: SeedSet) -> pc.Expression:
    return (pc.field("dataset") == seed_dataset(seed.name)) & (pc.field("status") == "ok")


# ---------------------------------------------------------------- per-part tasks


def _as_is_task(item: tuple[int, Path], *, seed: SeedSet) -> int:
    """One ingest part -> the seed set's own ok images in it, as RETRIEVED rows."""
    out, ingest = item
    ids = ds.dataset(ingest, format="parquet").to_table(columns=["image_id"], filter=_seed_filter(seed))
    table = retrieve_as_is(np.sort(ids["image_id"].to_numpy()), seed.name)
    write_parquet_atomic(table, out, RETRIEVED)
    return table.num_rows


class RetrievedWriter(PartWriter):
    """Search results of one sample-based seed set, written straight as RETRIEVED parts into
    `out_dir`; the search keeps its own state in `folder` (a scratch folder)."""

    schema = RETRIEVED

    def __init__(self, folder: str | Path, out_dir: Path, seed_set: str, first_part: int):
        super().__init__(folder)
        self.out_dir, self.seed_set, self.first_part = out_dir, seed_set, first_part

    def output(self, part: int) -> Path:
        return part_path(self.out_dir, self.first_part + part)

    def rows(self, query_ids: np.ndarray, sims: np.ndarray, ids: np.ndarray) -> pa.Table:
        return topk_rows(query_ids, sims, ids, self.seed_set)


def _seed_counts_task(query: VectorPart, *, centroids: np.ndarray, spherical: bool) -> np.ndarray:
    """One part's seed images -> how many of them fall in each cluster."""
    _, vectors = read_vector_part(query)
    if vectors.shape[0] == 0:
        return np.zeros(centroids.shape[0], np.int64)
    labels, _ = kmeans_assign(vectors, centroids, spherical=spherical)
    return np.bincount(labels, minlength=centroids.shape[0])


MEMBERS = pa.schema([("image_id", pa.int64()), ("label", pa.int64()), ("distance", pa.float32())])


def _members_task(path: Path, *, load, cutoffs) -> pa.Table:
    """One clusters (or label) part -> its members inside the cutoffs: (image_id, label, distance)."""
    labels, dist, ids = load(path)
    keep = cutoffs.members(labels, dist, ids)
    return pa.table({"image_id": ids[keep], "label": labels[keep], "distance": dist[keep]}, schema=MEMBERS)


def _write_cluster_part(
    members: list, *, out: Path, priority: np.ndarray, spherical: bool, seed_set: str
) -> int:
    """All chosen members of one seed set (at most its max_images) -> its ranked RETRIEVED part."""
    import ray

    table = pa.concat_tables([MEMBERS.empty_table(), *ray.get(members)])
    rows = rank_cluster_members(
        table["image_id"].to_numpy(),
        table["label"].to_numpy(),
        table["distance"].to_numpy(),
        priority,
        seed_set,
        spherical=spherical,
    )
    write_parquet_atomic(rows, out, RETRIEVED)
    return rows.num_rows


def _count_task(bounds: tuple[int, int], *, parts: list[Path]) -> tuple[int, int]:
    """Distinct images and collisions among the retrieved rows with lo <= image_id < hi."""
    lo, hi = bounds
    flt = (pc.field("image_id") >= lo) & (pc.field("image_id") < hi)
    columns = ["image_id", "seed_id", "strategy"]
    table = ds.dataset([str(p) for p in parts], format="parquet", schema=RETRIEVED).to_table(
        columns, filter=flt
    )
    return int(pc.count_distinct(table["image_id"]).as_py()), count_collisions(table)


def _id_range_task(path: Path) -> tuple[int, int, int]:
    ids = pq.read_table(path, columns=["image_id"])["image_id"]
    if len(ids) == 0:
        return 0, 0, 0
    mm = pc.min_max(ids)
    return len(ids), mm["min"].as_py(), mm["max"].as_py()


# ---------------------------------------------------------------- the driver


class _Pool:
    """The kept pool's parts and, made on first use, its level-0 clusterings."""

    def __init__(self, ctx: StageContext, embed: dict[int, Path], dedup: dict[int, Path]):
        self.ctx = ctx
        # Embed part i's kept images are listed in dedup part i (dedup writes one part per part).
        self.parts = [
            VectorPart(embed[i], rows=dedup[i], where=pc.field("keep")) for i in embed if i in dedup
        ]
        self._clusterings: dict[int | None, tuple[list[Path], object, np.ndarray]] = {}

    def clustering(self, num_clusters: int | None):
        """(parts to read, their row loader, level-0 centroids) of the clustering a seed set uses."""
        if num_clusters not in self._clusterings:
            ctx, cfg = self.ctx, self.ctx.spec.clustering
            if num_clusters is None:
                cent = pq.read_table(ctx.table_file(layout.CENTROIDS)).filter(pc.field("level") == 0)
                cent = cent.sort_by("cluster_id")
                centroids = np.asarray(cent["centroid"].to_pylist(), np.float32).reshape(cent.num_rows, -1)
                self._clusterings[None] = (ctx.parts(layout.CLUSTERS), clusters_rows, centroids)
            else:
                parts, counts = kept_pool_parts(
                    ctx.parts(layout.EMBEDDINGS, RETRIEVAL), ctx.parts(layout.DEDUP)
                )
                parts = [p for p, c in zip(parts, counts, strict=True) if c]
                n = int(sum(counts))
                k = min(num_clusters, n)
                if k < num_clusters:
                    log.warning(
                        "retrieve: num_clusters=%d but the pool has %d images; using %d", num_clusters, n, k
                    )
                res = kmeans_over_parts(
                    parts,
                    k,
                    ctx.scratch_dir(f"kmeans_{num_clusters}"),
                    n=n,
                    **fit_options(cfg),
                )
                self._clusterings[num_clusters] = (res.label_parts, label_rows, res.centroids)
        return self._clusterings[num_clusters]


def _retrieve_by_cluster(
    ctx: StageContext, pool: _Pool, seed: SeedSet, queries: list[VectorPart], out: Path
) -> int:
    spherical = ctx.spec.clustering.spherical
    paths, load, centroids = pool.clustering(seed.num_clusters)
    k = centroids.shape[0]
    if k == 0 or not paths:
        write_parquet_atomic(RETRIEVED.empty_table(), out, RETRIEVED)
        return 0
    seeds_in = np.sum(
        run_tasks(_seed_counts_task, queries, name=f"retrieve {seed.name}: seeds per cluster",
                  centroids=centroids, spherical=spherical),
        axis=0,
    )  # fmt: skip
    stats = cluster_ranges(paths, load, k)
    take = np.where(seeds_in > seed.min_seed_images, np.minimum(seed.images_per_cluster, stats.counts), 0)
    priority_order = np.lexsort((np.arange(k), -seeds_in))  # most seeds first, ties by cluster id
    counts = np.zeros(k, np.int64)
    before = np.cumsum(take[priority_order]) - take[priority_order]
    counts[priority_order] = np.clip(seed.max_images - before, 0, take[priority_order])
    if counts.sum() == 0:
        write_parquet_atomic(RETRIEVED.empty_table(), out, RETRIEVED)
        return 0
    cutoffs = select_smallest(
        paths,
        load,
        stats.counts,
        counts,
        stats.min_distance,
        stats.max_distance,
        name=f"retrieve {seed.name}",
    )
    import ray

    member = ray.remote(_members_task)
    refs = [member.remote(p, load=load, cutoffs=cutoffs) for p in paths]
    priority = np.empty(k, np.int64)
    priority[priority_order] = np.arange(k)
    # The members go from the part tasks to the writing task without passing through the driver.
    return ray.get(
        ray.remote(_write_cluster_part).remote(
            refs, out=out, priority=priority, spherical=spherical, seed_set=seed.name
        )
    )


def run(ctx: StageContext) -> RetrieveSummary:
    from lvd.curation.knn_ray import search_parts

    spec = ctx.spec
    out_dir = ctx.output_dir(layout.RETRIEVED)
    ingest = {layout.part_index(p): p for p in ctx.parts(layout.IMAGES)}
    embed = {layout.part_index(p): p for p in ctx.parts(layout.EMBEDDINGS, RETRIEVAL)}
    dedup = {layout.part_index(p): p for p in ctx.parts(layout.DEDUP)}
    n_parts = max([*ingest, *embed, -1]) + 1  # part numbers of one seed set's parts
    pool = _Pool(ctx, embed, dedup)
    ctx.ray()
    per_seed_set: dict[str, int] = {}
    written: list[Path] = []
    for s, seed in enumerate(spec.seeds):
        first = s * n_parts
        queries = [
            VectorPart(embed[i], rows=ingest[i], where=_seed_filter(seed)) for i in ingest if i in embed
        ]
        if seed.strategy == "as_is":
            items = [(part_path(out_dir, first + i), g) for i, g in ingest.items()]
            rows = sum(run_tasks(_as_is_task, items, name=f"retrieve {seed.name}", seed=seed))
            written += [out for out, _ in items]
        elif seed.strategy == "sample":
            writer = RetrievedWriter(ctx.scratch_dir(f"search_{s}"), out_dir, seed.name, first)
            result = search_parts(
                queries, pool.parts, seed.k, spec.retrieval, write=writer, check_recall=False,
                name=f"retrieve {seed.name}",
            )  # fmt: skip
            rows = result.rows
            written += [writer.output(j) for j in range(len(queries))]
        else:
            out = part_path(out_dir, first)
            rows = _retrieve_by_cluster(ctx, pool, seed, queries, out)
            written.append(out)
        per_seed_set[seed.name] = int(rows)
        log.info("retrieve: %s (%s): %d rows", seed.name, seed.strategy, rows)
    for stale in set(layout.list_parts(out_dir)) - set(written):
        stale.unlink()
    for scratch in out_dir.glob("_*"):
        if scratch.is_dir():
            shutil.rmtree(scratch, ignore_errors=True)
    images, collisions = _distinct_and_collisions(sorted(written))
    return RetrieveSummary(
        images=images, rows=sum(per_seed_set.values()), collisions=collisions, per_seed_set=per_seed_set
    )


def _distinct_and_collisions(parts: list[Path]) -> tuple[int, int]:
    """Distinct retrieved images and collisions, counted by tasks over ranges of image ids."""
    ranges = [r for r in run_tasks(_id_range_task, parts, name="retrieve: id ranges") if r[0]]
    if not ranges:
        return 0, 0
    rows = sum(r[0] for r in ranges)
    lo, hi = min(r[1] for r in ranges), max(r[2] for r in ranges)
    bounds = [lo, *bucket_bounds(lo, hi, max(1, -(-rows // ROWS_PER_COUNT_TASK))).tolist(), hi + 1]
    counts = run_tasks(
        _count_task, list(zip(bounds[:-1], bounds[1:], strict=True)), name="retrieve: counts", parts=parts
    )
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


STAGE = Stage(
    name="retrieve",
    reads=(layout.IMAGES, layout.EMBEDDINGS, layout.DEDUP, layout.CLUSTERS, layout.CENTROIDS),
    writes=(layout.RETRIEVED,),
    spec_sections=("seeds", "retrieval", "clustering"),
    resources=Resources(engine="ray", gpu=True),
    summary=RetrieveSummary,
    run=run,
)
