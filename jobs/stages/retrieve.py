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

import json
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
from lvd.curation.dedup import FLIPS_AGAINST, KEEP_FLIPS, parts_fingerprint
from lvd.curation.kmeans import kmeans_assign
from lvd.curation.knn_sharded import PartWriter, VectorPart, read_vector_part
from lvd.curation.retrieval import (
    count_collisions,
    merge_seed_lists,
    rank_cluster_members,
    retrieve_as_is,
    stale_seeds,
    topk_rows,
)
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
from lvd.schemas.tables import RETRIEVED, write_json_atomic, write_parquet_atomic

log = logging.getLogger("lvd")

ROWS_PER_COUNT_TASK = 1_000_000  # retrieved rows per id-range task of the summary counts


@dataclass
class RetrieveSummary(StageSummary):
    FUNNEL = (("retrieved by seed sets", "images"),)
    images: int = 0
    rows: int = 0
    collisions: int = 0
    per_seed_set: dict[str, int] = field(default_factory=dict)
    # Incremental run: "" (every seed set searched in full), else what the sample-based seed sets reused.
    incremental: str = ""


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


# ---------------------------------------------------------------- incremental (a source added)


@dataclass
class Earlier:
    """What the stage's previous run left for a run on a grown pool, and how the pool changed since."""

    folder: Path
    part_of: dict[str, str]  # seed set -> {content digest of a query part's images part: its file name}
    digests: set[str]  # of every images part of the earlier run
    dropped: np.ndarray  # sorted ids of images the earlier run's pool held and this one's does not
    newly_kept: np.ndarray  # sorted ids of earlier images the pool holds now and did not then


def read_earlier(
    ctx: StageContext, settings: str, digests: dict[int, str] | None
) -> tuple[Earlier | None, str]:
    """The previous run's lists when a sample-based seed set can start from them, else (None, why not):
    same settings and models, every earlier images part still here, and dedup's keep flips relative
    to the same earlier parts."""
    previous = ctx.previous_dir
    if previous is None or digests is None:
        return None, "no earlier run"
    try:
        state = json.loads((previous / layout.RETRIEVE_STATE).read_text())
        flips_file = ctx.input_dir(layout.DEDUP) / layout.DEDUP_KEEP_FLIPS
        flips = pq.read_table(flips_file, schema=KEEP_FLIPS)
        against = (pq.read_schema(flips_file).metadata or {}).get(FLIPS_AGAINST, b"").decode()
    except (OSError, ValueError, KeyError) as e:
        return None, f"the earlier run or dedup left no state ({type(e).__name__})"
    if state.get("settings") != settings:
        return None, "seed sets, retrieval or clustering settings, or the embedding models changed"
    before = set(state["digests"].values())
    if not before <= set(digests.values()):
        return None, "images parts of the earlier run are gone"
    if against != parts_fingerprint(before):
        return None, "dedup's keep flips are relative to another earlier run"
    keep = flips["keep"].to_numpy(zero_copy_only=False)
    ids = flips["image_id"].to_numpy()
    return Earlier(previous, state["parts"], before, np.sort(ids[~keep]), np.sort(ids[keep])), ""


def _stale_task(path: Path, *, dropped: np.ndarray, k: int) -> np.ndarray:
    """One earlier RETRIEVED part -> its seeds whose lists lost an image that filled them."""
    return stale_seeds(pq.read_table(path, schema=RETRIEVED), dropped, k)


