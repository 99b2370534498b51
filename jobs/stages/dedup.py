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

import numpy as np
import pyarrow as pa

from curation.dedup import dedup_pool
from curation.stage_io import copy_detection_model, load_images, load_vectors, write_parts
from jobs.pipeline import StageContext
from schemas.tables import DEDUP, POOL, read_parts

log = logging.getLogger("lvd")

COPY_EDGES_DIR = "_copy_edges"


def run(ctx: StageContext) -> dict:
    spec = ctx.spec
    model = copy_detection_model(spec)
    pool = load_images(ctx.input_dir("ingest"), POOL, ["image_id", "sha256", "width", "height"])
    ids, vectors = load_vectors(ctx.input_dir("embed"), model, pool["image_id"].to_numpy())
    pool = pool.take(np.searchsorted(pool["image_id"].to_numpy(), ids))  # rows that have a vector

    datasets = read_parts(ctx.input_dir("ingest"), columns=["dataset"])["dataset"].unique().to_pylist()
    eval_ids = np.concatenate(
        [np.zeros(0, np.int64)]
        + [
            load_images(ctx.input_dir("ingest"), d, ["image_id"])["image_id"].to_numpy()
            for d in datasets
            if d.startswith("eval:")
        ]
    )
    _, eval_vectors = load_vectors(ctx.input_dir("embed"), model, eval_ids)

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
        work_dir=ctx.stage_dir / COPY_EDGES_DIR,
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
    write_parts(table, ctx.stage_dir, DEDUP)
    shutil.rmtree(ctx.stage_dir / COPY_EDGES_DIR, ignore_errors=True)
    summary = {
        **result.counts(),
        "copy_edges": result.copy_edges,
        "eval_images": int(eval_vectors.shape[0]),
        "model": model,
        "search": "exact" if result.exact_search else spec.dedup.index,
        "ivf_recall": result.ivf_recall,
    }
    log.info("dedup: %s", summary)
    return summary
