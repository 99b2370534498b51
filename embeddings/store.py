"""The `embeddings` table's rows: one parquet file per ingest part and model (names in
`lvd.schemas.layout`). Models of different widths cannot share one fixed-size-list column, hence a
file per model; every file still has the `model` column.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lvd.schemas.layout import RETRIEVAL, list_parts
from lvd.schemas.tables import embeddings_schema


def vector_dtype(dtype: str) -> type[np.floating]:
    """The numpy type vectors of a model are stored in ("float16" | "float32" in the model spec)."""
    return np.float16 if dtype == "float16" else np.float32


def part_counts(path: str | Path) -> tuple[int, int]:
    """(rows, rows with an error) of one embeddings part, from its footer when it has statistics."""
    meta = pq.read_metadata(path)
    column = meta.schema.names.index("error")
    errors = 0
    for rg in range(meta.num_row_groups):
        stats = meta.row_group(rg).column(column).statistics
        if stats is None or not stats.has_null_count:
            err = pq.read_table(path, columns=["error"]).column("error")
            return len(err), len(err) - err.null_count
        errors += meta.row_group(rg).num_rows - stats.null_count
    return meta.num_rows, errors


def embeddings_table(
    image_ids: np.ndarray, vectors: np.ndarray, errors: list[str | None], model: str, dtype: str = "float16"
) -> pa.Table:
    """Rows for one model; a row whose error is set gets a null vector."""
    n, dim = vectors.shape
    if len(image_ids) != n or len(errors) != n:
        raise ValueError(f"{len(image_ids)} ids, {n} vectors and {len(errors)} errors")
    np_dtype = vector_dtype(dtype)
    failed = np.array([e is not None for e in errors], dtype=bool)
    values = pa.array(np.ascontiguousarray(vectors, dtype=np_dtype).reshape(-1))
    column = pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(failed))
    table = pa.table(
        {
            "image_id": pa.array(np.asarray(image_ids, dtype=np.int64)),
            "model": pa.array([model] * n, pa.string()),
            "vector": column,
            "error": pa.array(errors, pa.string()),
        }
    )
    return table.cast(embeddings_schema(dim, dtype))


def vectors_of(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(image_ids int64 [N], vectors float32 [N, D]) of the rows that have a vector."""
    col = table.column("vector").combine_chunks()
    dim = col.type.list_size
    valid = col.is_valid().to_numpy(zero_copy_only=False)
    # .values keeps null rows' slots, so the reshape lines up with the rows.
    vecs = col.values.to_numpy(zero_copy_only=False).reshape(-1, dim)[valid].astype(np.float32)
    ids = table.column("image_id").to_numpy()[valid]
    return ids, vecs


def read_embeddings(
    embed_dir: str | Path, model: str = RETRIEVAL, fallback_to_retrieval: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """All vectors of `model` as (image_ids, float32 [N, D]); rows that failed to decode are left out.

    With no copy-detection table (the spec named none) the retrieval vectors stand in for it.
    """
    parts = list_parts(embed_dir, model)
    if not parts and model != RETRIEVAL and fallback_to_retrieval:
        parts = list_parts(embed_dir, RETRIEVAL)
    if not parts:
        raise FileNotFoundError(f"no embeddings for model {model!r} in {embed_dir}")
    ids, vecs = zip(
        *(vectors_of(pq.read_table(p, columns=["image_id", "vector"])) for p in parts), strict=True
    )
    return np.concatenate(ids), np.concatenate(vecs)
