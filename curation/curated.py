"""The curated set's rows: the balanced sample's and the retrieved ones, merged by image id.

An image may be drawn by the balanced sample and retrieved by several seed sets, from different
parts. Workers write each candidate row (image_id, source, repeats) into the bucket of its id, a
range of the id space, so one worker merges one bucket: one CURATED row per image, its sources
sorted and deduplicated, its repeats the largest of its rows (retrieval adds an image once, it
does not add copies). Buckets are ranges, not hashes, so the parts in bucket order are sorted by
image_id like one whole table.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lvd.schemas.tables import CURATED

ROWS_PER_BUCKET = 1_000_000
BALANCED = "balanced"  # the source name of the balanced sample

CANDIDATES = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # a seed set, or BALANCED
        pa.field("repeats", pa.int32(), nullable=False),
        pa.field("retrieved", pa.bool_(), nullable=False),  # from a seed set (not the balanced sample)
    ]
)


def bucket_bounds(lo: int, hi: int, buckets: int) -> np.ndarray:
    """Splits of the id range [lo, hi] into `buckets` ranges of equal width (image ids are hashes,
    so equal widths hold about equal rows): bucket b holds bounds[b-1] <= id < bounds[b]."""
    lo, hi = int(lo), int(hi)
    width = hi - lo + 1
    return np.array([lo + width * b // buckets for b in range(1, buckets)], dtype=np.int64)


def bucket_of(ids: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    return np.searchsorted(bounds, np.asarray(ids, dtype=np.int64), side="right")


def candidates(ids: np.ndarray, source: str | pa.Array, repeats: np.ndarray, retrieved: bool) -> pa.Table:
    n = len(ids)
    src = pa.array([source] * n, pa.string()) if isinstance(source, str) else source
    return pa.table(
        {
            "image_id": pa.array(np.asarray(ids, dtype=np.int64)),
            "source": src,
            "repeats": pa.array(np.asarray(repeats, dtype=np.int32)),
            "retrieved": pa.array(np.full(n, retrieved)),
        },
        schema=CANDIDATES,
    )


def split_by_bucket(table: pa.Table, bounds: np.ndarray) -> dict[int, pa.Table]:
    """A worker's candidate rows, by bucket (buckets without rows left out)."""
    if table.num_rows == 0:
        return {}
    bucket = bucket_of(table["image_id"].to_numpy(), bounds)
    order = np.argsort(bucket, kind="stable")
    table, bucket = table.take(pa.array(order)), bucket[order]
    starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
    ends = np.r_[starts[1:], bucket.size]
    return {int(bucket[a]): table.slice(a, b - a) for a, b in zip(starts, ends, strict=True)}


def merge_candidates(table: pa.Table) -> tuple[pa.Table, int]:
    """One bucket's candidate rows -> its CURATED rows (sorted by image_id), and how many of them
    were retrieved by a seed set."""
    if table.num_rows == 0:
        return CURATED.empty_table(), 0
    t = table.sort_by([("image_id", "ascending"), ("source", "ascending")])
    ids = t["image_id"].to_numpy()
    src = t["source"].combine_chunks()
    new_id = np.r_[True, ids[1:] != ids[:-1]]
    same_source = pc.equal(src.slice(1), src.slice(0, len(src) - 1)).to_numpy(zero_copy_only=False)
    new_source = new_id | np.r_[False, ~same_source]
    starts = np.flatnonzero(new_id)
    sources_per_id = np.add.reduceat(new_source.astype(np.int32), starts)
    offsets = np.r_[0, np.cumsum(sources_per_id)].astype(np.int32)
    repeats = np.maximum.reduceat(t["repeats"].to_numpy(), starts)
    retrieved = np.logical_or.reduceat(t["retrieved"].to_numpy(zero_copy_only=False), starts)
    curated = pa.table(
        {
            "image_id": pa.array(ids[starts]),
            "sources": pa.ListArray.from_arrays(pa.array(offsets), src.filter(pa.array(new_source))),
            "repeats": pa.array(repeats, pa.int32()),
        },
        schema=CURATED,
    )
    return curated, int(retrieved.sum())
