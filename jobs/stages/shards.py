"""Stage "shards": curated ⋈ images -> WebDataset tars, one Spark task per shard.

The driver plans (numpy/Arrow, deterministic for spec.shards.seed) and writes the plan as parquet
with one row group per shard; Spark runs one task per shard id, which reads that row group and
writes the shard (`jobs.shard_writer.write_shard`). Shards finished by an earlier run of the same
plan are kept; only the missing ones go to Spark. The index is written last.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lvd.jobs.shard_writer import (
    finished_shard,
    plan_digest,
    plan_shards,
    remove_stale,
    write_index,
    write_shard,
)
from lvd.jobs.stage import Resources, Stage, StageContext, StageSummary
from lvd.schemas import layout
from lvd.schemas.tables import CLUSTERS, CURATED, IMAGES, read_parts

log = logging.getLogger("lvd")

PLAN_FILE = "_plan.parquet"  # read by the Spark tasks, removed when all shards are written


@dataclass
class ShardsSummary(StageSummary):
    FUNNEL = (("shards written", "shards"),)
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    errors: int = 0
    pattern: str = ""


def _write_plan(plan: pa.Table, path: Path, n_shards: int) -> None:
    """The plan as parquet with row group i = shard i, so a task reads only its own rows."""
    shards = plan["shard"].to_numpy()
    bounds = np.searchsorted(shards, np.arange(n_shards + 1))
    tmp = path.with_name(f".{path.name}.tmp")
    with pq.ParquetWriter(tmp, plan.schema) as writer:
        for s in range(n_shards):
            writer.write_table(plan.slice(bounds[s], bounds[s + 1] - bounds[s]), row_group_size=1 << 30)
    os.replace(tmp, path)


def _shard_writer(out_dir: str, plan_path: str):
    """The Spark task: write each shard id of its partition from the plan's row group of that id."""

    def write(shards: Iterable[int]) -> Iterator[dict[str, Any]]:
        with fsspec.open(plan_path, "rb") as f:
            plan = pq.ParquetFile(f)
            for shard in shards:
                yield write_shard(out_dir, shard, plan.read_row_group(shard).to_pylist())

    return write


def write_shards_spark(spark, plan: pa.Table, out_dir: str | Path) -> list[dict[str, Any]]:
    """Write every shard of `plan` not already finished; returns one result per shard, in order.

    One Spark task per shard: the driver distributes only shard ids (`parallelize` with one slice
    per shard) and each task reads its rows from `<out_dir>/_plan.parquet` (on a cluster, the output
    folder must be on storage the executors see).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_shards = int(plan["shard"][-1].as_py()) + 1 if plan.num_rows else 0
    remove_stale(out_dir, n_shards)
    shards = plan["shard"].to_numpy()
    bounds = np.searchsorted(shards, np.arange(n_shards + 1))
    results: dict[int, dict] = {}
    todo = []
    for shard in range(n_shards):
        rows = plan.slice(bounds[shard], bounds[shard + 1] - bounds[shard]).to_pylist()
        done = finished_shard(out_dir, shard, plan_digest(sorted(rows, key=lambda r: r["key"])))
        if done is not None:
            results[shard] = done
        else:
            todo.append(shard)
    log.info("shards: %d to write, %d kept from an earlier run", len(todo), len(results))
    if todo:
        plan_path = out_dir / PLAN_FILE
        _write_plan(plan, plan_path, n_shards)
        written = (
            spark.sparkContext.parallelize(todo, numSlices=len(todo))
            .mapPartitions(_shard_writer(str(out_dir), str(plan_path)))
            .collect()
        )
        for meta in written:
            results[layout.shard_number(meta["shard"])] = meta
        plan_path.unlink(missing_ok=True)
    return [results[s] for s in range(n_shards)]


def run(ctx: StageContext) -> ShardsSummary:
    spec = ctx.spec.shards
    curated = read_parts(ctx.parts(layout.CURATED), CURATED)
    images = read_parts(ctx.parts(layout.IMAGES), IMAGES, columns=IMAGES.names)
    clusters = read_parts(ctx.parts(layout.CLUSTERS), CLUSTERS, columns=["image_id", "cluster_ids"])
    plan = plan_shards(curated, images, clusters, spec.samples_per_shard, spec.max_shard_bytes, spec.seed)
    results = write_shards_spark(ctx.spark(), plan, ctx.output_dir(layout.SHARDS))
    index = write_index(ctx.output_dir(layout.SHARDS), results)
    errors = [e for r in results for e in r.get("errors", [])]
    for key, uri, reason in errors[:20]:
        log.warning("shards: left out %s (%s): %s", key, uri, reason)
    return ShardsSummary(**index["total"], errors=len(errors), pattern=index["pattern"])


STAGE = Stage(
    name="shards",
    reads=(layout.CURATED, layout.IMAGES, layout.CLUSTERS),
    writes=(layout.SHARDS,),
    spec_sections=("shards",),
    resources=Resources(engine="spark"),
    summary=ShardsSummary,
    run=run,
)
