"""sample stage: the curated set = retrieved pool images + as-is seed images + a balanced sample of
`sampling.target_size` drawn from the cluster hierarchy.

`repeats` is how many times an image appears in the dataset: its balanced-sample count, and at
least 1 for an image that was retrieved (retrieval adds an image once, it does not add copies).

Passes, each on Ray workers over parts (the driver holds per-cluster and per-part results only):
  tree     cluster sizes per level and parents, from the CLUSTERS parts -> the driver water-fills
           the target down the tree (`sampling.leaf_budgets`)
  pick     each leaf's budget % size members with the smallest keyed draw get one copy more than
           the others: per-leaf cutoffs by `select_smallest`
  scatter  each worker writes its balanced picks and its RETRIEVED rows into buckets of the id range
  merge    one worker per bucket merges them by image_id into a CURATED part (sorted by image_id;
           the parts in order are sorted like one table)
"""

from __future__ import annotations

import functools
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lvd.curation.curated import (
    BALANCED,
    CANDIDATES,
    ROWS_PER_BUCKET,
    bucket_bounds,
    candidates,
    merge_candidates,
    split_by_bucket,
)
from lvd.curation.sampling import ClusterTree, extra_picks, leaf_budgets, leaf_pick_keys, leaf_repeats
from lvd.curation.selection import Cutoffs
from lvd.jobs.selection import select_smallest
from lvd.jobs.stage import Resources, Stage, StageContext, StageSummary
from lvd.jobs.workers import Fanout, RayFanout
from lvd.schemas import layout
from lvd.schemas.tables import CURATED, read_parts, write_parquet_atomic

log = logging.getLogger("lvd")

SCATTER_TASKS = 512  # writers of bucket files: the scratch holds at most this many files per bucket


@dataclass
class SampleSummary(StageSummary):
    FUNNEL = (
        ("balanced sample of the kept pool", "balanced_images"),
        ("+ retrieved by seed sets", "retrieved"),
        ("- in both", "in_both"),
        ("= curated images", "images"),
        ("curated samples (with repeats)", "samples"),
    )
    images: int = 0
    samples: int = 0
    balanced: int = 0
    balanced_images: int = 0
    retrieved: int = 0

    @property
    def in_both(self) -> int:
        """Images both drawn by the balanced sample and retrieved (the curated set holds them once)."""
        return self.balanced_images + self.retrieved - self.images


# ---------------------------------------------------------------- per-part work (Ray tasks)


