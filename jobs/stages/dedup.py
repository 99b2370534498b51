"""dedup stage: exact, copy-detection and eval-overlap dedup of the pool, part by part on Ray.

Reads ok pool images with a vector of the copy-detection model (the retrieval model's when the
spec has none) and writes one DEDUP part per embed part, a row per such image. Images without a
vector (failed decode or embed) were recorded upstream and take no part.

Workers move the data (see `curation.dedup`, "part by part"): tasks write each part's pool rows and
bucket their content hashes, a task per bucket finds the exact copies, shard actors and query
tasks run the kNN searches (`curation.knn_ray.search_parts`) and write edge parts, tasks write the
DEDUP parts. The driver gathers only the edges above the thresholds, takes the connected
components of their nodes and broadcasts the decisions for those nodes. Everything in between is
scratch (`_pool_rows/`, `_exact/`, `_copy_edges/`, `_eval_edges/`): a killed dedup resumes its map
and its searches where they stopped, and the scratch goes once the table is written.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lvd.curation.dedup import (
    COPY,
    EVAL_OVERLAP,
    EXACT,
    FLIPS_AGAINST,
    FRESH,
    IDS,
    KEEP_FLIPS,
    SEEN,
    areas_of,
    band_pairs,
    bucket_pool_rows,
    carried_copy_edges,
    component_decisions,
    component_size_stats,
    exact_edges_of_bucket,
    fresh_edges_reversed,
    graph_nodes,
    image_locations,
    parts_fingerprint,
    split_seen,
    unique_edges,
    verified_edges,
    verify_pair_batch,
    write_dedup_part,
)
from lvd.curation.knn_ray import search_parts
from lvd.curation.knn_sharded import EDGES, EdgeWriter, VectorPart, read_results
from lvd.curation.stage_io import copy_detection_model, detector_name
from lvd.jobs.stage import Resources, Stage, StageContext, StageSummary
from lvd.jobs.workers import run_tasks
from lvd.schemas import layout
from lvd.schemas.job_spec import DedupSpec
from lvd.schemas.layout import eval_dataset
from lvd.schemas.tables import write_json_atomic, write_parquet_atomic

log = logging.getLogger("lvd")

# Exact dedup shuffles (sha256, image_id) rows through hash buckets: at most this many buckets, and
# map tasks (each over a group of parts), so the scratch holds at most their product of files.
MAX_HASH_BUCKETS = 256
MAX_MAP_TASKS = 1024

VERIFY_BATCH = 64  # candidate pairs per verification task

SCRATCH = ("pool_rows", "exact", "copy_edges", "eval_edges", "split", "copy_seen", "copy_again")


@dataclass
class DedupSummary(StageSummary):
    FUNNEL = (
        ("- exact duplicates", "exact"),
        ("- copies (copy detection)", "copy"),
        ("- eval-set overlap", "eval_overlap"),
        ("= kept pool", "kept"),
    )
    images: int = 0
    exact: int = 0
    copy: int = 0
    eval_overlap: int = 0
    kept: int = 0
    copy_edges: int = 0
    eval_images: int = 0
    model: str = ""
    search: str = ""
    ivf_recall: float | None = None
    shards: int = 0
    detector: str = ""  # the copy detector whose vectors were compared
    grouping: str = ""
    # Incremental run: "" (a full run), else what was reused; `queries_against_pool` counts the
    # images searched against the whole pool (all of them in a full run).
    incremental: str = ""
    queries_against_pool: int = 0
    # Pixel verification (dedup.verify_from): pairs in the band checked, found copies, images unreadable.
    verified_pairs: int = 0
    verified_copies: int = 0
    verify_unreadable: int = 0
    components: int = 0  # duplicate components (two images or more)
    largest_component: int = 0
    largest_component_share: float = 0.0  # of the pool images
    component_sizes: dict[str, int] = field(default_factory=dict)  # size range -> components
    warnings: list[str] = field(default_factory=list)


def _concat(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.zeros(0, np.int64), *arrays]).astype(np.int64)


@dataclass
class Earlier:
    """What the stage's previous run (`StageContext.previous_dir`) left for a run on a grown pool."""

    folder: Path  # its DEDUP parts
    part_of: dict[str, int]  # content digest of an images part -> the part index it had
    edges: pa.Table  # its copy edges (EDGES)
    eval_matched: np.ndarray  # sorted ids of its pool images that matched an eval image
    eval_digests: list[str] | None  # digests of the parts that held eval images (None: unknown)


