"""Where a job's data lives on disk: the one owner of every folder, file and table name.

    <output_dir>/job.json                        the resolved spec of the last run
    <output_dir>/report.json                     the funnel, written when the last stage ends
    <output_dir>/report.html                     the HTML report, one self-contained file
    <output_dir>/report/part-NNNNN.parquet       decisions: one row per pool image, by image id range
    <output_dir>/<stage>/_started.json           fingerprints of the attempt whose parts are there
    <output_dir>/<stage>/_marker.json            written last: fingerprints, summary, seconds
    <output_dir>/<stage>/part-NNNNN.parquet      a table's parts (PARTS tables)
    <output_dir>/<stage>/part-NNNNN-<model>.parquet   embeddings: one file per ingest part and model
    <output_dir>/<stage>/<name>.parquet          single-file tables (centroids)
    <output_dir>/<stage>/_<name>/                a stage's scratch (resume state), removed when done
    <output_dir>/embed/_<name>/part-NNNNN/chunk-*.parquet   embed: vectors of a part not yet merged
    <output_dir>/shards/lvd-NNNNNN.tar           WebDataset shards, each with lvd-NNNNNN.parquet
    <output_dir>/shards/index.json, index.parquet   the dataset index, written last
    <output_dir>/shards/index-vNNNN.json         each version's manifest (shards unchanged and new)
    <output_dir>/_previous/<stage>/              an earlier run of a stage whose inputs changed, kept
                                                 while the stage reruns so it can reuse unchanged parts

Temp files are hidden (`.<name>.<random>.tmp` beside the final name) and renamed into place, so
no glob here ever matches a half-written file. Every other module asks this one for names.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa

from lvd.schemas import tables

JOB_FILE = "job.json"
REPORT_FILE = "report.json"
REPORT_HTML = "report.html"  # the HTML report (pictures), written by the report stage
MARKER = "_marker.json"
STARTED = "_started.json"

# Which set an image belongs to: "pool", "seed:<name>" or "eval:<name>".
POOL = "pool"


def seed_dataset(name: str) -> str:
    return f"seed:{name}"


def eval_dataset(name: str) -> str:
    return f"eval:{name}"


EVAL_PREFIX = eval_dataset("")

# Embedding models by role: one vector table per role.
RETRIEVAL = "retrieval"
COPY_DETECTION = "copy_detection"


@dataclass(frozen=True)
class Table:
    """A table between stages: its name, the stage folder that holds it and how it is stored.

    `schema` is None for tables whose schema depends on the run (embeddings: the vector width).
    """

    name: str
    stage: str
    schema: pa.Schema | None
    storage: Literal["parts", "model_parts", "file", "shards"] = "parts"

    def __str__(self) -> str:
        return self.name


IMAGES = Table("images", "ingest", tables.IMAGES)
EMBEDDINGS = Table("embeddings", "embed", None, "model_parts")
DEDUP = Table("dedup", "dedup", tables.DEDUP)
CLUSTERS = Table("clusters", "cluster", tables.CLUSTERS)
CENTROIDS = Table("centroids", "cluster", tables.CENTROIDS, "file")
RETRIEVED = Table("retrieved", "retrieve", tables.RETRIEVED)
CURATED = Table("curated", "sample", tables.CURATED)
SHARDS = Table("shards", "shards", tables.SHARD_SAMPLES, "shards")
DECISIONS = Table("decisions", "report", tables.DECISIONS)  # one row per pool image, by id range
ALL_TABLES = (IMAGES, EMBEDDINGS, DEDUP, CLUSTERS, CENTROIDS, RETRIEVED, CURATED, SHARDS, DECISIONS)


# ---------------------------------------------------------------- folders and files of a job


def stage_dir(out_dir: str | Path, stage: str) -> Path:
    return Path(out_dir) / stage


def table_dir(out_dir: str | Path, table: Table) -> Path:
    return stage_dir(out_dir, table.stage)


def table_file(out_dir: str | Path, table: Table) -> Path:
    """The file of a single-file table."""
    if table.storage != "file":
        raise ValueError(f"table {table.name!r} is stored as {table.storage}, not as one file")
    return table_dir(out_dir, table) / f"{table.name}.parquet"


def scratch_dir(stage_folder: str | Path, name: str) -> Path:
    """A stage's working folder for resume state (edge chunks, plans); removed when the stage ends."""
    return Path(stage_folder) / f"_{name}"


