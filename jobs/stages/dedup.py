"""dedup stage: exact, copy-detection and eval-overlap dedup of the pool (FAISS in-process, or
searched on Ray actors when `dedup.search_actors` > 0).

Reads ok pool images with a vector of the copy-detection model (the retrieval model's when the
spec has none) and writes one DEDUP row per such image. Images without a vector (failed decode or
embed) were recorded upstream and take no part. The kNN search saves each finished chunk's edges in
`_copy_edges/`, so a killed dedup resumes its search instead of starting over; the folder goes once
the table is written.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from lvd.curation.dedup import dedup_pool
from lvd.curation.stage_io import copy_detection_model, load_images, load_vectors, write_parts
from lvd.jobs.stage import Resources, Stage, StageContext, StageSummary
from lvd.schemas import layout
from lvd.schemas.layout import POOL, eval_dataset
from lvd.schemas.tables import DEDUP

log = logging.getLogger("lvd")


@dataclass
class DedupSummary(StageSummary):
    FUNNEL = (
        ("exact duplicates", "exact"),
        ("near duplicates (copy detection)", "copy"),
        ("eval-set overlap", "eval_overlap"),
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


def run(ctx: StageContext) -> DedupSummary:
    spec = ctx.spec
    model = copy_detection_model(spec)
    image_parts = ctx.parts(layout.IMAGES)
    vector_parts = ctx.parts(layout.EMBEDDINGS, model)
    pool = load_images(image_parts, POOL, ["image_id", "sha256", "width", "height"])
    ids, vectors = load_vectors(vector_parts, model, pool["image_id"].to_numpy())
    pool = pool.take(np.searchsorted(pool["image_id"].to_numpy(), ids))  # rows that have a vector

    eval_ids = np.concatenate(
        [np.zeros(0, np.int64)]
        + [
            load_images(image_parts, eval_dataset(e.name), ["image_id"])["image_id"].to_numpy()
            for e in spec.eval_sets
        ]
    )
    _, eval_vectors = load_vectors(vector_parts, model, eval_ids)

    params = spec.dedup.model_dump()
    if spec.dedup.search_actors > 0:
        ctx.ray()  # the kNN searches run on Ray actors
    result = dedup_pool(
        ids,
        vectors,
        sha256=pool["sha256"].to_pylist(),
        width=pool["width"].to_numpy(zero_copy_only=False),
        height=pool["height"].to_numpy(zero_copy_only=False),
        eval_vectors=eval_vectors if eval_vectors.size else None,
        work_dir=ctx.scratch_dir("copy_edges"),
        **params,
    )
    table = pa.table(
        {
            "image_id": pa.array(ids, pa.int64()),
            "component_id": pa.array(result.component_id, pa.int64()),
            "keep": pa.array(result.keep),
            "reason": pa.array(result.reason.tolist(), pa.string()),
            "duplicate_of": pa.array(result.duplicate_of, pa.int64(), mask=result.duplicate_of < 0),
        }
    )
    write_parts(table, ctx.output_dir(layout.DEDUP), DEDUP)
    shutil.rmtree(ctx.scratch_dir("copy_edges"), ignore_errors=True)
    summary = DedupSummary(
        **result.counts(),
        copy_edges=result.copy_edges,
        eval_images=int(eval_vectors.shape[0]),
        model=model,
        search="exact" if result.exact_search else spec.dedup.index,
        ivf_recall=result.ivf_recall,
    )
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
