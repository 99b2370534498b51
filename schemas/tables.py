"""Arrow schemas of the tables between stages, and their atomic writes.

Where each table lives is `lvd.schemas.layout`'s business. Every writer goes through
`write_parquet_atomic` (or `write_json_atomic`), which writes a hidden temp file and renames it into
place, so a killed job never leaves a half file that looks whole.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

IMAGES = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),  # stable: hash of dataset + uri
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),  # path, or container path + "#" + member
        pa.field("kind", pa.string(), nullable=False),  # file | tar | parquet
        pa.field("path", pa.string(), nullable=False),  # the file, tar or parquet holding the bytes
        pa.field("member", pa.string()),  # tar member name / parquet column
        pa.field("offset", pa.int64()),  # tar: data offset in the tar; parquet: row index
        pa.field("size", pa.int64()),  # bytes of the encoded image
        pa.field("sha256", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("format", pa.string()),  # jpeg | png | webp | gif | bmp | tiff ...
        pa.field("status", pa.string(), nullable=False),  # ok | error
        pa.field("error", pa.string()),
        pa.field("note", pa.string()),  # ok rows: what was odd but usable (animated, EXIF orientation)
    ]
)


def embeddings_schema(dim: int, dtype: str = "float16") -> pa.Schema:
    """Vectors as fixed-size float lists (not Ray's tensor extension type), L2-normalised."""
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema(
        [
            pa.field("image_id", pa.int64(), nullable=False),
            pa.field("model", pa.string(), nullable=False),  # "retrieval" | "copy_detection"
            pa.field("vector", pa.list_(value, dim)),  # null when the image failed to decode
            pa.field("error", pa.string()),
        ]
    )


DEDUP = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("component_id", pa.int64(), nullable=False),  # smallest image_id in the component
        pa.field("keep", pa.bool_(), nullable=False),
        pa.field("reason", pa.string()),  # null when kept; exact | copy | eval-overlap
        pa.field("duplicate_of", pa.int64()),  # the image kept for this one's component
    ]
)

CLUSTERS = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("cluster_ids", pa.list_(pa.int32()), nullable=False),  # one per level, finest first
        pa.field("distance", pa.float32()),  # to the level-0 centroid (1 - cosine when spherical)
    ]
)

CENTROIDS = pa.schema(
    [
        pa.field("level", pa.int32(), nullable=False),
        pa.field("cluster_id", pa.int32(), nullable=False),
        pa.field("parent_id", pa.int32()),  # cluster at level + 1; null at the top level
        pa.field("size", pa.int64(), nullable=False),  # images under this cluster
        pa.field("centroid", pa.list_(pa.float32()), nullable=False),
    ]
)

RETRIEVED = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),  # pool image (seed image itself for as_is)
        pa.field("seed_set", pa.string(), nullable=False),
        pa.field("seed_id", pa.int64()),  # the seed image that retrieved it (null for cluster-based)
        pa.field("strategy", pa.string(), nullable=False),  # as_is | sample | cluster
        pa.field("rank", pa.int32()),
        pa.field("score", pa.float32()),
    ]
)

CURATED = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("sources", pa.list_(pa.string()), nullable=False),  # seed set names and/or "balanced"
        pa.field("repeats", pa.int32(), nullable=False),
    ]
)

SHARD_INDEX = pa.schema(
    [
        pa.field("shard", pa.string(), nullable=False),  # lvd-000000.tar
        pa.field("samples", pa.int64(), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
    ]
)

SHARD_SAMPLES = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("format", pa.string(), nullable=False),
        pa.field("sources", pa.list_(pa.string()), nullable=False),
        pa.field("cluster_ids", pa.list_(pa.int32())),
    ]
)


# One seed image that retrieved a pool image (a cluster-based set has no seed image: seed_id null).
RETRIEVED_BY = pa.struct(
    [
        pa.field("seed_set", pa.string()),
        pa.field("seed_id", pa.int64()),
        pa.field("strategy", pa.string()),
        pa.field("rank", pa.int32()),
        pa.field("score", pa.float32()),
    ]
)