def read_earlier(previous: Path | None, settings: str) -> tuple[Earlier | None, str]:
    """The previous run's state when an incremental run can use it, else (None, why not)."""
    if previous is None:
        return None, "no earlier run"
    try:
        state = json.loads((previous / layout.DEDUP_STATE).read_text())
        edges = pq.read_table(previous / layout.DEDUP_EDGES, schema=EDGES)
        matched = pq.read_table(previous / layout.DEDUP_EVAL_MATCHED, schema=IDS)["image_id"].to_numpy()
    except (OSError, ValueError, KeyError) as e:
        return None, f"the earlier run left no state ({type(e).__name__})"
    if state.get("settings") != settings:
        return None, "dedup settings, eval sets or the embedding models changed"
    if not state.get("exact"):
        return None, "the earlier run searched an approximate index (a full run equals it only by rerunning)"
    part_of = {d: int(i) for i, d in state["digests"].items()}
    return Earlier(previous, part_of, edges, np.sort(matched), state.get("eval_digests")), ""


def _id_parts(
    folder: Path, counts: dict[int, int], embed_of: dict[int, Path], where=None
) -> list[VectorPart]:
    return [
        VectorPart(embed_of[i], rows=layout.part_path(folder, i), where=where)
        for i, n in sorted(counts.items())
        if n and embed_of.get(i) is not None
    ]


