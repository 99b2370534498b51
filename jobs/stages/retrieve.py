"""retrieve stage: pool images for each seed set (as_is / sample / cluster), one RETRIEVED part per
seed set, in spec order.

The pool is the kept pool (after dedup) with its retrieval vectors. Sample-based retrieval searches
an index built with the `retrieval` section's settings (exact below `exact_below`, else the factory
string with `nprobe`). Cluster-based retrieval uses the cluster stage's finest level, or its own
k-means with `num_clusters` when the seed set sets it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lvd.curation.kmeans import kmeans
from lvd.curation.knn import build_index
from lvd.curation.retrieval import count_collisions, retrieve_as_is, retrieve_by_cluster, retrieve_by_sample
from lvd.curation.stage_io import kept_pool_ids, load_images, load_vectors
from lvd.jobs.stage import Resources, Stage, StageContext, StageSummary
from lvd.schemas import layout
from lvd.schemas.layout import RETRIEVAL, part_path, seed_dataset
from lvd.schemas.tables import CLUSTERS, RETRIEVED, read_parts, write_parquet_atomic

log = logging.getLogger("lvd")


@dataclass
class RetrieveSummary(StageSummary):
    FUNNEL = (("retrieved by seeds", "images"),)
    images: int = 0
    rows: int = 0
    collisions: int = 0
    per_seed_set: dict[str, int] = field(default_factory=dict)


class _Pool:
    """The kept pool's vectors and, built on first use, its search index and clusterings."""

    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self.ids, self.vectors = load_vectors(
            ctx.parts(layout.EMBEDDINGS, RETRIEVAL), RETRIEVAL, kept_pool_ids(ctx.parts(layout.DEDUP))
        )
        self._index = None
        self._clusterings: dict[int | None, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def index(self):
        if self._index is None:
            d = self.ctx.spec.retrieval
            self._index, _ = build_index(
                self.vectors, factory=d.index, exact_below=d.exact_below, nprobe=d.nprobe
            )
        return self._index

    def search_actors(self) -> int:
        """Ray actors for kNN search (spec.retrieval.search_actors), starting Ray when there are any."""
        n = self.ctx.spec.retrieval.search_actors
        if n > 0:
            self.ctx.ray()
        return n

    def clustering(self, num_clusters: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(labels, distances, centroids) of the pool rows."""
        if num_clusters not in self._clusterings:
            cfg = self.ctx.spec.clustering
            if num_clusters is None:
                table = read_parts(self.ctx.parts(layout.CLUSTERS), CLUSTERS).sort_by("image_id")
                if not np.array_equal(table["image_id"].to_numpy(), self.ids):
                    raise ValueError(
                        "cluster stage output does not cover the kept pool; rerun with --force cluster"
                    )
                labels = pc.list_element(table["cluster_ids"], 0).to_numpy().astype(np.int64)
                cent = pq.read_table(self.ctx.table_file(layout.CENTROIDS)).to_pandas()
                cent = cent[cent["level"] == 0].sort_values("cluster_id")
                centroids = np.stack(cent["centroid"].to_numpy()).astype(np.float32)
                self._clusterings[None] = (labels, table["distance"].to_numpy(), centroids)
            else:
                k = min(num_clusters, self.ids.size)
                if k < num_clusters:
                    log.warning(
                        "retrieve: num_clusters=%d but the pool has %d images; using %d", num_clusters, k, k
                    )
                res = kmeans(
                    self.vectors,
                    k,
                    niter=cfg.niter,
                    spherical=cfg.spherical,
                    max_points_per_centroid=cfg.max_points_per_centroid,
                    seed=cfg.seed,
                    assign_dtype=cfg.assign_dtype,
                    ids=self.ids,
                )
                self._clusterings[num_clusters] = (res.labels, res.distance, res.centroids)
        return self._clusterings[num_clusters]


def run(ctx: StageContext) -> RetrieveSummary:
    spec = ctx.spec
    pool = _Pool(ctx)
    out_dir = ctx.output_dir(layout.RETRIEVED)
    per_seed_set, tables = {}, []
    for i, seed in enumerate(spec.seeds):
        seed_ids = load_images(ctx.parts(layout.IMAGES), seed_dataset(seed.name), ["image_id"])[
            "image_id"
        ].to_numpy()
        if seed.strategy == "as_is":
            table = retrieve_as_is(seed_ids, seed.name)
        else:
            ids, vectors = load_vectors(ctx.parts(layout.EMBEDDINGS, RETRIEVAL), RETRIEVAL, seed_ids)
            if pool.ids.size == 0 or ids.size == 0:
                table = RETRIEVED.empty_table()
            elif seed.strategy == "sample":
                table = retrieve_by_sample(
                    pool.index(),
                    pool.ids,
                    vectors,
                    ids,
                    seed.name,
                    k=seed.k,
                    chunk_size=spec.retrieval.chunk_size,
                    search_actors=pool.search_actors(),
                )
            else:
                labels, distance, centroids = pool.clustering(seed.num_clusters)
                table = retrieve_by_cluster(
                    pool.ids,
                    labels,
                    distance,
                    centroids,
                    vectors,
                    seed.name,
                    spherical=spec.clustering.spherical,
                    min_seed_images=seed.min_seed_images,
                    images_per_cluster=seed.images_per_cluster,
                    max_images=seed.max_images,
                )
        write_parquet_atomic(table, part_path(out_dir, i), RETRIEVED)
        per_seed_set[seed.name] = table.num_rows
        tables.append(table)
        log.info("retrieve: %s (%s): %d rows", seed.name, seed.strategy, table.num_rows)
    for stale in layout.list_parts(out_dir)[len(spec.seeds) :]:
        stale.unlink()
    everything = pa.concat_tables(tables) if tables else RETRIEVED.empty_table()
    unique = np.unique(everything["image_id"].to_numpy())
    return RetrieveSummary(
        images=int(unique.size),
        rows=everything.num_rows,
        collisions=count_collisions(everything),
        per_seed_set=per_seed_set,
    )


STAGE = Stage(
    name="retrieve",
    reads=(layout.IMAGES, layout.EMBEDDINGS, layout.DEDUP, layout.CLUSTERS, layout.CENTROIDS),
    writes=(layout.RETRIEVED,),
    spec_sections=("seeds", "retrieval", "clustering"),
    resources=Resources(engine="ray", gpu=True),
    summary=RetrieveSummary,
    run=run,
)
