"""The story of every pool image: the DECISIONS table and its plain-words reading (`lvd explain`).

Each stage's decision about an image lives in that stage's table, organised its own way (ingest,
dedup and cluster parts follow the ingest parts; retrieved rows follow the seed sets; curated rows
are id-range buckets; shard rows follow the shards). The report stage joins them by image id: workers
write the columns each part knows into buckets of the image-id range (`scatter`), then one worker per
bucket joins its bucket's rows into a DECISIONS part (`merge_bucket`), as the sample stage merges
curated rows (`curation.curated`). The pieces here are plain functions over Arrow tables.

Evidence that no stage table holds is computed on the way:
- the cosine between a duplicate and the image it lost to: duplicates are bucketed by the image they
  lost to, beside that image's vector (`pair_cosines`);
- the eval image nearest an eval-overlap image and its cosine: a kNN search of those images only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lvd.curation.curated import bucket_of
from lvd.schemas import layout
from lvd.schemas.job_spec import JobSpec
from lvd.schemas.tables import DECISIONS, RETRIEVED_BY, read_parts, write_parquet_atomic

IN_OUTPUT, DROPPED = "in output", "dropped"
KEPT = "kept"

# Rows each source writes into the buckets (the key column is image_id unless named).
POOL = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("ingest", pa.string(), nullable=False),
        pa.field("ingest_error", pa.string()),
        pa.field("embedded", pa.bool_(), nullable=False),
        pa.field("dedup", pa.string()),
        pa.field("component_id", pa.int64()),
        pa.field("duplicate_of", pa.int64()),
        pa.field("cluster_ids", pa.list_(pa.int32())),
        pa.field("cluster_distance", pa.float32()),
        pa.field("draw", pa.float64()),
    ]
)
RETRIEVED_ROWS = pa.schema(
    [pa.field("image_id", pa.int64(), nullable=False), *[RETRIEVED_BY.field(i) for i in range(5)]]
)
CURATED_ROWS = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("sources", pa.list_(pa.string())),
        pa.field("repeats", pa.int32()),
    ]
)
SHARD_ROWS = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("shard", pa.string()),
        pa.field("key", pa.string()),
    ]
)
EVAL_ROWS = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("eval_match", pa.int64()),
        pa.field("eval_cosine", pa.float32()),
    ]
)
COSINE_ROWS = pa.schema(
    [pa.field("image_id", pa.int64(), nullable=False), pa.field("duplicate_cosine", pa.float32())]
)
SOURCES = {
    "pool": POOL,
    "retrieved": RETRIEVED_ROWS,
    "curated": CURATED_ROWS,
    "shard": SHARD_ROWS,
    "eval": EVAL_ROWS,
    "cosine": COSINE_ROWS,
}


def scatter(
    table: pa.Table, bounds: np.ndarray, folder: Path, writer: int, schema: pa.Schema, key: str = "image_id"
) -> int:
    """Writes `table`'s rows into the buckets of their `key` (id ranges split at `bounds`), one file
    per bucket named by `writer`, under `folder`. Returns the rows written."""
    if table.num_rows == 0:
        return 0
    bucket = bucket_of(table[key].to_numpy(), bounds)
    order = np.argsort(bucket, kind="stable")
    table, bucket = table.take(pa.array(order)), bucket[order]
    starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
    ends = np.r_[starts[1:], bucket.size]
    for a, b in zip(starts, ends, strict=True):
        out = layout.part_path(layout.bucket_dir(folder, int(bucket[a])), writer)
        write_parquet_atomic(table.slice(a, b - a), out, schema)
    return table.num_rows


def read_bucket(folder: Path, bucket: int, schema: pa.Schema) -> pa.Table:
    return read_parts(layout.list_parts(layout.bucket_dir(folder, bucket)), schema)


def pair_cosines(duplicates: pa.Table, representatives: pa.Table) -> pa.Table:
    """Cosine of each duplicate (image_id, duplicate_of, vector) to the image it lost to, whose
    vector is among `representatives` (image_id, vector); vectors are L2-normalised."""
    if duplicates.num_rows == 0 or representatives.num_rows == 0:
        return COSINE_ROWS.empty_table()
    rep_ids = representatives["image_id"].to_numpy()
    order = np.argsort(rep_ids)
    rep_ids = rep_ids[order]
    rep_vec = _matrix(representatives["vector"])[order]
    dup_of = duplicates["duplicate_of"].to_numpy()
    pos = np.minimum(np.searchsorted(rep_ids, dup_of), rep_ids.size - 1)
    found = rep_ids[pos] == dup_of
    vec = _matrix(duplicates["vector"])
    cos = np.einsum("ij,ij->i", vec[found], rep_vec[pos[found]])
    return pa.table(
        {"image_id": duplicates["image_id"].filter(pa.array(found)), "duplicate_cosine": pa.array(cos)},
        schema=COSINE_ROWS,
    )


def _matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    dim = arr.type.list_size
    return arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)


def _rows_for(ids: np.ndarray, table: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """The rows of `table` whose image_id is in `ids` (sorted, unique), sorted by image_id, and how
    many belong to each of `ids`."""
    if table.num_rows == 0:
        return table, np.zeros(ids.size, np.int64)
    table = table.filter(pc.is_in(table["image_id"], pa.array(ids))).sort_by("image_id")
    t_ids = table["image_id"].to_numpy()
    counts = np.searchsorted(t_ids, ids, side="right") - np.searchsorted(t_ids, ids, side="left")
    return table, counts


def align_to_ids(ids: np.ndarray, table: pa.Table, column: str, typ: pa.DataType) -> pa.Array:
    """`table[column]` aligned to `ids` (null where an id has no row; the first row where several)."""
    if table.num_rows == 0:
        return pa.nulls(ids.size, typ)
    t_ids = table["image_id"].to_numpy()
    order = np.argsort(t_ids, kind="stable")
    t_ids = t_ids[order]
    pos = np.minimum(np.searchsorted(t_ids, ids), t_ids.size - 1)
    found = t_ids[pos] == ids
    return table[column].combine_chunks().take(pa.array(order[pos], mask=~found)).cast(typ)


def merge_bucket(
    pool: pa.Table,
    retrieved: pa.Table,
    curated: pa.Table,
    shards: pa.Table,
    evals: pa.Table,
    cosines: pa.Table,
) -> pa.Table:
    """One bucket's rows from every source -> its DECISIONS rows (one per pool image, by image_id)."""
    pool = pool.sort_by("image_id")
    ids = pool["image_id"].to_numpy()
    n = ids.size

    rows, counts = _rows_for(ids, retrieved.sort_by([("image_id", "ascending"), ("seed_set", "ascending")]))
    offsets = pa.array(np.r_[0, np.cumsum(counts)].astype(np.int32))
    by = pa.StructArray.from_arrays(
        [rows[f.name].combine_chunks() if rows.num_rows else pa.array([], f.type) for f in RETRIEVED_BY],
        fields=list(RETRIEVED_BY),
    )
    retrieved_by = pa.ListArray.from_arrays(offsets, by)

    rows, counts = _rows_for(ids, shards.sort_by([("image_id", "ascending"), ("key", "ascending")]))
    offsets = pa.array(np.r_[0, np.cumsum(counts)].astype(np.int32))
    keys_values = rows["key"].combine_chunks() if rows.num_rows else pa.array([], pa.string())
    keys = pa.ListArray.from_arrays(offsets, keys_values, mask=pa.array(counts == 0))

    repeats = align_to_ids(ids, curated, "repeats", pa.int32()).fill_null(0)
    table = pa.table(
        {
            **{name: pool[name] for name in ("image_id", "uri", "ingest", "ingest_error", "embedded")},
            "dedup": pool["dedup"],
            "component_id": pool["component_id"],
            "duplicate_of": pool["duplicate_of"],
            "duplicate_cosine": align_to_ids(ids, cosines, "duplicate_cosine", pa.float32()),
            "eval_match": align_to_ids(ids, evals, "eval_match", pa.int64()),
            "eval_cosine": align_to_ids(ids, evals, "eval_cosine", pa.float32()),
            "cluster_ids": pool["cluster_ids"],
            "cluster_distance": pool["cluster_distance"],
            "retrieved_by": retrieved_by,
            "draw": pool["draw"],
            "sources": align_to_ids(ids, curated, "sources", pa.list_(pa.string())),
            "repeats": repeats,
            "shard": align_to_ids(ids, shards, "shard", pa.string()),
            "keys": keys,
        }
    )
    outcome, stage, reason = outcomes(table)
    table = table.append_column("outcome", pa.array(outcome, pa.string()))
    table = table.append_column("stage", pa.array(stage, pa.string()))
    table = table.append_column("reason", pa.array(reason, pa.string()))
    assert table.num_rows == n
    return table.select(DECISIONS.names)


