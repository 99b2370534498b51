"""Stage "shards": curated ⋈ images -> WebDataset tars, a Spark task per run of a few shards.

Spark plans on its executors (`jobs.shard_plan`: join, deal order, shard count, positions; the
plan lands in scratch as files of a few whole shards each). Then each Spark task takes a run of
consecutive shards and, for each, reads its rows and writes the shard
(`jobs.shard_writer.write_shard`), unless a shard finished by an earlier run of the same rows is
there: that one is kept. The index is written last. The driver holds per-shard results only.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from lvd.jobs.engines import collect_with_progress
from lvd.jobs.progress import Progress
from lvd.jobs.shard_plan import EarlierShards, ShardPlan, plan_shards_spark
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
from lvd.schemas.tables import SHARD_INDEX, write_json_atomic, write_parquet_atomic

log = logging.getLogger("lvd")

# Spark tasks per core of the session: a task per shard costs Spark's per-task overhead for every
# shard, which is a large share when a shard takes a second; a few tasks per core keep the cores
# busy to the end when one task runs slower than the others.
TASKS_PER_CORE = 3
# At most this many shards per task, so that progress (counted per task) moves on large outputs and a
# retried task redoes little.
MAX_SHARDS_PER_TASK = 16


@dataclass
class ShardsSummary(StageSummary):
    FUNNEL = (("shards written", "shards"),)
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    errors: int = 0
    pattern: str = ""
    version: int = 1  # of the output: each rerun on changed inputs that keeps shards adds one
    unchanged: int = 0  # shards of the version before kept as they are (not rewritten)
    new: int = 0  # shards written for this version


def _shard_writer(out_dir: str, plan: ShardPlan):
    """The Spark task: for each shard id of its partition, keep the shard if an earlier run finished
    it for the same rows, else write it. Yields (kept, result)."""

    def write(shards: Iterable[int]) -> Iterator[tuple[bool, dict[str, Any]]]:
        for shard in shards:
            rows = plan.rows(shard)
            done = finished_shard(out_dir, shard, plan_digest(sorted(rows, key=lambda r: r["key"])))
            yield (True, done) if done is not None else (False, write_shard(out_dir, shard, rows))

    return write


def write_shards_spark(
    spark, plan: ShardPlan, out_dir: str | Path, n_tasks: int | None = None
) -> list[dict[str, Any]]:
    """Write every shard of `plan` not already finished; returns one result per shard, in order.
    `n_tasks`: Spark tasks to spread the shards over (default: `shard_tasks`).

    Each Spark task writes a run of consecutive shards (`shard_tasks`): the driver distributes only
    shard ids and each task reads its shards' rows from the plan, whose files hold runs of
    consecutive shards (on a cluster, the output folder must be on storage the executors see).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if plan.first == 0:
        remove_stale(out_dir, plan.n_shards)
    else:  # the shards before `first` are earlier versions' (kept, or named by an older manifest)
        _remove_stale_after(out_dir, plan.first + plan.n_shards)
    if plan.n_shards == 0:
        return []
    if n_tasks is None:
        n_tasks = shard_tasks(plan.n_shards, spark.sparkContext.defaultParallelism)
    n_tasks = max(1, min(n_tasks, plan.n_shards))
    tasks = spark.sparkContext.parallelize(plan.shards, numSlices=n_tasks)
    outcomes = collect_with_progress(
        spark,
        tasks.mapPartitions(_shard_writer(str(out_dir), plan)),
        Progress("shards", n_tasks, "tasks"),
    )
    remove_temps(out_dir)
    kept = sum(k for k, _ in outcomes)
    log.info("shards: %d written, %d kept from an earlier run", len(outcomes) - kept, kept)
    results = {layout.shard_number(meta["shard"]): meta for _, meta in outcomes}
    return [results[s] for s in plan.shards]


