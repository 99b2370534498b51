"""The shard plan as Spark DataFrame work on executors: `plan_shards`'s result for inputs of any size.

The driver sees only per-partition, per-source-set and per-shard results; every per-sample step runs
on executors, each a Spark job:
1. read the curated, images and clusters parts and check them (the errors of `expand_samples`);
2. join them, expand repeats, compute the deal order (coarsest cluster, sources in order of first
   image id, finest cluster, seeded image key, image id, repeat) and sort; executors write the
   ordered samples with their sort partition and row number to scratch. Materialised because a
   recomputed global sort may cut its partitions elsewhere, and the next step counts them;
3. per-partition counts give every sample its global index g (the driver adds them up);
4. the shard count (with a byte target: per-residue byte sums as aggregations, per candidate);
5. shard = g mod n, its deal rank g div n; executors group the samples by plan file (a run of
   consecutive shards), place each shard's members (`place_in_shards`) and write that file with a
   row group per shard, so a shard's task reads a small footer and its own rows only.

A small output (at most SMALL_PLAN_ROWS curated images) is planned by one executor task instead:
`plan_shards` on the whole tables, written as the same plan files. Each of the steps above is a
Spark job that costs seconds whatever its size, which is most of a small job's shard stage.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from lvd.jobs.shard_writer import (
    JSON_FIXED_BYTES,
    PLAN,
    SAME_COLUMNS,
    TAR_BLOCK,
    ShardPlanError,
    image_order_key,
    place_in_shards,
    plan_shards,
    read_plan_rows,
    shards_needed,
    write_plan_file,
)
from lvd.schemas import layout
from lvd.schemas.tables import CLUSTERS, CURATED, IMAGES, SHARD_SAMPLES

log = logging.getLogger("lvd")

# Rows per plan file (a run of whole shards): a few tens of MB for one executor to place and write.
PLAN_FILE_ROWS = 1 << 17
# Samples per partition of the global sort: its partition count follows the data, not the session's
# shuffle setting (a sort partition is sorted by one task and written as one file).
SORT_PARTITION_ROWS = 1 << 21
# Curated images up to which one executor task plans every shard (`plan_shards` in memory): a few
# tens of MB in one task, where the steps on Spark would each cost a job's fixed time.
SMALL_PLAN_ROWS = 1 << 16
# Columns of a sample that the plan carries (PLAN without what placing adds).
SAMPLE_COLUMNS = [n for n in PLAN.names if n not in ("shard", "position", "key")]
# Columns of the images table a sample takes (where its bytes are and what its sidecar names).
IMAGE_COLUMNS = ["dataset", "uri", "kind", "path", "member", "offset", "size", "sha256", "format"]


@dataclass(frozen=True)
class ShardPlan:
    """Where the plan of `n_shards` shards lies: plan files of `shards_per_file` consecutive shards."""

    folder: str
    n_shards: int
    n_samples: int
    shards_per_file: int
    sort_partitions: int = 1
    first: int = 0  # the number of the first shard (after the kept shards of an earlier version)
    kept: dict[int, int] = field(default_factory=dict)  # earlier shards kept as they are: number -> samples

    @property
    def shards(self) -> range:
        """The numbers of the planned shards."""
        return range(self.first, self.first + self.n_shards)

    def rows(self, shard: int) -> list[dict]:
        """Plan rows of one shard (what its writing task reads)."""
        local = shard - self.first
        file = layout.shard_plan_file(self.folder, local // self.shards_per_file)
        return read_plan_rows(str(file), local % self.shards_per_file)

    def table(self) -> pa.Table:
        """The whole plan in (shard, position) order: for tests and small runs only."""
        import pyarrow.parquet as pq

        files = [
            layout.shard_plan_file(self.folder, i) for i in range(-(-self.n_shards // self.shards_per_file))
        ]
        return pa.concat_tables([PLAN.empty_table(), *(pq.read_table(f, schema=PLAN) for f in files)])


@dataclass(frozen=True)
class KeptShards:
    """Shards of an earlier version kept as they are: their sample tables, how many samples they
    hold, and the number new shards start from (after every shard of every earlier version)."""

    tables: tuple[str, ...]  # the kept shards' parquet files (SHARD_SAMPLES)
    samples: int
    first: int


@dataclass(frozen=True)
class EarlierShards:
    """Every shard of an earlier version (its parquet files, SHARD_SAMPLES) and the number new shards
    start from (after every shard of every earlier version)."""

    tables: tuple[str, ...]
    first: int


def _table_number(path: str | Path) -> int | None:
    return layout.shard_number(Path(path).name)


def _earlier_samples(spark, tables: list[Path] | tuple[str, ...]):
    """The samples of earlier shards as a frame: their SHARD_SAMPLES columns, the repeat (the key's
    last field) and the shard's number."""
    from pyspark.sql import functions as F

    frame = _read(spark, [Path(t) for t in tables], SHARD_SAMPLES, SHARD_SAMPLES.names)
    return frame.withColumn("repeat", F.element_at(F.split("key", "_"), -1).cast("int")).withColumn(
        "number", F.regexp_extract("shard", r"(\d+)\.tar$", 1).cast("int")
    )