def outcomes(table: pa.Table) -> tuple[list[str], list[str], list[str]]:
    """(outcome, deciding stage, reason) of each row: the first stage that dropped the image, or,
    for an image in the output, how it got there (balanced and/or the seed sets that retrieved it)."""
    out, stage, reason = [], [], []
    cols = table.select(["ingest", "embedded", "dedup", "sources", "repeats", "keys"]).to_pylist()
    for r in cols:
        if r["ingest"] != "ok":
            out.append(DROPPED), stage.append("ingest"), reason.append("unreadable")
        elif not r["embedded"]:
            out.append(DROPPED), stage.append("embed"), reason.append("no embedding")
        elif r["dedup"] not in (None, KEPT):
            out.append(DROPPED), stage.append("dedup"), reason.append(r["dedup"])
        elif not r["repeats"]:
            out.append(DROPPED), stage.append("sample"), reason.append("not drawn nor retrieved")
        elif not r["keys"]:
            out.append(DROPPED), stage.append("shards"), reason.append("not in the shards")
        else:
            out.append(IN_OUTPUT), stage.append("shards"), reason.append("+".join(r["sources"] or []))
    return out, stage, reason


# ---------------------------------------------------------------- plain words


def _cos(x: float | None) -> str:
    return "?" if x is None else f"{x:.3f}"