def _cluster_labels(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(image ids, labels (n, levels) finest first) of a CLUSTERS part."""
    t = pq.read_table(path, columns=["image_id", "cluster_ids"])
    ids = t["image_id"].to_numpy()
    if t.num_rows == 0:
        return ids, np.zeros((0, 1), np.int64)
    flat = t["cluster_ids"].combine_chunks().flatten().to_numpy()
    return ids, flat.reshape(t.num_rows, -1).astype(np.int64)


@dataclass
class _TreeResult:
    tree: ClusterTree | None
    rows: int
    min_id: int | None
    max_id: int | None


def _tree_task(path: Path) -> _TreeResult:
    ids, labels = _cluster_labels(path)
    if ids.size == 0:
        return _TreeResult(None, 0, None, None)
    return _TreeResult(ClusterTree.of_labels(labels), ids.size, int(ids.min()), int(ids.max()))


def _merge_trees(a: _TreeResult, b: _TreeResult) -> _TreeResult:
    trees = [t for t in (a.tree, b.tree) if t is not None]
    tree = trees[0] if len(trees) == 1 else (ClusterTree.merge(*trees) if trees else None)
    ids = [i for i in (a.min_id, b.min_id, a.max_id, b.max_id) if i is not None]
    return _TreeResult(tree, a.rows + b.rows, min(ids, default=None), max(ids, default=None))


def _id_range_task(path: Path) -> tuple[int, int | None, int | None]:
    ids = pq.read_table(path, columns=["image_id"])["image_id"].to_numpy()
    return ids.size, (int(ids.min()) if ids.size else None), (int(ids.max()) if ids.size else None)


def leaf_rows(path: str | Path, *, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(leaf cluster, keyed draw, image_id) of a CLUSTERS part: the rows of the leaf pick."""
    ids, labels = _cluster_labels(path)
    return labels[:, 0], leaf_pick_keys(ids, seed), ids


@dataclass(frozen=True)
class _Picks:
    """What the scatter workers need to draw the balanced sample (per-leaf arrays)."""

    budget: np.ndarray
    leaf_sizes: np.ndarray
    extra: Cutoffs
    seed: int


def _scatter_task(
    item: tuple[int, list[tuple[str, str]]], *, scratch: Path, bounds: np.ndarray, picks: _Picks | None
) -> tuple[int, int]:
    """Writes the candidate rows of some CLUSTERS / RETRIEVED parts into their buckets; returns the
    balanced images and samples among them."""
    writer, parts = item
    tables, images, samples = [], 0, 0
    for kind, path in parts:
        if kind == "clusters":
            ids, labels = _cluster_labels(path)
            repeats = leaf_repeats(labels[:, 0], ids, picks.budget, picks.leaf_sizes, picks.extra, picks.seed)
            drawn = repeats > 0
            images += int(drawn.sum())
            samples += int(repeats[drawn].sum())
            tables.append(candidates(ids[drawn], BALANCED, repeats[drawn], retrieved=False))
        else:
            t = pq.read_table(path, columns=["image_id", "seed_set"])
            ids = t["image_id"].to_numpy()
            tables.append(candidates(ids, t["seed_set"].combine_chunks(), np.ones(ids.size), retrieved=True))
    table = pa.concat_tables(tables) if tables else CANDIDATES.empty_table()
    for bucket, rows in split_by_bucket(table, bounds).items():
        write_parquet_atomic(rows, layout.part_path(layout.bucket_dir(scratch, bucket), writer), CANDIDATES)
    return images, samples


def _merge_task(bucket: int, *, scratch: Path, out_dir: Path) -> tuple[int, int, int]:
    """One bucket's candidates -> CURATED part `bucket`; returns (images, samples, retrieved)."""
    table = read_parts(layout.list_parts(layout.bucket_dir(scratch, bucket)), CANDIDATES)
    curated, retrieved = merge_candidates(table)
    write_parquet_atomic(curated, layout.part_path(out_dir, bucket), CURATED)
    return curated.num_rows, int(pc.sum(curated["repeats"]).as_py() or 0), retrieved


# ---------------------------------------------------------------- driver


def _balanced_picks(
    ctx: StageContext, cluster_parts: list[Path], tree: ClusterTree, fanout: Fanout
) -> _Picks:
    cfg = ctx.spec.sampling
    budget = leaf_budgets(tree, cfg.target_size, cfg.max_repeats)
    leaf_sizes = tree.sizes[0]
    extra = select_smallest(
        cluster_parts,
        functools.partial(leaf_rows, seed=cfg.seed),
        leaf_sizes,
        extra_picks(budget, leaf_sizes),
        0.0,
        1.0,
        name="sample: leaf pick",
        fanout=fanout,
    )
    return _Picks(budget, leaf_sizes, extra, cfg.seed)


def run(ctx: StageContext) -> SampleSummary:
    cfg = ctx.spec.sampling
    if cfg.max_repeats < 1:
        raise ValueError(f"max_repeats must be >= 1, got {cfg.max_repeats}")
    ctx.ray()
    fanout = RayFanout()
    retrieved_parts = ctx.parts(layout.RETRIEVED)
    cluster_parts = ctx.parts(layout.CLUSTERS) if cfg.target_size > 0 else []
    scratch = ctx.scratch_dir("buckets")
    shutil.rmtree(scratch, ignore_errors=True)  # buckets of an earlier attempt may be cut otherwise

    clustered = fanout.fold(_tree_task, cluster_parts, _merge_trees, name="sample: cluster sizes")
    clustered = clustered or _TreeResult(None, 0, None, None)
    ranges = fanout.map(_id_range_task, retrieved_parts, name="sample: retrieved ids")
    picks = _balanced_picks(ctx, cluster_parts, clustered.tree, fanout) if clustered.rows else None

    ends = [i for r in ranges for i in r[1:] if i is not None]
    ends += [i for i in (clustered.min_id, clustered.max_id) if i is not None]
    rows = min(clustered.rows, cfg.target_size) + sum(r[0] for r in ranges)
    buckets = max(1, -(-rows // ROWS_PER_BUCKET))
    bounds = bucket_bounds(min(ends, default=0), max(ends, default=0), buckets)
    sources = [("clusters", str(p)) for p in (cluster_parts if picks else [])]
    sources += [("retrieved", str(p)) for p in retrieved_parts]
    size = max(1, -(-len(sources) // SCATTER_TASKS))
    writers = list(enumerate(sources[i : i + size] for i in range(0, len(sources), size)))
    drawn = fanout.map(
        _scatter_task, writers, name="sample: scatter to buckets", scratch=scratch, bounds=bounds, picks=picks
    )
    out_dir = ctx.output_dir(layout.CURATED)
    merged = fanout.map(
        _merge_task, list(range(buckets)), name="sample: merge", scratch=scratch, out_dir=out_dir
    )
    for stale in layout.list_parts(out_dir)[buckets:]:
        stale.unlink()
    shutil.rmtree(scratch, ignore_errors=True)

    balanced = sum(s for _, s in drawn)
    if cfg.target_size and balanced < cfg.target_size:
        log.warning("sample: the pool holds only %d samples of the %d asked", balanced, cfg.target_size)
    summary = SampleSummary(
        images=sum(m[0] for m in merged),
        samples=sum(m[1] for m in merged),
        balanced=balanced,
        balanced_images=sum(i for i, _ in drawn),
        retrieved=sum(m[2] for m in merged),
    )
    log.info("sample: %s", summary)
    return summary


STAGE = Stage(
    name="sample",
    reads=(layout.RETRIEVED, layout.CLUSTERS),
    writes=(layout.CURATED,),
    spec_sections=("sampling",),
    resources=Resources(engine="ray"),
    summary=SampleSummary,
    run=run,
)
