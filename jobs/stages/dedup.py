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

import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from lvd.curation.dedup import (
    COPY,
    EVAL_OVERLAP,
    EXACT,
    areas_of,
    bucket_pool_rows,
    component_decisions,
    component_size_stats,
    exact_edges_of_bucket,
    graph_nodes,
    write_dedup_part,
)
from lvd.curation.knn_ray import search_parts
from lvd.curation.knn_sharded import EdgeWriter, VectorPart, read_results
from lvd.curation.stage_io import copy_detection_model, detector_name
from lvd.jobs.stage import Resources, Stage, StageContext, StageSummary
from lvd.jobs.workers import run_tasks
from lvd.schemas import layout
from lvd.schemas.job_spec import DedupSpec
from lvd.schemas.layout import eval_dataset

log = logging.getLogger("lvd")

# Exact dedup shuffles (sha256, image_id) rows through hash buckets: at most this many buckets, and
# map tasks (each over a group of parts), so the scratch holds at most their product of files.
MAX_HASH_BUCKETS = 256
MAX_MAP_TASKS = 1024

SCRATCH = ("pool_rows", "exact", "copy_edges", "eval_edges")


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
    components: int = 0  # duplicate components (two images or more)
    largest_component: int = 0
    largest_component_share: float = 0.0  # of the pool images
    component_sizes: dict[str, int] = field(default_factory=dict)  # size range -> components
    warnings: list[str] = field(default_factory=list)


def _concat(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.zeros(0, np.int64), *arrays]).astype(np.int64)


def dedup_parts(
    image_parts: Sequence[Path],
    embed_parts: Sequence[Path],
    eval_datasets: Sequence[str],
    dedup: DedupSpec,
    *,
    out_dir: Path,
    scratch: Callable[[str], Path],
) -> DedupSummary:
    """Dedup the pool of `image_parts` (ingest parts) with the vectors of `embed_parts` (one model's
    parts; part i holds ingest part i's vectors) and write DEDUP part i for each ingest part i.
    `scratch(name)`: a folder for resume state. Ray must be up."""
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

    # 3. copy detection: kNN of each pool image that is not an exact copy, among the same images.
    pool = [VectorPart(embed, rows=rows_file[i]) for i, _, embed in parts if embed is not None]
    copy_writer = EdgeWriter(scratch("copy_edges"), dedup.threshold)
    copy = search_parts(
        pool,
        pool,
        dedup.k + 1,  # each image finds itself
        dedup,
        write=copy_writer,
        exclude_ids=np.sort(exact_src),
        recall_threshold=dedup.threshold,
        name="dedup: copy detection",
    )
    copy_edges = read_results(copy_writer, ["src", "dst"])
    copy_src, copy_dst = copy_edges["src"].to_numpy(), copy_edges["dst"].to_numpy()

    # Eval overlap: the nearest eval image of every pool image (exact copies included).
    eval_matched, eval_images = np.zeros(0, np.int64), 0
    if eval_datasets:
        is_eval = pc.field("dataset").isin(list(eval_datasets)) & (pc.field("status") == "ok")
        evals = [
            VectorPart(embed, rows=ingest, where=is_eval) for _, ingest, embed in parts if embed is not None
        ]
        eval_writer = EdgeWriter(scratch("eval_edges"), dedup.eval_threshold)
        found = search_parts(
            pool, evals, 1, dedup, write=eval_writer, check_recall=False, name="dedup: eval overlap"
        )
        eval_matched = np.unique(read_results(eval_writer, ["src"])["src"].to_numpy())
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
    )
    for stale in layout.list_parts(out_dir):
        if layout.part_index(stale) not in rows_file:
            stale.unlink()
    for name in SCRATCH:
        shutil.rmtree(scratch(name), ignore_errors=True)
    summary = DedupSummary(
        images=sum(r[0] for r in written),
        exact=decisions.count(EXACT),
        copy=decisions.count(COPY),
        eval_overlap=decisions.count(EVAL_OVERLAP),
        kept=sum(r[1] for r in written),
        copy_edges=copy.rows,
        eval_images=eval_images,
        search="exact" if copy.exact else f"{copy.index} on {copy.device}",
        ivf_recall=copy.recall,
        shards=copy.shards,
        grouping=dedup.grouping,
    )
    _record_components(summary, decisions, dedup.max_component_share)
    return summary


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


def run(ctx: StageContext) -> DedupSummary:
    spec = ctx.spec
    ctx.ray()
    model = copy_detection_model(spec)
    summary = dedup_parts(
        ctx.parts(layout.IMAGES),
        ctx.parts(layout.EMBEDDINGS, model),
        [eval_dataset(e.name) for e in spec.eval_sets],
        spec.dedup,
        out_dir=ctx.output_dir(layout.DEDUP),
        scratch=ctx.scratch_dir,
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
)