def _merge_task(
    item: tuple[Path, Path | None, Path | None, Path | None, np.ndarray],
    *,
    dropped: np.ndarray,
    k: int,
    seed_set: str,
) -> int:
    """One query part's RETRIEVED part on the grown pool: its earlier lists merged with its lists among
    the newly kept images, and the lists of the seeds searched again in full. item = (output, earlier
    part, newly kept part, searched again part, the seeds searched again)."""
    out, earlier, newly, again, stale = item

    def read(path: Path | None) -> pa.Table:
        return (
            pq.read_table(path, schema=RETRIEVED)
            if path is not None and path.exists()
            else RETRIEVED.empty_table()
        )

    tables = [read(again)]
    if earlier is not None:
        old, new = read(earlier), read(newly)
        old = old.filter(pa.array(~np.isin(old["seed_id"].to_numpy(), stale)))
        new = new.filter(pa.array(~np.isin(new["seed_id"].to_numpy(), stale)))
        tables.append(merge_seed_lists(old, new, dropped, k, seed_set))
    table = pa.concat_tables(tables).sort_by([("seed_id", "ascending"), ("rank", "ascending")])
    write_parquet_atomic(table, out, RETRIEVED)
    return table.num_rows


def _retrieve_by_sample_incremental(
    ctx: StageContext,
    pool: _Pool,
    seed: SeedSet,
    s: int,
    queries: list[tuple[int, VectorPart]],
    outputs: list[Path],
    earlier: Earlier,
    digests: dict[int, str],
    embed: dict[int, Path],
    dedup: dict[int, Path],
) -> tuple[int, str]:
    """A sample-based seed set on a grown pool: each seed's earlier list merged with its top k among
    the newly kept images; the seeds of new parts, and those whose lists lost an image that filled
    them, searched against the whole pool. The rows equal a full search's. Returns (rows, what it did)."""
    from lvd.curation.knn_ray import search_parts

    spec, k = ctx.spec, seed.k
    files = earlier.part_of.get(seed.name, {})
    earlier_part = {
        j: earlier.folder / files[digests[i]]
        for j, (i, _) in enumerate(queries)
        if digests.get(i) in files and (earlier.folder / files[digests[i]]).exists()
    }
    old = sorted(earlier_part)
    stale_lists = run_tasks(
        _stale_task, [earlier_part[j] for j in old], name=f"retrieve {seed.name}: lists that lost an image",
        dropped=earlier.dropped, k=k,
    )  # fmt: skip
    stale = dict(zip(old, stale_lists, strict=True))
    # The newly kept images: those of new parts, and earlier images whose keep flipped to kept.
    newly = [
        VectorPart(embed[i], rows=dedup[i], where=pc.field("keep"))
        for i in sorted(embed)
        if i in dedup and digests.get(i) not in earlier.digests
    ]
    if earlier.newly_kept.size:
        flipped = pc.field("keep") & pc.field("image_id").isin(earlier.newly_kept)
        newly += [
            VectorPart(embed[i], rows=dedup[i], where=flipped)
            for i in sorted(embed)
            if i in dedup and digests.get(i) in earlier.digests
        ]
    newly_dir = ctx.scratch_dir(f"newly_{s}_rows")
    if newly and old:
        writer = RetrievedWriter(ctx.scratch_dir(f"newly_{s}"), newly_dir, seed.name, 0)
        search_parts(
            [queries[j][1] for j in old], newly, k, spec.retrieval, write=writer, check_recall=False,
            name=f"retrieve {seed.name}: seeds against the newly kept images",
        )  # fmt: skip
    # Searched in full: every seed of a new part, and the stale seeds of the others.
    again = [j for j in range(len(queries)) if j not in earlier_part] + [j for j in old if stale[j].size]
    again_dir = ctx.scratch_dir(f"again_{s}_rows")
    if again:
        parts = [
            queries[j][1]
            if j not in earlier_part
            else VectorPart(
                queries[j][1].vectors,
                rows=queries[j][1].rows,
                where=queries[j][1].where & pc.field("image_id").isin(stale[j]),
            )  # fmt: skip
            for j in again
        ]
        writer = RetrievedWriter(ctx.scratch_dir(f"again_{s}"), again_dir, seed.name, 0)
        search_parts(
            parts, pool.parts, k, spec.retrieval, write=writer, check_recall=False,
            name=f"retrieve {seed.name}: seeds searched in full",
        )  # fmt: skip
    again_at = {j: n for n, j in enumerate(again)}
    old_at = {j: n for n, j in enumerate(old)}
    items = [
        (
            outputs[j],
            earlier_part.get(j),
            part_path(newly_dir, old_at[j]) if j in old_at else None,
            part_path(again_dir, again_at[j]) if j in again_at else None,
            stale.get(j, np.zeros(0, np.int64)),
        )
        for j in range(len(queries))
    ]
    rows = sum(
        run_tasks(_merge_task, items, name=f"retrieve {seed.name}: merge", dropped=earlier.dropped, k=k,
                  seed_set=seed.name)
    )  # fmt: skip
    n_stale = int(sum(v.size for v in stale.values()))
    did = (
        f"{seed.name}: {len(old)} query parts merged with their lists among {len(newly)} parts of newly kept "
        f"images; {len(queries) - len(old)} new query parts and {n_stale} seeds whose lists lost an image "
        "searched in full"
    )
    return int(rows), did


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
    from lvd.jobs.stages.dedup import embed_digests

    spec = ctx.spec
    out_dir = ctx.output_dir(layout.RETRIEVED)
    ingest = {layout.part_index(p): p for p in ctx.parts(layout.IMAGES)}
    embed = {layout.part_index(p): p for p in ctx.parts(layout.EMBEDDINGS, RETRIEVAL)}
    dedup = {layout.part_index(p): p for p in ctx.parts(layout.DEDUP)}
    n_parts = max([*ingest, *embed, -1]) + 1  # part numbers of one seed set's parts
    pool = _Pool(ctx, embed, dedup)
    ctx.ray()
    digests, models = embed_digests(ctx)
    settings = f"{spec.fingerprint(*STAGE.spec_sections)}:{models}"
    earlier, why = read_earlier(ctx, settings, digests)
    if ctx.previous_dir is not None and earlier is None:
        log.info("retrieve: sample-based seed sets searched in full, not incremental: %s", why)
    per_seed_set: dict[str, int] = {}
    written: list[Path] = []
    part_of: dict[str, dict[str, str]] = {}
    did: list[str] = []
    for s, seed in enumerate(spec.seeds):
        first = s * n_parts
        indexed = [
            (i, VectorPart(embed[i], rows=ingest[i], where=_seed_filter(seed))) for i in ingest if i in embed
        ]
        queries = [q for _, q in indexed]
        if seed.strategy == "as_is":
            items = [(part_path(out_dir, first + i), g) for i, g in ingest.items()]
            rows = sum(run_tasks(_as_is_task, items, name=f"retrieve {seed.name}", seed=seed))
            written += [out for out, _ in items]
        elif seed.strategy == "sample":
            outputs = [part_path(out_dir, first + j) for j in range(len(queries))]
            if earlier is not None:
                rows, what = _retrieve_by_sample_incremental(
                    ctx, pool, seed, s, indexed, outputs, earlier, digests, embed, dedup
                )
                did.append(what)
            else:
                writer = RetrievedWriter(ctx.scratch_dir(f"search_{s}"), out_dir, seed.name, first)
                result = search_parts(
                    queries, pool.parts, seed.k, spec.retrieval, write=writer, check_recall=False,
                    name=f"retrieve {seed.name}",
                )  # fmt: skip
                rows = result.rows
            written += outputs
            if digests is not None:
                part_of[seed.name] = {
                    digests[i]: outputs[j].name for j, (i, _) in enumerate(indexed) if i in digests
                }
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
    if digests is not None:
        # What a later run on a grown pool starts from (`read_earlier`): per-part digests only.
        state = {"settings": settings, "digests": {str(i): d for i, d in digests.items()}, "parts": part_of}
        write_json_atomic(out_dir / layout.RETRIEVE_STATE, state)
    images, collisions = _distinct_and_collisions(sorted(written))
    summary = RetrieveSummary(
        images=images, rows=sum(per_seed_set.values()), collisions=collisions, per_seed_set=per_seed_set
    )
    if did:
        summary.incremental = "; ".join(did)
        log.info("retrieve: incremental: %s", summary.incremental)
    return summary


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
    reuses_previous=True,
)
