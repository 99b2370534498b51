"""cluster stage: hierarchical k-means (spec.clustering) of the kept pool's retrieval vectors.

Writes CLUSTERS parts (each image's cluster per level, finest first, and its distance to the
level-0 centroid) and `centroids.parquet` (every level's centroids, parents and sizes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from lvd.curation.kmeans import hierarchical_kmeans
from lvd.curation.stage_io import kept_pool_ids, load_vectors, write_parts
from lvd.jobs.stage import Resources, Stage, StageContext, StageSummary
from lvd.schemas import layout
from lvd.schemas.layout import RETRIEVAL
from lvd.schemas.tables import CENTROIDS, CLUSTERS, write_parquet_atomic

log = logging.getLogger("lvd")


@dataclass
class ClusterSummary(StageSummary):
    FUNNEL = (("clustered", "images"),)
    images: int = 0
    levels: list[int] = field(default_factory=list)
    requested_levels: list[int] = field(default_factory=list)


def _list_column(matrix: np.ndarray, value_type: pa.DataType) -> pa.Array:
    rows, width = matrix.shape
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * width)
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.ravel(), value_type))


def run(ctx: StageContext) -> ClusterSummary:
    cfg = ctx.spec.clustering
    ids, vectors = load_vectors(
        ctx.parts(layout.EMBEDDINGS, RETRIEVAL), RETRIEVAL, kept_pool_ids(ctx.parts(layout.DEDUP))
    )
    out_dir = ctx.output_dir(layout.CLUSTERS)
    if ids.size == 0:
        log.warning("cluster: no kept pool image has a retrieval vector; nothing to cluster")
        write_parts(CLUSTERS.empty_table(), out_dir, CLUSTERS)
        write_parquet_atomic(CENTROIDS.empty_table(), ctx.table_file(layout.CENTROIDS), CENTROIDS)
        return ClusterSummary(requested_levels=[lv.k for lv in cfg.levels])
    hier = hierarchical_kmeans(
        vectors,
        [(lv.k, lv.resampling_steps) for lv in cfg.levels],
        niter=cfg.niter,
        spherical=cfg.spherical,
        max_points_per_centroid=cfg.max_points_per_centroid,
        seed=cfg.seed,
        assign_dtype=cfg.assign_dtype,
        ids=ids,
    )
    clusters = pa.table(
        {
            "image_id": pa.array(ids, pa.int64()),
            "cluster_ids": _list_column(hier.labels.astype(np.int32), pa.int32()),
            "distance": pa.array(hier.distance, pa.float32()),
        }
    )
    write_parts(clusters, out_dir, CLUSTERS)

    levels = []
    for lv, cent in enumerate(hier.centroids):
        k = cent.shape[0]
        top = lv == len(hier.centroids) - 1
        parent = pa.nulls(k, pa.int32()) if top else pa.array(hier.parents[lv].astype(np.int32))
        levels.append(
            pa.table(
                {
                    "level": pa.array(np.full(k, lv, np.int32)),
                    "cluster_id": pa.array(np.arange(k, dtype=np.int32)),
                    "parent_id": parent,
                    "size": pa.array(hier.sizes(lv).astype(np.int64)),
                    "centroid": _list_column(cent, pa.float32()),
                }
            )
        )
    write_parquet_atomic(pa.concat_tables(levels), ctx.table_file(layout.CENTROIDS), CENTROIDS)
    summary = ClusterSummary(
        images=int(ids.size), levels=hier.ks, requested_levels=[lv.k for lv in cfg.levels]
    )
    log.info("cluster: %s", summary)
    return summary


STAGE = Stage(
    name="cluster",
    reads=(layout.EMBEDDINGS, layout.DEDUP),
    writes=(layout.CLUSTERS, layout.CENTROIDS),
    spec_sections=("clustering",),
    resources=Resources(engine="ray", gpu=True),
    summary=ClusterSummary,
    run=run,
)