def shard_tasks(n_shards: int, cores: int, per_core: int = TASKS_PER_CORE) -> int:
    """How many Spark tasks write `n_shards` shards on `cores` cores: `per_core` tasks per core, or
    more when a task would get over MAX_SHARDS_PER_TASK shards; never more than one per shard."""
    wanted = max(per_core * max(1, cores), -(-n_shards // MAX_SHARDS_PER_TASK))
    return max(1, min(n_shards, wanted))


def _remove_stale_after(out_dir: Path, end: int) -> None:
    """Temp files, shards numbered from `end` on (a killed attempt's), and the old index."""
    for p in out_dir.iterdir():
        number = layout.shard_number(p.name)
        if layout.is_temp(p.name) or (number is not None and number >= end):
            p.unlink(missing_ok=True)
    for name in (layout.SHARD_INDEX_JSON, layout.SHARD_INDEX_PARQUET):
        (out_dir / name).unlink(missing_ok=True)


@dataclass(frozen=True)
class EarlierVersion:
    """The finished shard folder of an earlier run, kept aside by the runner."""

    folder: Path
    version: int
    rows: dict[int, dict[str, Any]]  # its index rows by shard number
    shards: EarlierShards  # its shards' sample tables, and the number new shards start from


def earlier_version(ctx: StageContext) -> EarlierVersion | None:
    """The earlier version to append to (shards.on_new_images: append, same shard settings); None
    to plan every shard anew. Which of its shards stay unchanged is the plan's to find."""
    from lvd.jobs.pipeline import read_marker

    previous = ctx.previous_dir
    if previous is None or ctx.spec.shards.on_new_images != "append":
        return None
    marker = read_marker(previous) or {}
    if marker.get("config_fingerprint") != ctx.spec.fingerprint(*ctx.stage.spec_sections):
        return None
    try:
        index = json.loads((previous / layout.SHARD_INDEX_JSON).read_text())
    except (OSError, ValueError):
        return None
    rows = {layout.shard_number(r["shard"]): r for r in index["shards"]}
    out_dir = ctx.output_dir(layout.SHARDS)
    # A killed attempt of this run may have moved some files already (`adopt_earlier_files`).
    folders = [previous, *([out_dir] if out_dir.is_dir() else [])]
    named = set(rows) | {
        layout.shard_number(r["shard"])
        for f in folders
        for v in layout.list_shard_versions(f)
        for r in json.loads(v.read_text())["shards"]
    }

    def table(n: int) -> str:
        path = previous / layout.shard_table_name(n)
        return str(path if path.exists() else out_dir / layout.shard_table_name(n))

    shards = EarlierShards(tuple(table(n) for n in sorted(rows)), max(named, default=-1) + 1)
    return EarlierVersion(previous, int(index.get("version", 1)), rows, shards)


def adopt_earlier_files(earlier: EarlierVersion, out_dir: Path) -> None:
    """Move every shard (tar and parquet) and version manifest of the earlier folder into this one:
    kept shards are not rewritten (same file, inode and mtime), and the shards of older versions stay
    readable through their manifests."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in earlier.folder.iterdir():
        if layout.shard_number(p.name) is not None or layout.SHARD_VERSION.fullmatch(p.name):
            p.rename(out_dir / p.name)


def write_version_index(
    out_dir: Path, version: int, unchanged: list[dict[str, Any]], new: list[dict[str, Any]]
) -> dict[str, Any]:
    """This version's manifest: index.json (and index.parquet) list its shards, which are unchanged
    from the version before and which are new; index-vNNNN.json keeps it for readers of this version."""
    rows = sorted(
        ({k: r[k] for k in SHARD_INDEX.names} for r in [*unchanged, *new]), key=lambda r: r["shard"]
    )
    total = {
        "shards": len(rows),
        "samples": sum(r["samples"] for r in rows),
        "bytes": sum(r["bytes"] for r in rows),
    }
    contiguous = [r["shard"] for r in rows] == [layout.shard_name(i) for i in range(len(rows))]
    doc = {
        "version": version,
        "shards": rows,
        "total": total,
        # A brace pattern names the shards only when they are 0 .. n-1; else read the list.
        "pattern": layout.shard_pattern(len(rows)) if contiguous else "",
        "unchanged": sorted(r["shard"] for r in unchanged),
        "new": sorted(r["shard"] for r in new),
    }
    write_parquet_atomic(
        pa.Table.from_pylist(rows, schema=SHARD_INDEX), out_dir / layout.SHARD_INDEX_PARQUET, SHARD_INDEX
    )
    write_json_atomic(out_dir / layout.shard_version_manifest(version), doc)
    write_json_atomic(out_dir / layout.SHARD_INDEX_JSON, doc)
    return doc


def run(ctx: StageContext) -> ShardsSummary:
    spec = ctx.spec.shards
    spark = ctx.spark()
    out_dir = ctx.output_dir(layout.SHARDS)
    scratch = ctx.scratch_dir(layout.SHARD_PLAN)
    earlier = earlier_version(ctx)
    plan = plan_shards_spark(
        spark,
        ctx.parts(layout.CURATED),
        ctx.parts(layout.IMAGES),
        ctx.parts(layout.CLUSTERS),
        scratch,
        spec.samples_per_shard,
        spec.max_shard_bytes,
        spec.seed,
        earlier=earlier.shards if earlier is not None else None,
    )
    if earlier is not None:
        log.info(
            "shards: version %d keeps %d of %d shards; the other samples go to new shards from %s",
            earlier.version + 1,
            len(plan.kept),
            len(earlier.rows),
            layout.shard_name(earlier.shards.first),
        )
        adopt_earlier_files(earlier, out_dir)
    results = write_shards_spark(spark, plan, out_dir)
    if earlier is None:
        index = write_index(out_dir, results)
        index = write_version_index(out_dir, 1, [], index["shards"])
    else:
        unchanged = [earlier.rows[n] for n in sorted(plan.kept)]
        index = write_version_index(out_dir, earlier.version + 1, unchanged, results)
    shutil.rmtree(scratch, ignore_errors=True)
    errors = [e for r in results for e in r.get("errors", [])]
    for key, uri, reason in errors[:20]:
        log.warning("shards: left out %s (%s): %s", key, uri, reason)
    return ShardsSummary(
        **index["total"],
        errors=len(errors),
        pattern=index["pattern"],
        version=index["version"],
        unchanged=len(index["unchanged"]),
        new=len(index["new"]),
    )


STAGE = Stage(
    name="shards",
    reads=(layout.CURATED, layout.IMAGES, layout.CLUSTERS),
    writes=(layout.SHARDS,),
    spec_sections=("shards",),
    resources=Resources(engine="spark"),
    summary=ShardsSummary,
    run=run,
    reuses_previous=True,
)