def story(row: dict, uri_of: dict[int, str] | None = None, spec: JobSpec | None = None) -> str:
    """A DECISIONS row told in plain words, a line per stage. `uri_of`: the uris of the other images
    the story names (the duplicate kept instead, the seed images); `spec`: the job's spec (thresholds)."""
    uri_of = uri_of or {}
    threshold = spec.dedup.threshold if spec else None
    eval_threshold = spec.dedup.eval_threshold if spec else None
    seed_sets = {s.name: s for s in spec.seeds} if spec else {}

    def name(image_id: int | None) -> str:
        if image_id is None:
            return "?"
        uri = uri_of.get(image_id)
        return f"image {image_id}" + (f" ({uri})" if uri else "")

    lines = [f"image {row['image_id']}: {row['uri']}"]
    verdict = "IN THE OUTPUT" if row["outcome"] == IN_OUTPUT else f"DROPPED at {row['stage']}"
    lines.append(f"  outcome: {verdict} ({row['reason']})")
    if row["ingest"] != "ok":
        lines.append(f"  ingest: could not be read: {row['ingest_error'] or 'no reason recorded'}")
        return "\n".join(lines)
    lines.append("  ingest: read and decoded")
    if not row["embedded"]:
        lines.append("  embed: no copy-detection vector (the image failed to decode or embed)")
        return "\n".join(lines)
    lines.append("  embed: embedded")
    dedup, cos = row["dedup"], row["duplicate_cosine"]
    at = f" (threshold {threshold})" if threshold is not None else ""
    if dedup == "exact":
        lines.append(
            f"  dedup: an exact copy (same bytes) of {name(row['duplicate_of'])}, which was kept; "
            f"cosine {_cos(cos)}"
        )
    elif dedup == "copy":
        lines.append(
            f"  dedup: a near-duplicate of {name(row['duplicate_of'])}, which was kept instead; "
            f"copy-detection cosine {_cos(cos)}{at}"
        )
    elif dedup == "eval-overlap":
        match, ecos = row["eval_match"], row["eval_cosine"]
        if match is not None and (eval_threshold is None or (ecos is not None and ecos > eval_threshold)):
            limit = f" (eval threshold {eval_threshold})" if eval_threshold is not None else ""
            lines.append(
                f"  dedup: overlaps the eval sets: it matches eval {name(match)}, cosine {_cos(ecos)}{limit}; "
                "its whole duplicate group is dropped"
            )
        else:
            nearest = (
                f"; its nearest eval image is {name(match)}, cosine {_cos(ecos)}" if match is not None else ""
            )
            lines.append(
                "  dedup: overlaps the eval sets: an image of its duplicate group matches an eval image, so the "
                f"whole group is dropped{nearest}"
            )
    else:
        lines.append("  dedup: kept (no duplicate above the threshold, or the one kept of its group)")
    if dedup not in (None, KEPT):
        return "\n".join(lines)
    if row["cluster_ids"]:
        path = " > ".join(f"level {lv}: {c}" for lv, c in reversed(list(enumerate(row["cluster_ids"]))))
        dist = row["cluster_distance"]
        lines.append(f"  cluster: {path}; distance to its level-0 centroid {_cos(dist)}")
    for r in row["retrieved_by"] or []:
        if r["strategy"] == "sample":
            lines.append(
                f"  retrieve: seed set {r['seed_set']!r}: neighbour #{r['rank'] + 1} of seed "
                f"{name(r['seed_id'])}, cosine {_cos(r['score'])}"
            )
        elif r["strategy"] == "cluster":
            seed = seed_sets.get(r["seed_set"])
            where = "a cluster"
            if seed is not None and seed.num_clusters is None and row["cluster_ids"]:
                where = f"level-0 cluster {row['cluster_ids'][0]}"
            why = (
                f"more than {seed.min_seed_images} of its seed images"
                if seed is not None
                else "its seed images"
            )
            lines.append(
                f"  retrieve: seed set {r['seed_set']!r}: a member of {where}, chosen because it holds {why}; "
                f"#{r['rank'] + 1} nearest its centroid, cosine {_cos(r['score'])}"
            )
        else:
            lines.append(f"  retrieve: seed set {r['seed_set']!r} taken as is")
    if not row["retrieved_by"]:
        lines.append("  retrieve: no seed set retrieved it")
    sources = row["sources"] or []
    if row["repeats"]:
        how = []
        if "balanced" in sources:
            how.append(f"drawn by the balanced sample (leaf draw {_cos(row['draw'])})")
        seeds = [s for s in sources if s != "balanced"]
        if seeds:
            how.append("retrieved by " + ", ".join(seeds))
        lines.append(f"  sample: curated, {' and '.join(how)}; {row['repeats']} sample(s) in the output")
    else:
        lines.append(
            f"  sample: not drawn by the balanced sample (its leaf draw {_cos(row['draw'])} did not make its "
            "leaf's budget) and not retrieved by a seed set"
        )
        return "\n".join(lines)
    if row["keys"]:
        lines.append(f"  shards: in {row['shard']} as key(s) {', '.join(row['keys'])}")
    else:
        lines.append("  shards: missing from the shards")
    return "\n".join(lines)


def referenced_ids(row: dict) -> list[int]:
    """The other images a row's story names."""
    ids = [row["duplicate_of"], row["eval_match"]]
    ids += [r["seed_id"] for r in row["retrieved_by"] or []]
    return [i for i in ids if i is not None]


def find_rows(parts: Sequence[Path], image_ids: Sequence[int] = (), uri: str | None = None) -> list[dict]:
    """DECISIONS rows by image id or uri, read from the parts with a filter (never the whole table)."""
    import pyarrow.dataset as ds

    if not parts:
        return []
    flt = pc.field("image_id").isin(list(image_ids)) if image_ids else pc.field("uri") == uri
    return (
        ds.dataset([str(p) for p in parts], format="parquet", schema=DECISIONS)
        .to_table(filter=flt)
        .to_pylist()
    )
