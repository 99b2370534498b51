"""Stage "shards": curated ⋈ images -> WebDataset tars, one Spark task per shard.

Spark plans on its executors (`jobs.shard_plan`: join, deal order, shard count, positions; the
plan lands in scratch as files of a few whole shards each). Then one Spark task per shard reads its
shard's rows and writes the shard (`jobs.shard_writer.write_shard`), unless a shard finished by an
earlier run of the same rows is there: that one is kept. The index is written last. The driver
holds per-shard results only.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lvd.jobs.engines import collect_with_progress
from lvd.jobs.progress import Progress
from lvd.jobs.shard_plan import ShardPlan, plan_shards_spark
from lvd.jobs.shard_writer import (
    finished_shard,
    plan_digest,
    remove_stale,
    remove_temps,
    write_index,
    write_shard,
)
from lvd.jobs.stage import Resources, Stage, StageContext, StageSummary
from lvd.schemas import layout

log = logging.getLogger("lvd")


@dataclass
class ShardsSummary(StageSummary):
    FUNNEL = (("shards written", "shards"),)
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    errors: int = 0
    pattern: str = ""


def _shard_writer(out_dir: str, plan: ShardPlan):
    """The Spark task: for each shard id of its partition, keep the shard if an earlier run finished
    it for the same rows, else write it. Yields (kept, result)."""

    def write(shards: Iterable[int]) -> Iterator[tuple[bool, dict[str, Any]]]:
        for shard in shards:
            rows = plan.rows(shard)
            done = finished_shard(out_dir, shard, plan_digest(sorted(rows, key=lambda r: r["key"])))
            yield (True, done) if done is not None else (False, write_shard(out_dir, shard, rows))

    return write


def write_shards_spark(spark, plan: ShardPlan, out_dir: str | Path) -> list[dict[str, Any]]:
    """Write every shard of `plan` not already finished; returns one result per shard, in order.

    One Spark task per shard: the driver distributes only shard ids and each task reads its own
    rows from the plan (on a cluster, the output folder must be on storage the executors see).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale(out_dir, plan.n_shards)
    if plan.n_shards == 0:
        return []
    tasks = spark.sparkContext.parallelize(range(plan.n_shards), numSlices=plan.n_shards)
    outcomes = collect_with_progress(
        spark,
        tasks.mapPartitions(_shard_writer(str(out_dir), plan)),
        Progress("shards", plan.n_shards, "shards"),
    )
    remove_temps(out_dir)
    kept = sum(k for k, _ in outcomes)
    log.info("shards: %d written, %d kept from an earlier run", len(outcomes) - kept, kept)
    results = {layout.shard_number(meta["shard"]): meta for _, meta in outcomes}
    return [results[s] for s in range(plan.n_shards)]


def run(ctx: StageContext) -> ShardsSummary:
    spec = ctx.spec.shards
    spark = ctx.spark()
    scratch = ctx.scratch_dir(layout.SHARD_PLAN)
    plan = plan_shards_spark(
        spark,
        ctx.parts(layout.CURATED),
        ctx.parts(layout.IMAGES),
        ctx.parts(layout.CLUSTERS),
        scratch,
        spec.samples_per_shard,
        spec.max_shard_bytes,
        spec.seed,
    )
    results = write_shards_spark(spark, plan, ctx.output_dir(layout.SHARDS))
    index = write_index(ctx.output_dir(layout.SHARDS), results)
    shutil.rmtree(scratch, ignore_errors=True)
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