# The story of every pool image: where it ended, why, and the evidence of each stage's decision.
DECISIONS = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("outcome", pa.string(), nullable=False),  # in output | dropped
        pa.field("stage", pa.string(), nullable=False),  # the stage that decided the outcome
        pa.field("reason", pa.string(), nullable=False),  # short code: error, exact, copy, not drawn, ...
        # status after each stage
        pa.field("ingest", pa.string(), nullable=False),  # ok | error
        pa.field("ingest_error", pa.string()),
        pa.field("embedded", pa.bool_(), nullable=False),  # has a copy-detection vector
        pa.field("dedup", pa.string()),  # kept | exact | copy | eval-overlap; null when not deduped
        pa.field("component_id", pa.int64()),
        pa.field("duplicate_of", pa.int64()),  # the image it lost to
        pa.field("duplicate_cosine", pa.float32()),  # copy-detection cosine to duplicate_of
        pa.field("eval_match", pa.int64()),  # nearest eval image (eval-overlap images only)
        pa.field("eval_cosine", pa.float32()),
        pa.field("cluster_ids", pa.list_(pa.int32())),  # one per level, finest first
        pa.field("cluster_distance", pa.float32()),  # to its level-0 centroid
        pa.field("retrieved_by", pa.list_(RETRIEVED_BY)),
        pa.field("draw", pa.float64()),  # the keyed draw of the balanced sample's leaf pick
        pa.field("sources", pa.list_(pa.string())),  # curated: seed sets and/or "balanced"
        pa.field("repeats", pa.int32(), nullable=False),  # samples in the output (0: not curated)
        pa.field("shard", pa.string()),
        pa.field("keys", pa.list_(pa.string())),  # its samples' keys in the shards
    ]
)


class SchemaMismatch(ValueError):
    pass


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Cast `table` to `schema` (same column names, castable types, no nulls in non-null fields)."""
    missing = [n for n in schema.names if n not in table.column_names]
    extra = [n for n in table.column_names if n not in schema.names]
    if missing or extra:
        raise SchemaMismatch(f"columns differ from schema: missing {missing}, unexpected {extra}")
    table = table.select(schema.names)
    for field in schema:
        if not field.nullable and table.column(field.name).null_count:
            raise SchemaMismatch(f"column {field.name!r} must not hold nulls")
    try:
        return table.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise SchemaMismatch(f"table does not cast to schema: {err}") from None


def write_parquet_atomic(table: pa.Table, path: str | Path, schema: pa.Schema) -> pa.Table:
    """Validate against `schema`, write to a temp name beside `path`, then rename into place."""
    from lvd.schemas.layout import temp_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = conform(table, schema)
    tmp = temp_path(path)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise naming_error(err, path) from err
    finally:
        tmp.unlink(missing_ok=True)
    return table


def write_json_atomic(path: str | Path, data: dict) -> None:
    from lvd.schemas.layout import temp_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        os.replace(tmp, path)
    except OSError as err:
        raise naming_error(err, path) from err
    finally:
        tmp.unlink(missing_ok=True)


def naming_error(err: OSError, path: str | Path) -> OSError:
    """`err` (a full or read-only disk, say) as an OSError naming the file being written: the error of
    the temp file or of Arrow's writer names a hidden temp name or no file at all."""
    reason = err.strerror or str(err) or type(err).__name__
    return OSError(
        err.errno, reason, str(path)
    )  # with an errno, OSError picks the subclass (PermissionError, ...)


def read_parts(
    parts: list[Path] | list[str], schema: pa.Schema | None = None, columns: list[str] | None = None
) -> pa.Table:
    """Part files as one table; with no parts, `schema`'s empty table (an error without a schema)."""
    if not parts:
        if schema is None:
            raise FileNotFoundError("no parquet parts to read")
        empty = schema.empty_table()
        return empty.select(columns) if columns else empty
    tables = [pq.read_table(p, columns=columns) for p in parts]
    return pa.concat_tables(tables, promote_options="default")


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