def dedup_parts(
    image_parts: Sequence[Path],
    embed_parts: Sequence[Path],
    eval_datasets: Sequence[str],
    dedup: DedupSpec,
    *,
    out_dir: Path,
    scratch: Callable[[str], Path],
    digests: dict[int, str] | None = None,
    settings: str = "",
    previous: Path | None = None,
) -> DedupSummary:
    """Dedup the pool of `image_parts` (ingest parts) with the vectors of `embed_parts` (one model's
    parts; part i holds ingest part i's vectors) and write DEDUP part i for each ingest part i.
    `scratch(name)`: a folder for resume state. Ray must be up.

    Incremental runs: `digests` (part index -> content digest of its images part, the embed stage's)
    and `settings` (a fingerprint of what the decisions depend on) are recorded beside the parts; a
    later run given this output as `previous` searches only the images that are new to it (see
    `curation.dedup.carried_copy_edges`), and writes the same decisions as a full run."""
    embed_of = {layout.part_index(p): Path(p) for p in embed_parts}
    parts = [(layout.part_index(p), Path(p), embed_of.get(layout.part_index(p))) for p in image_parts]
    rows_dir, hash_dir = scratch("pool_rows"), scratch("exact")
    rows_file = {i: layout.part_path(rows_dir, i) for i, _, _ in parts}

    # 1-2. exact copies: pool rows and their hashes bucketed by workers, a reduce task per bucket.
    group = max(1, -(-len(parts) // MAX_MAP_TASKS))
    groups = [parts[s : s + group] for s in range(0, len(parts), group)]
    todo = [g for g in groups if not all(rows_file[i].exists() for i, _, _ in g)]
    run_tasks(
        bucket_pool_rows,
        todo,
        name="dedup: pool rows",
        rows_dir=rows_dir,
        buckets_dir=hash_dir,
        n_buckets=max(1, min(len(parts), MAX_HASH_BUCKETS)),
    )
    exact = run_tasks(exact_edges_of_bucket, layout.list_buckets(hash_dir), name="dedup: exact duplicates")
    exact_src, exact_dst = _concat([e[0] for e in exact]), _concat([e[1] for e in exact])
    excluded = np.sort(exact_src)

    # Which images an earlier run searched (incremental), and which parts hold eval images.
    earlier, why = read_earlier(previous, settings) if digests is not None else (None, "")
    split, old_part = None, {}
    if digests is not None:
        if earlier is not None:
            old_part = {
                i: layout.part_path(earlier.folder, earlier.part_of[digests[i]])
                for i, _, _ in parts
                if digests.get(i) in earlier.part_of
            }
            old_part = {i: p for i, p in old_part.items() if p.exists()}
        nodes = (
            graph_nodes(
                earlier.edges["src"].to_numpy(), earlier.edges["dst"].to_numpy(), earlier.eval_matched
            )
            if earlier is not None
            else np.zeros(0, np.int64)
        )
        split_dir = scratch("split")
        split = dict(
            zip(
                (i for i, _, _ in parts),
                run_tasks(
                    split_seen,
                    [(i, rows_file[i], ingest, old_part.get(i)) for i, ingest, _ in parts],
                    name="dedup: images seen before",
                    out_dir=split_dir if earlier is not None else None,
                    excluded=excluded,
                    eval_datasets=list(eval_datasets),
                    nodes=nodes,
                ),
                strict=True,
            )
        )
        searched = sum(r[0] + r[1] for r in split.values())
        if earlier is not None and searched >= dedup.exact_below:
            earlier, why = None, f"{searched} images to search reach dedup.exact_below: an approximate index"
    if previous is not None and earlier is None:
        log.info("dedup: a full run, not incremental: %s", why)

    pool = [VectorPart(embed, rows=rows_file[i]) for i, _, embed in parts if embed is not None]
    queries_against_pool = 0
    # With pixel verification the graph keeps edges down to the band's low end (see `_verify_band`).
    search_threshold = dedup.threshold if dedup.verify_from is None else dedup.verify_from
    if earlier is None:
        # 3. copy detection: kNN of each pool image that is not an exact copy, among the same images.
        copy_writer = EdgeWriter(scratch("copy_edges"), search_threshold)
        copy = search_parts(
            pool,
            pool,
            dedup.k + 1,  # each image finds itself
            dedup,
            write=copy_writer,
            exclude_ids=excluded,
            recall_threshold=search_threshold,
            name="dedup: copy detection",
        )
        copy_edges = read_results(copy_writer)
        queries_against_pool = copy.queries
    else:
        # 3'. the new images searched against the whole pool; their edges to earlier images turned
        # around; the earlier run's edges carried; the earlier images whose lists reach k searched again.
        seen = {i: r[0] for i, r in split.items()}
        fresh = {i: r[1] for i, r in split.items()}
        alive = np.unique(np.concatenate([np.zeros(0, np.int64), *(r[3] for r in split.values())]))

        def against_pool(queries: list[VectorPart], name: str, what: str):
            writer = EdgeWriter(scratch(name), search_threshold)
            result = search_parts(
                queries,
                pool,
                dedup.k + 1,
                dedup,
                write=writer,
                exclude_ids=excluded,
                recall_threshold=search_threshold,
                name=f"dedup: copy detection, {what} against the pool",
            )
            return result, read_results(writer)

        copy, fresh_edges = against_pool(
            _id_parts(split_dir / FRESH, fresh, embed_of), "copy_edges", "new images"
        )
        turned, full_lists = fresh_edges_reversed(fresh_edges, dedup.k)
        seen_to_fresh = [turned]
        if full_lists.size and any(seen.values()):
            # New images with full lists: the earlier images that have them above the threshold.
            writer = EdgeWriter(scratch("copy_seen"), search_threshold)
            search_parts(
                _id_parts(split_dir / SEEN, seen, embed_of),
                _id_parts(split_dir / FRESH, fresh, embed_of, where=pc.field("image_id").isin(full_lists)),
                dedup.k + 1,
                dedup,
                write=writer,
                check_recall=False,
                name="dedup: copy detection, earlier images against new ones with full lists",
            )
            seen_to_fresh.append(read_results(writer))
        carried, again = carried_copy_edges(
            earlier.edges, alive, unique_edges(pa.concat_tables(seen_to_fresh)), dedup.k
        )
        searched = [carried, fresh_edges]
        queries_against_pool = copy.queries
        if again.size:
            where = pc.field("image_id").isin(again)
            result, edges = against_pool(
                _id_parts(split_dir / SEEN, seen, embed_of, where),
                "copy_again",
                "earlier images with full lists",
            )
            searched.append(edges)
            queries_against_pool += result.queries
        copy_edges = unique_edges(pa.concat_tables(searched))
    searched_edges = copy_edges  # what a later incremental run carries (before verification)
    verification = (0, 0, 0)
    if dedup.verify_from is not None:
        copy_edges, verification = _verify_band(copy_edges, dedup, [ingest for _, ingest, _ in parts])
    copy_src, copy_dst = copy_edges["src"].to_numpy(), copy_edges["dst"].to_numpy()

    # Eval overlap: the nearest eval image of every pool image (exact copies included).
    eval_matched, eval_images = np.zeros(0, np.int64), 0
    eval_digests = None
    if split is not None:
        eval_digests = sorted(digests[i] for i, r in split.items() if r[2])
    if eval_datasets:
        is_eval = pc.field("dataset").isin(list(eval_datasets)) & (pc.field("status") == "ok")
        evals = [
            VectorPart(embed, rows=ingest, where=is_eval) for _, ingest, embed in parts if embed is not None
        ]
        eval_queries, carried_matches = pool, np.zeros(0, np.int64)
        if earlier is not None and earlier.eval_digests is not None and earlier.eval_digests == eval_digests:
            # Same eval images: an earlier pool image keeps its match; only the new parts' images are searched.
            present = np.unique(np.concatenate([np.zeros(0, np.int64), *(r[4] for r in split.values())]))
            carried_matches = earlier.eval_matched[np.isin(earlier.eval_matched, present)]
            eval_queries = [
                VectorPart(embed, rows=rows_file[i])
                for i, _, embed in parts
                if embed is not None and i not in old_part
            ]
        eval_writer = EdgeWriter(scratch("eval_edges"), dedup.eval_threshold)
        found = search_parts(
            eval_queries, evals, 1, dedup, write=eval_writer, check_recall=False, name="dedup: eval overlap"
        )
        eval_matched = np.unique(
            np.concatenate([carried_matches, read_results(eval_writer, ["src"])["src"].to_numpy()])
        )
        eval_images = found.database

    # 4. components of the graph's nodes only; areas of those nodes from the workers.
    nodes = graph_nodes(exact_src, exact_dst, copy_src, copy_dst, eval_matched)
    area = None
    if dedup.keep_rule == "largest_then_smallest_id" and nodes.size:
        found_areas = run_tasks(areas_of, list(rows_file.values()), name="dedup: areas", nodes=nodes)
        ids = _concat([a[0] for a in found_areas])
        areas = np.concatenate([np.zeros(0), *(a[1] for a in found_areas)])
        order = np.argsort(ids)
        if not np.array_equal(ids[order], nodes):
            raise RuntimeError("dedup: edge endpoints that are not pool rows with a vector")
        area = areas[order]
    decisions = component_decisions(
        nodes, area, exact_src, exact_dst, copy_src, copy_dst, eval_matched, dedup.keep_rule, dedup.grouping
    )

    # 5. the DEDUP parts, each written by a worker from its rows file and the broadcast decisions.
    written = run_tasks(
        write_dedup_part,
        sorted(rows_file.items()),
        name="dedup: write",
        rows=lambda r: r[0],
        decisions=decisions,
        out_dir=out_dir,
        earlier={i: Path(p) for i, p in old_part.items()} if earlier is not None else None,
    )
    if earlier is not None:
        flips = pa.table({"image_id": _concat([w[2] for w in written]),
                          "keep": np.concatenate([np.zeros(0, bool), *(w[3] for w in written)])})  # fmt: skip
        # The digests of the earlier parts compared: a later retrieve checks they are all of them.
        against = {FLIPS_AGAINST: parts_fingerprint(digests[i] for i in old_part)}
        write_parquet_atomic(flips, out_dir / layout.DEDUP_KEEP_FLIPS, KEEP_FLIPS.with_metadata(against))
    for stale in layout.list_parts(out_dir):
        if layout.part_index(stale) not in rows_file:
            stale.unlink()
    if digests is not None:
        _write_increment_state(
            out_dir,
            settings,
            copy.exact,
            digests,
            searched_edges,
            eval_matched,
            eval_digests if eval_datasets else [],
        )
    for name in SCRATCH:
        shutil.rmtree(scratch(name), ignore_errors=True)
    summary = DedupSummary(
        images=sum(r[0] for r in written),
        exact=decisions.count(EXACT),
        copy=decisions.count(COPY),
        eval_overlap=decisions.count(EVAL_OVERLAP),
        kept=sum(r[1] for r in written),
        copy_edges=copy_edges.num_rows,
        eval_images=eval_images,
        search="exact" if copy.exact else f"{copy.index} on {copy.device}",
        ivf_recall=copy.recall,
        shards=copy.shards,
        grouping=dedup.grouping,
        queries_against_pool=queries_against_pool,
        verified_pairs=verification[0],
        verified_copies=verification[1],
        verify_unreadable=verification[2],
    )
    if earlier is not None:
        summary.incremental = (
            f"{sum(seen.values())} images seen by the earlier run keep its edges; "
            f"{sum(fresh.values())} new and {again.size} earlier ones with full lists searched against the "
            f"pool; {full_lists.size} new ones with full lists searched by the earlier images"
        )
        log.info("dedup: incremental: %s", summary.incremental)
    _record_components(summary, decisions, dedup.max_component_share)
    return summary


def _verify_band(
    edges: pa.Table, dedup: DedupSpec, image_parts: Sequence[Path]
) -> tuple[pa.Table, tuple[int, int, int]]:
    """Pixel verification of the edges in (verify_from, threshold] on workers: tasks find where the
    band's images are, tasks score batches of pairs. Returns (the copy edges, (pairs verified,
    found copies, images that could not be read))."""
    pairs = band_pairs(
        edges["src"].to_numpy(), edges["dst"].to_numpy(), edges["sim"].to_numpy(), dedup.threshold
    )
    if pairs.shape[0] == 0:
        return verified_edges(edges, dedup.threshold, pairs, np.zeros(0, bool)), (0, 0, 0)
    found = run_tasks(image_locations, list(image_parts), name="dedup: band images", ids=np.unique(pairs))
    locations = pa.concat_tables(found).sort_by("image_id")
    batches = [pairs[s : s + VERIFY_BATCH] for s in range(0, pairs.shape[0], VERIFY_BATCH)]
    results = run_tasks(
        verify_pair_batch,
        batches,
        name="dedup: pixel verification",
        rows=lambda r: r[0].size,
        total_rows=pairs.shape[0],
        locations=locations,
    )
    scores = np.concatenate([r[0] for r in results])
    unreadable = sum(r[1] for r in results)
    if unreadable:
        log.warning(
            "dedup: %d images of the verification band could not be read; their pairs stay apart", unreadable
        )
    passed = scores > dedup.verify_score
    log.info(
        "dedup: pixel verification: %d of %d pairs in the band are copies", int(passed.sum()), pairs.shape[0]
    )
    return verified_edges(edges, dedup.threshold, pairs, passed), (
        pairs.shape[0],
        int(passed.sum()),
        unreadable,
    )


def _write_increment_state(
    out_dir: Path,
    settings: str,
    exact: bool,
    digests: dict[int, str],
    copy_edges: pa.Table,
    eval_matched: np.ndarray,
    eval_digests: list[str] | None,
) -> None:
    """What a later run on a grown pool reuses (`read_earlier`): thresholded edges and eval matches,
    which the driver holds anyway, and per-part digests."""
    write_parquet_atomic(copy_edges.select(EDGES.names), out_dir / layout.DEDUP_EDGES, EDGES)
    write_parquet_atomic(
        pa.table({"image_id": eval_matched}, schema=IDS), out_dir / layout.DEDUP_EVAL_MATCHED, IDS
    )
    write_json_atomic(
        out_dir / layout.DEDUP_STATE,
        {
            "settings": settings,
            "exact": bool(exact),
            "digests": {str(i): d for i, d in digests.items()},
            "eval_digests": eval_digests,
        },
    )


def _record_components(summary: DedupSummary, decisions, max_share: float) -> None:
    """Component sizes into the summary, and a warning when one component is too large a share."""
    _, labels = np.unique(decisions.component_id, return_inverse=True)
    stats = component_size_stats(labels, summary.images)
    summary.components = stats["components"]
    summary.largest_component = stats["largest"]
    summary.largest_component_share = stats["largest_share"]
    summary.component_sizes = stats["histogram"]
    if stats["largest_share"] > max_share:
        message = (
            f"dedup: one duplicate component holds {stats['largest']} of {summary.images} pool images "
            f"({stats['largest_share']:.1%} > dedup.max_component_share {max_share:.1%}): copies chain "
            "through the kNN graph or dedup.threshold is too low for this copy detector; "
            "`lvd dedup calibrate` shows pairs per similarity"
        )
        log.warning(message)
        summary.warnings.append(message)


def embed_digests(ctx: StageContext) -> tuple[dict[int, str] | None, str]:
    """(content digest of each images part, the models' fingerprint) as the embed stage recorded them
    (what makes a part's vectors the same as an earlier run's); (None, "") when not recorded."""
    try:
        inputs = json.loads((ctx.input_dir(layout.EMBEDDINGS) / layout.EMBED_INPUTS).read_text())
        return {int(i): d for i, d in inputs["digests"].items()}, str(inputs["models"])
    except (OSError, ValueError, KeyError):
        return None, ""


def run(ctx: StageContext) -> DedupSummary:
    spec = ctx.spec
    ctx.ray()
    model = copy_detection_model(spec)
    digests, models = embed_digests(ctx)
    summary = dedup_parts(
        ctx.parts(layout.IMAGES),
        ctx.parts(layout.EMBEDDINGS, model),
        [eval_dataset(e.name) for e in spec.eval_sets],
        spec.dedup,
        out_dir=ctx.output_dir(layout.DEDUP),
        scratch=ctx.scratch_dir,
        digests=digests,
        settings=f"{spec.fingerprint('dedup', 'eval_sets')}:{models}:{model}",
        previous=ctx.previous_dir,
    )
    summary.model = model
    summary.detector = detector_name(spec)
    log.info("dedup: %s", summary)
    return summary


STAGE = Stage(
    name="dedup",
    reads=(layout.IMAGES, layout.EMBEDDINGS),
    writes=(layout.DEDUP,),
    spec_sections=("dedup", "eval_sets"),
    resources=Resources(engine="ray", gpu=True),
    summary=DedupSummary,
    run=run,
    reuses_previous=True,
)