INGEST_PLAN = "_plan.json"  # ingest: fingerprint of the work units its parts were written for
EMBED_INPUTS = "_inputs.json"  # embed: the models' fingerprint and the digest of each images part embedded
PREVIOUS = "_previous"
# dedup: what a later run on a grown pool starts from, beside its parts: settings and part digests,
# the copy edges, the pool images that matched an eval image.
DEDUP_STATE = "_increment.json"
DEDUP_EDGES = "_increment-edges.parquet"
DEDUP_EVAL_MATCHED = "_increment-eval.parquet"
# dedup of a grown pool: the earlier run's images whose keep flipped (image_id, keep now), and the
# digest of the earlier run's parts they are relative to (in the file's metadata).
DEDUP_KEEP_FLIPS = "_increment-flips.parquet"
# retrieve: what a later run on a grown pool starts from: settings and the digest of each part.
RETRIEVE_STATE = "_increment.json"


def previous_stage_dir(out_dir: str | Path, stage: str) -> Path:
    """Where the runner keeps a stage's earlier output while the stage reruns on changed inputs
    (stages declaring `reuses_previous`): the stage adopts the parts it can, the runner then removes it."""
    return Path(out_dir) / PREVIOUS / stage


def embed_chunk_dir(scratch: str | Path, part: int) -> Path:
    """The folder of one embeddings part's chunks (vectors not yet merged) in a scratch folder."""
    return Path(scratch) / f"part-{part:05d}"


def embed_chunk_path(scratch: str | Path, part: int, first_row: int, rows: int) -> Path:
    """A chunk holding `rows` of a part's ok rows, the first being `first_row`: named by them so a
    retried batch overwrites its own chunk."""
    return embed_chunk_dir(scratch, part) / f"chunk-{first_row:09d}-{rows}.parquet"


def list_embed_chunks(scratch: str | Path, part: int) -> list[Path]:
    """The chunks of one part (temp files are hidden, so never listed)."""
    return sorted(embed_chunk_dir(scratch, part).glob("chunk-*.parquet"))


# A sharded kNN search's settled facts (database size, index kind, recall), beside its result parts.
SEARCH_STATE = "_search.json"


def bucket_dir(folder: str | Path, bucket: int) -> Path:
    """One bucket of a shuffle by key (exact dedup by content hash, curated rows by image id range): its
    parts go here, one per writer."""
    return Path(folder) / f"bucket-{bucket:05d}"


def list_buckets(folder: str | Path) -> list[Path]:
    """The bucket folders under `folder`, in bucket order."""
    return sorted(p for p in Path(folder).glob("bucket-*") if p.is_dir())


# ---------------------------------------------------------------- parts

_PART = re.compile(r"part-(\d+)(?:-([A-Za-z0-9_]+))?\.parquet")


def part_name(index: int, model: str | None = None) -> str:
    return f"part-{index:05d}.parquet" if model is None else f"part-{index:05d}-{model}.parquet"


def part_path(folder: str | Path, index: int, model: str | None = None) -> Path:
    return Path(folder) / part_name(index, model)


def table_part(out_dir: str | Path, table: Table, index: int, model: str | None = None) -> Path:
    """Part `index` of a table of the job at `out_dir`."""
    return part_path(table_dir(out_dir, table), index, model)


def read_table(
    out_dir: str | Path, table: Table, model: str | None = None, columns: list[str] | None = None
) -> pa.Table:
    """A whole table of a job, all parts in one Arrow table: for small tables, tests and tools, never
    for a stage's per-image data (stages hand parts to workers)."""
    if table.storage == "file":
        import pyarrow.parquet as pq

        return pq.read_table(table_file(out_dir, table), columns=columns)
    return tables.read_parts(list_parts(table_dir(out_dir, table), model), table.schema, columns)


def part_index(path: str | Path) -> int:
    m = _PART.fullmatch(Path(path).name)
    if m is None:
        raise ValueError(f"not a part file: {path}")
    return int(m.group(1))


def list_parts(folder: str | Path, model: str | None = None) -> list[Path]:
    """The part files of a folder in part order: plain parts, or one model's parts."""
    out = []
    for p in Path(folder).glob("part-*.parquet"):
        m = _PART.fullmatch(p.name)
        if m is not None and m.group(2) == model:
            out.append(p)
    return sorted(out, key=part_index)


# ---------------------------------------------------------------- temp files


def temp_path(path: str | Path) -> Path:
    """A hidden, unique name beside `path` to write to before renaming into place."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


# ---------------------------------------------------------------- WebDataset shards

SHARD_PREFIX = "lvd-"
SHARD_DIGITS = 6
SHARD_INDEX_JSON = "index.json"
SHARD_INDEX_PARQUET = "index.parquet"
_SHARD = re.compile(rf"{re.escape(SHARD_PREFIX)}(\d{{{SHARD_DIGITS}}})\.(tar|parquet)")


SHARD_VERSION = re.compile(r"index-v(\d{4,})\.json")


def shard_version_manifest(version: int) -> str:
    """The manifest of one version of a shard folder (its shards, which are unchanged and which new);
    index.json holds the latest version's."""
    return f"index-v{version:04d}.json"


