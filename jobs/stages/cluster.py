"""cluster stage: hierarchical k-means (spec.clustering) of the kept pool's retrieval vectors.

Writes CLUSTERS parts (each image's cluster per level, finest first, and its distance to the
level-0 centroid), one per embed part that holds kept images, and `centroids.parquet` (every
level's centroids, parents and sizes). The per-image passes run on Ray workers
(`lvd.jobs.kmeans_parts`); the driver holds the fit sample and per-cluster results only.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq

from lvd.curation.cluster_labels import read_labels
from lvd.curation.kmeans import level_labels
from lvd.jobs.kmeans_parts import (
    assign_to_hierarchy,
    fit_options,
    hierarchical_kmeans_over_parts,
    kept_pool_parts,
)
from lvd.jobs.stage import Resources, Stage, StageContext, StageSummary
from lvd.jobs.workers import run_tasks
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
    refit: bool = True  # False: assigned to the earlier run's centroids (clustering.on_new_images)


def _list_column(matrix: np.ndarray, value_type: pa.DataType) -> pa.Array:
    rows, width = matrix.shape
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * width)
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.ravel(), value_type))


def _write_clusters_part(label_path: Path, *, out_dir: Path, parents: list[np.ndarray]) -> int:
    """A worker: one label part -> the CLUSTERS part of the same number (cluster per level)."""
    ids, labels, dist = read_labels(label_path)
    table = pa.table(
        {
            "image_id": pa.array(ids, pa.int64()),
            "cluster_ids": _list_column(level_labels(labels, parents).astype(np.int32), pa.int32()),
            "distance": pa.array(dist, pa.float32()),
        }
    )
    write_parquet_atomic(table, layout.part_path(out_dir, layout.part_index(label_path)), CLUSTERS)
    return len(ids)


def run(ctx: StageContext) -> ClusterSummary:
    cfg = ctx.spec.clustering
    requested = [lv.k for lv in cfg.levels]
    ctx.ray()
    parts, counts = kept_pool_parts(ctx.parts(layout.EMBEDDINGS, RETRIEVAL), ctx.parts(layout.DEDUP))
    parts = [p for p, c in zip(parts, counts, strict=True) if c]
    out_dir = ctx.output_dir(layout.CLUSTERS)
    written: list[Path] = []
    n = int(sum(counts))
    if n == 0:
        log.warning("cluster: no kept pool image has a retrieval vector; nothing to cluster")
        written.append(layout.part_path(out_dir, 0))
        write_parquet_atomic(CLUSTERS.empty_table(), written[0], CLUSTERS)
        write_parquet_atomic(CENTROIDS.empty_table(), ctx.table_file(layout.CENTROIDS), CENTROIDS)
        _remove_stale(out_dir, written)
        return ClusterSummary(requested_levels=requested)
    scratch = ctx.scratch_dir("labels")
    earlier = earlier_hierarchy(ctx)
    if earlier is not None:
        log.info("cluster: assigning to the earlier run's centroids (clustering.on_new_images: assign)")
        hier = assign_to_hierarchy(
            parts,
            *earlier,
            scratch,
            n=n,
            spherical=cfg.spherical,
            assign_dtype=cfg.assign_dtype,
        )
    else:
        hier = fit_hierarchy(ctx, parts, scratch, n)
    run_tasks(
        _write_clusters_part,
        hier.label_parts,
        name="cluster: write clusters",
        rows=lambda r: r,
        total_rows=n,
        out_dir=out_dir,
        parents=hier.parents,
    )
    written = [layout.part_path(out_dir, layout.part_index(p)) for p in hier.label_parts]
    _remove_stale(out_dir, written)

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
                    "size": pa.array(hier.sizes[lv].astype(np.int64)),
                    "centroid": _list_column(cent, pa.float32()),
                }
            )
        )
    write_parquet_atomic(pa.concat_tables(levels), ctx.table_file(layout.CENTROIDS), CENTROIDS)
    shutil.rmtree(scratch, ignore_errors=True)
    summary = ClusterSummary(images=n, levels=hier.ks, requested_levels=requested, refit=earlier is None)
    log.info("cluster: %s", summary)
    return summary


def fit_hierarchy(ctx: StageContext, parts: list, scratch: Path, n: int):
    """Hierarchical k-means of the kept pool, fit from scratch."""
    cfg = ctx.spec.clustering
    return hierarchical_kmeans_over_parts(
        parts,
        [(lv.k, lv.resampling_steps) for lv in cfg.levels],
        scratch,
        n=n,
        **fit_options(cfg),
    )


def earlier_hierarchy(ctx: StageContext) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
    """The centroids and parents of the earlier run (kept aside because the inputs changed) when the
    spec says to assign new images to them and the clustering settings are unchanged; else None."""
    from lvd.jobs.pipeline import read_marker

    previous = ctx.previous_dir
    if previous is None or ctx.spec.clustering.on_new_images != "assign":
        return None
    marker = read_marker(previous) or {}
    if marker.get("config_fingerprint") != ctx.spec.fingerprint(*ctx.stage.spec_sections):
        return None
    path = previous / ctx.table_file(layout.CENTROIDS).name
    if not path.exists():
        return None
    table = pq.read_table(path).sort_by([("level", "ascending"), ("cluster_id", "ascending")])
    if table.num_rows == 0:
        return None
    levels = table["level"].to_numpy()
    centroids, parents = [], []
    for lv in range(int(levels.max()) + 1):
        rows = table.filter(pa.compute.equal(table["level"], lv))
        centroids.append(np.stack(rows["centroid"].to_numpy(zero_copy_only=False)).astype(np.float32))
        if lv < levels.max():
            parents.append(rows["parent_id"].to_numpy().astype(np.int64))
    return centroids, parents


def _remove_stale(out_dir: Path, written: list[Path]) -> None:
    """Parts of an earlier run that this one did not write."""
    keep = set(written)
    for stale in layout.list_parts(out_dir):
        if stale not in keep:
            stale.unlink()


STAGE = Stage(
    name="cluster",
    reads=(layout.EMBEDDINGS, layout.DEDUP),
    writes=(layout.CLUSTERS, layout.CENTROIDS),
    spec_sections=("clustering",),
    resources=Resources(engine="ray", gpu=True),
    summary=ClusterSummary,
    run=run,
    reuses_previous=True,
)