def _kept_samples(spark, keep: KeptShards):
    return _earlier_samples(spark, keep.tables).select("image_id", "repeat")


def unchanged_shards(
    spark,
    earlier_tables: list[Path],
    curated_parts: list[Path],
    images_parts: list[Path],
    clusters_parts: list[Path],
) -> dict[int, int]:
    """Which earlier shards would hold exactly the same samples now: every sample of the shard is
    still a sample (same image, repeat) with the same bytes, uri, format, sources and clusters (so
    its tar member and sidecar are unchanged). Returns {shard number: samples} of those shards.
    One Spark job: the earlier samples left-joined to today's, counted per shard."""
    from pyspark.sql import functions as F

    if not earlier_tables:
        return {}
    curated = _read(spark, curated_parts, CURATED, CURATED.names)
    images = _read(spark, images_parts, IMAGES, ["image_id", "status", *IMAGE_COLUMNS])
    clusters = _read(spark, clusters_parts, CLUSTERS, ["image_id", "cluster_ids"])
    now = (
        curated.join(images.filter(F.col("status") == "ok").drop("status"), "image_id")
        .join(clusters, "image_id", "left")
        .withColumn("repeat", F.explode(F.sequence(F.lit(0), F.col("repeats") - 1)))
        .select("image_id", "repeat", *(F.col(c).alias(f"now_{c}") for c in SAME_COLUMNS))
    )
    earlier = _earlier_samples(spark, earlier_tables)
    same = F.lit(True)
    for c in SAME_COLUMNS:
        same = same & F.col(c).eqNullSafe(F.col(f"now_{c}"))
    per_shard = (
        earlier.join(now, ["image_id", "repeat"], "left")
        .groupBy("number")
        .agg(F.count("*").alias("samples"), F.sum(F.coalesce(same, F.lit(False)).cast("long")).alias("same"))
        .collect()
    )
    return {r.number: int(r.samples) for r in per_shard if r.samples == r.same}


def _read(spark, paths: list[Path], schema: pa.Schema, columns: list[str]):
    """A table's parts as a DataFrame read by the executors (its empty frame with no parts)."""
    from pyspark.sql.pandas.types import from_arrow_schema

    spark_schema = from_arrow_schema(schema)
    if not paths:
        frame = spark.createDataFrame([], spark_schema)
    else:
        frame = spark.read.schema(spark_schema).parquet(*(str(p) for p in paths))
    return frame.select(*columns)