def list_shard_versions(folder: str | Path) -> list[Path]:
    """The version manifests of a shard folder, oldest first."""
    found = [
        (int(m.group(1)), p)
        for p in Path(folder).glob("index-v*.json")
        if (m := SHARD_VERSION.fullmatch(p.name))
    ]
    return [p for _, p in sorted(found)]


def shard_tables(folder: str | Path) -> list[Path]:
    """The sample tables (parquet) of the shards of a folder's latest version: those its index.json
    lists; every shard parquet in the folder when there is no index (yet)."""
    import json

    folder = Path(folder)
    try:
        names = [row["shard"] for row in json.loads((folder / SHARD_INDEX_JSON).read_text())["shards"]]
        return [folder / shard_table_name(shard_number(n)) for n in names]
    except (OSError, ValueError, KeyError, TypeError):
        return sorted(p for p in folder.glob(f"{SHARD_PREFIX}*.parquet") if shard_number(p.name) is not None)


def shard_name(shard: int) -> str:
    return f"{SHARD_PREFIX}{shard:0{SHARD_DIGITS}d}.tar"


def shard_table_name(shard: int) -> str:
    """The parquet beside a shard: its samples and, in its metadata, what makes it finished."""
    return f"{SHARD_PREFIX}{shard:0{SHARD_DIGITS}d}.parquet"


def shard_number(name: str) -> int | None:
    """The number of a shard tar or shard parquet name, None for any other name."""
    m = _SHARD.fullmatch(name)
    return int(m.group(1)) if m else None


def is_shard_tar(name: str) -> bool:
    m = _SHARD.fullmatch(name)
    return m is not None and m.group(2) == "tar"


def shard_pattern(n_shards: int) -> str:
    """Brace pattern of shards 0 .. n-1, as webdataset and `lvd pretrain --shards` take it."""
    if n_shards == 0:
        return ""
    return f"{SHARD_PREFIX}{{{0:0{SHARD_DIGITS}d}..{n_shards - 1:0{SHARD_DIGITS}d}}}.tar"


def shards_dir(out_dir: str | Path) -> Path:
    return table_dir(out_dir, SHARDS)


# ---------------------------------------------------------------- the shard plan (shards stage scratch)

SHARD_PLAN = "plan"  # scratch name of the shards stage: <output_dir>/shards/_plan/


def shard_plan_ordered(plan_dir: str | Path) -> Path:
    """Spark's parquet folder of every sample in deal order (with its sort partition and row)."""
    return Path(plan_dir) / "ordered"


def shard_plan_file(plan_dir: str | Path, index: int) -> Path:
    """Plan file `index`: the plan rows of a run of consecutive shards, one row group per shard."""
    return Path(plan_dir) / f"plan-{index:06d}.parquet"


# ---------------------------------------------------------------- `lvd ablate` (jobs/ablate.py)
#
#   <output_dir>/ablate/ablation.json, ablation.md        the table, written last
#   <output_dir>/ablate/<arm>/curated/part-NNNNN.parquet   the arm's images (CURATED schema)
#   <output_dir>/ablate/<arm>/shards/                     its shards, written by the shards stage
#   <output_dir>/ablate/<arm>/pretrain/                   its pretraining run (checkpoint, teacher)
#   <output_dir>/ablate/<arm>/eval/<eval set>.json        its kNN and linear-probe results, per val image
# Each step's folder holds ABLATE_MARKER, written last: what it was made from (resume keys on it).

ABLATE_DIR = "ablate"
ABLATION_JSON = "ablation.json"
ABLATION_MD = "ablation.md"
ABLATE_MARKER = "_ablate.json"


def ablate_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / ABLATE_DIR


def ablate_arm_dir(out_dir: str | Path, arm: str) -> Path:
    return ablate_dir(out_dir) / arm


def ablate_arm_table_dir(out_dir: str | Path, arm: str) -> Path:
    """The folder of an arm's curated-like table (CURATED parts)."""
    return ablate_arm_dir(out_dir, arm) / CURATED.name


def ablate_arm_shards_dir(out_dir: str | Path, arm: str) -> Path:
    return ablate_arm_dir(out_dir, arm) / SHARDS.stage


def ablate_pretrain_dir(out_dir: str | Path, arm: str) -> Path:
    return ablate_arm_dir(out_dir, arm) / "pretrain"


def ablate_eval_file(out_dir: str | Path, arm: str, eval_set: str) -> Path:
    return ablate_arm_dir(out_dir, arm) / "eval" / f"{eval_set}.json"