def check_inputs(curated, images) -> int:
    """Raise `ShardPlanError` as `expand_samples` does (same checks, order and messages); returns
    the number of samples (the sum of repeats). One Spark job: both tables grouped by image id."""
    from pyspark.sql import functions as F

    c, i = F.col("curated"), F.col("images")
    # One row per table row: which table it is from, and what the checks need of it.
    rows = curated.select(
        "image_id",
        F.lit(1).alias("curated"),
        F.lit(0).alias("images"),
        "repeats",
        F.lit(None).cast("string").alias("status"),
    ).unionByName(
        images.select(
            "image_id",
            F.lit(0).alias("curated"),
            F.lit(1).alias("images"),
            F.lit(None).cast("int").alias("repeats"),
            "status",
        )
    )
    per_id = rows.groupBy("image_id").agg(
        F.sum("curated").alias("curated"),
        F.sum("images").alias("images"),
        F.min("repeats").alias("min_repeats"),
        F.sum("repeats").alias("samples"),
        F.max((F.col("status") != "ok").cast("int")).alias("failed"),
    )
    missing = (c > 0) & (i == 0)
    failed = (c > 0) & (i > 0) & (F.col("failed") == 1)
    t = per_id.agg(
        F.sum("curated").alias("rows"),
        F.min("min_repeats").alias("min_repeats"),
        F.max("curated").alias("curated_copies"),
        F.max("images").alias("image_copies"),
        F.sum(missing.cast("long")).alias("missing"),
        F.sum(failed.cast("long")).alias("failed"),
        F.sum("samples").alias("samples"),
    ).first()

    def first_ids(condition) -> list[int]:  # only when raising: the smallest few, like the old message
        return [
            r.image_id
            for r in per_id.filter(condition).select("image_id").orderBy("image_id").limit(5).collect()
        ]

    if t.rows and t.min_repeats < 1:
        raise ShardPlanError("curated: repeats must be >= 1")
    if t.rows and t.curated_copies > 1:
        raise ShardPlanError("curated: image_id repeated; use `repeats` instead")
    if t.image_copies is not None and t.image_copies > 1:
        raise ShardPlanError("images: an image_id appears more than once")
    if t.missing:
        raise ShardPlanError(
            f"{t.missing} curated image(s) not in the images table, e.g. {first_ids(missing)}"
        )
    if t.failed:
        raise ShardPlanError(f"{t.failed} curated image(s) failed ingest, e.g. {first_ids(failed)}")
    return int(t.samples or 0)


def _member_bytes(size):
    """`tar_member_bytes` as a Spark column expression (integer arithmetic only)."""
    padded = size.cast("long") + (TAR_BLOCK - 1)
    return padded - padded % TAR_BLOCK + TAR_BLOCK


def ordered_samples(curated, images, clusters, seed: int, partitions: int = 1, exclude=None):
    """Every sample with its deal order keys and estimated tar bytes, sorted in deal order into
    `partitions` range partitions (partition i holds samples before those of partition i + 1).
    `exclude`: a frame of (image_id, repeat) samples left out (those of kept shards)."""
    from pyspark.sql import functions as F
    from pyspark.sql.functions import pandas_udf

    @pandas_udf("long")
    def image_key(image_id):  # pandas Series in, Series out (Arrow batches on the executor)
        import pandas as pd

        return pd.Series(image_order_key(image_id.to_numpy(), seed))

    sources_text = F.array_join("sources", "|")
    # `plan_shards` numbers source sets in order of first appearance among samples sorted by
    # image_id (`dictionary_encode`), i.e. by the smallest image_id of each set: one row per set.
    first_id = curated.groupBy(sources_text.alias("sources_text")).agg(F.min("image_id").alias("source"))
    levels = F.col("cluster_ids")
    has_levels = F.coalesce(F.size(levels), F.lit(0)) > 0
    samples = (
        curated.withColumn("sources_text", sources_text)
        .join(F.broadcast(first_id), "sources_text")
        .withColumn("image_key", image_key("image_id"))  # per image, before repeats are expanded
        .join(images.filter(F.col("status") == "ok").drop("status"), "image_id")
        .join(clusters, "image_id", "left")
        .withColumn("repeat", F.explode(F.sequence(F.lit(0), F.col("repeats") - 1)))
    )
    if exclude is not None:
        samples = samples.join(exclude, ["image_id", "repeat"], "left_anti")
    samples = (
        samples.withColumn("coarse", F.when(has_levels, F.element_at(levels, -1)).otherwise(-1).cast("long"))
        .withColumn("fine", F.when(has_levels, F.element_at(levels, 1)).otherwise(-1).cast("long"))
        .withColumn(
            "bytes",
            _member_bytes(F.col("size")) + _member_bytes(F.octet_length("uri") + JSON_FIXED_BYTES),
        )
    )
    order = ["coarse", "source", "fine", "image_key", "image_id", "repeat"]
    sorted_samples = samples.repartitionByRange(partitions, *order).sortWithinPartitions(*order)
    return sorted_samples.select(*SAMPLE_COLUMNS, "bytes")


def plan_shards_spark(
    spark,
    curated_parts: list[Path],
    images_parts: list[Path],
    clusters_parts: list[Path],
    folder: str | Path,
    samples_per_shard: int,
    max_shard_bytes: int | None = None,
    seed: int = 0,
    keep: KeptShards | None = None,
    earlier: EarlierShards | None = None,
) -> ShardPlan:
    """Plan the shards on executors into `folder` (scratch on storage every executor sees).

    Same plan as `plan_shards` on the same tables, row for row. With `keep`, the samples of the kept
    shards are left out and the rest are dealt into shards numbered from `keep.first`. With
    `earlier` (an earlier version's shards), the kept shards are those whose samples are all
    unchanged (`unchanged_shards`), found first; the plan's `kept` names them.
    """
    from pyspark.sql import functions as F

    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if keep is None:
        # A small output: the unchanged shards and the plan in one executor task, where the steps
        # below (and the unchanged shards' join) would each cost a Spark job.
        small = plan_in_one_task(
            spark,
            curated_parts,
            images_parts,
            clusters_parts,
            folder,
            samples_per_shard,
            max_shard_bytes,
            seed,
            earlier=earlier,
        )
        if small is not None:
            return small
        if earlier is not None:
            kept = unchanged_shards(spark, list(earlier.tables), curated_parts, images_parts, clusters_parts)
            tables = tuple(t for t in earlier.tables if _table_number(t) in kept)
            keep = KeptShards(tables, sum(kept.values()), earlier.first)
            plan = plan_shards_spark(
                spark, curated_parts, images_parts, clusters_parts, folder, samples_per_shard,
                max_shard_bytes, seed, keep=keep,
            )  # fmt: skip
            return replace(plan, kept=kept)
    curated = _read(spark, curated_parts, CURATED, CURATED.names)
    images = _read(spark, images_parts, IMAGES, ["image_id", "status", *IMAGE_COLUMNS])
    clusters = _read(spark, clusters_parts, CLUSTERS, ["image_id", "cluster_ids"])
    clock = time.perf_counter()

    def step(done: str) -> None:
        nonlocal clock
        log.info("shards plan: %s in %.1f s", done, time.perf_counter() - clock)
        clock = time.perf_counter()

    n_samples = check_inputs(curated, images)
    step(f"checked inputs ({n_samples} samples)")
    first, exclude = 0, None
    if keep is not None:
        first, n_samples = keep.first, n_samples - keep.samples
        exclude = _kept_samples(spark, keep)
    if n_samples == 0:
        return ShardPlan(str(folder), 0, 0, 1, first=first)

    # Sort partition and row within it, taken right after the sort (nondeterministic expressions
    # stay where they are): the lower 33 bits of monotonically_increasing_id count rows.
    ordered_dir = layout.shard_plan_ordered(folder)
    partitions = -(-n_samples // SORT_PARTITION_ROWS)
    ordered_samples(curated, images, clusters, seed, partitions, exclude).select(
        "*",
        F.spark_partition_id().alias("part"),
        (F.monotonically_increasing_id().bitwiseAND((1 << 33) - 1)).alias("row"),
    ).write.parquet(str(ordered_dir))
    step(f"sorted into {partitions} partition(s)")
    ordered = spark.read.parquet(str(ordered_dir))
    parts = sorted(
        ordered.groupBy("part").agg(F.count("*").alias("rows"), F.sum("bytes").alias("bytes")).collect()
    )
    step("counted the sort partitions")
    counted = sum(p.rows for p in parts)
    if counted != n_samples:
        raise RuntimeError(f"shard plan: {counted} ordered samples, expected {n_samples}")
    starts = np.cumsum([p.rows for p in parts]) - [p.rows for p in parts]
    offsets = spark.createDataFrame(
        [(p.part, int(start)) for p, start in zip(parts, starts, strict=True)], "part int, start long"
    )
    dealt = ordered.join(F.broadcast(offsets), "part").withColumn("g", F.col("start") + F.col("row"))

    def largest_deal(n: int) -> int:
        residues = dealt.groupBy((F.col("g") % n).alias("residue")).agg(F.sum("bytes").alias("bytes"))
        return int(residues.agg(F.max("bytes")).first()[0])

    total_bytes = sum(int(p.bytes) for p in parts)
    n_shards = shards_needed(n_samples, total_bytes, samples_per_shard, max_shard_bytes, largest_deal)
    step(f"counted {n_shards} shards")
    per_file = max(1, PLAN_FILE_ROWS // -(-n_samples // n_shards))
    placed = (
        dealt.withColumn("shard", (F.col("g") % n_shards + first).cast("int"))
        .withColumn("deal_rank", F.expr(f"g div {n_shards}"))
        .withColumn("file", F.expr(f"(shard - {first}) div {per_file}").cast("int"))
        .select(*SAMPLE_COLUMNS, "shard", "deal_rank", "file")
        .repartition(-(-n_shards // per_file), "file")
        .groupBy("file")
        .applyInArrow(_plan_file_writer(str(folder), per_file, seed, first), "shard int, samples long")
        .collect()
    )
    step("placed the samples and wrote the plan files")
    counts = dict(placed)
    if sorted(counts) != list(range(first, first + n_shards)) or sum(counts.values()) != n_samples:
        raise RuntimeError(f"shard plan: {len(counts)} shards placed, expected {n_shards}")
    shutil.rmtree(ordered_dir)
    log.info("shards: planned %d samples into %d shards (%d sort partitions, %d plan files)",
             n_samples, n_shards, len(parts), -(-n_shards // per_file))  # fmt: skip
    return ShardPlan(str(folder), n_shards, n_samples, per_file, len(parts), first)


def plan_in_one_task(
    spark,
    curated_parts: list[Path],
    images_parts: list[Path],
    clusters_parts: list[Path],
    folder: Path,
    samples_per_shard: int,
    max_shard_bytes: int | None,
    seed: int,
    max_rows: int | None = None,
    earlier: EarlierShards | None = None,
) -> ShardPlan | None:
    """`plan_shards_spark`'s plan made by one executor task with `plan_shards`, when the curated
    table has at most `max_rows` rows (default SMALL_PLAN_ROWS); None, having read only the curated
    parts' footers, when it has more. With `earlier`, the same task finds the unchanged shards
    (`unchanged_samples_per_shard`) and plans the other samples into shards from `earlier.first`."""
    limit = SMALL_PLAN_ROWS if max_rows is None else max_rows
    file_rows = PLAN_FILE_ROWS  # read here: the task's process has its own module
    args = ([str(p) for p in curated_parts], [str(p) for p in images_parts], [str(p) for p in clusters_parts])
    before = (list(earlier.tables), earlier.first) if earlier is not None else None
    task = spark.sparkContext.parallelize([args], 1).map(
        lambda a: _plan_small(
            *a, str(folder), samples_per_shard, max_shard_bytes, seed, limit, file_rows, before
        )
    )
    result = task.collect()[0]
    if result is None:
        return None
    if isinstance(result, str):  # a ShardPlanError in the task, raised here as in the Spark steps
        raise ShardPlanError(result)
    n_shards, n_samples, per_file, kept = result
    first = earlier.first if earlier is not None else 0
    log.info("shards: planned %d samples into %d shards in one task", n_samples, n_shards)
    return ShardPlan(str(folder), n_shards, n_samples, per_file, first=first, kept=kept)


def _plan_small(
    curated_parts: list[str],
    images_parts: list[str],
    clusters_parts: list[str],
    folder: str,
    samples_per_shard: int,
    max_shard_bytes: int | None,
    seed: int,
    max_rows: int,
    file_rows: int,
    earlier: tuple[list[str], int] | None = None,
) -> tuple[int, int, int, dict[int, int]] | str | None:
    """The executor's side of `plan_in_one_task`: (shards, samples, shards per file, kept earlier
    shards), the message of a ShardPlanError, or None when the curated table has over `max_rows` rows."""
    import pyarrow.parquet as pq

    from lvd.jobs.shard_writer import expand_samples, key_repeat, unchanged_samples_per_shard
    from lvd.schemas.tables import read_parts

    if sum(pq.read_metadata(p).num_rows for p in curated_parts) > max_rows:
        return None
    tables = (
        read_parts(curated_parts, CURATED),
        read_parts(images_parts, IMAGES, ["image_id", "status", *IMAGE_COLUMNS]),
        read_parts(clusters_parts, CLUSTERS, ["image_id", "cluster_ids"]),
    )
    kept, first, exclude = {}, 0, None
    try:
        if earlier is not None:
            paths, first = earlier
            before = read_parts(paths, SHARD_SAMPLES)
            kept = unchanged_samples_per_shard(before, expand_samples(*tables))
            numbers = np.array([layout.shard_number(n) for n in before["shard"].to_pylist()], np.int64)
            in_kept = pa.array(np.isin(numbers, np.array(sorted(kept), np.int64)))
            kept_samples = before.filter(in_kept)
            exclude = pa.table(
                {"image_id": kept_samples["image_id"], "repeat": key_repeat(kept_samples["key"])}
            )
        plan = plan_shards(*tables, samples_per_shard, max_shard_bytes, seed, exclude=exclude, first=first)
    except ShardPlanError as err:
        return str(err)
    if plan.num_rows == 0:
        return 0, 0, 1, kept
    shard = plan["shard"].to_numpy() - first
    n_shards, n_samples = int(shard[-1]) + 1, plan.num_rows
    per_file = max(1, file_rows // -(-n_samples // n_shards))
    bounds = np.searchsorted(
        shard, np.arange(0, n_shards + per_file, per_file)[: -(-n_shards // per_file) + 1]
    )
    for file, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        write_plan_file(plan.slice(start, end - start), layout.shard_plan_file(folder, file))
    return n_shards, n_samples, per_file, kept


def _plan_file_writer(folder: str, per_file: int, seed: int, first: int = 0):
    """The executor's work for one plan file: place its shards' members and write the file."""

    def write(table: pa.Table) -> pa.Table:
        file = int(table["file"][0].as_py())
        plan = place_in_shards(table.drop_columns(["file"]), seed)
        write_plan_file(plan, layout.shard_plan_file(folder, file))
        shards, counts = np.unique(plan["shard"].to_numpy(), return_counts=True)
        if shards[0] != first + file * per_file:
            raise RuntimeError(f"plan file {file} starts at shard {shards[0]}")
        return pa.table({"shard": pa.array(shards, pa.int32()), "samples": pa.array(counts, pa.int64())})

    return write
