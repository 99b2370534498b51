"""What the embed stage's workers do, as plain functions and one actor class.

A CPU task reads an ingest part's ok rows (`read_part_rows`) and another reads and decodes each image
once for every model (`decode_batch`); a model actor (`EmbedActor`) embeds a decoded batch and writes
the vectors itself, one chunk file per ingest part in the batch (`write_chunks`), returning only
counts. Once every ok row of a part is in its chunks, a task merges them into the part's final files
(`finalize_part`): one per model, rows sorted by image_id, failed decodes as null vectors with their
error. `lvd.jobs.stages.embed` wires these into the Ray Data pipeline.

Chunks are named by the part and the rows they hold, so a retried batch overwrites its own chunk;
the merge keeps one row per position in the part and checks that every position is there.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lvd.curation.image_io import read_image_bytes
from lvd.embeddings.cpu_threads import wait_with
from lvd.embeddings.preprocess import (
    ImageDecodeError,
    PreprocessConfig,
    decode_image,
    resize_center_crop,
    to_rgb,
)
from lvd.embeddings.store import embeddings_table, part_counts, vector_dtype
from lvd.schemas import layout
from lvd.schemas.job_spec import ModelSpec
from lvd.schemas.tables import embeddings_schema, write_parquet_atomic

# What decoding needs of an `images` row: where its bytes are.
ROW_COLUMNS = ["image_id", "kind", "path", "member", "offset", "size"]
# Columns every row carries through the pipeline: which part, its place in the part's ok rows
# (`row`) and how many ok rows the part has (`part_rows`), so any worker knows when a part is whole.
TAG_COLUMNS = ["image_id", "part", "row", "part_rows"]
# What a model actor returns per (batch, part): counts only, never a vector.
RESULT_COLUMNS = ["part", "rows", "part_rows", "errors", "reads"]


# ---------------------------------------------------------------- reading an ingest part


def ok_rows(ingest_file: str | Path) -> pa.Table:
    """The ok rows of one part of the `images` table, in file order, ROW_COLUMNS only."""
    t = pq.read_table(ingest_file, columns=[*ROW_COLUMNS, "status"])
    return t.filter(pc.equal(t.column("status"), "ok")).select(ROW_COLUMNS)


def read_part_rows(batch: pa.Table) -> pa.Table:
    """Ingest parts (columns `part`, `file`) -> their ok rows, tagged with TAG_COLUMNS."""
    tables = []
    for index, file in zip(batch.column("part").to_pylist(), batch.column("file").to_pylist(), strict=True):
        t = ok_rows(file)
        n = t.num_rows
        t = t.append_column("part", pa.array(np.full(n, index, dtype=np.int64)))
        t = t.append_column("row", pa.array(np.arange(n, dtype=np.int64)))
        tables.append(t.append_column("part_rows", pa.array(np.full(n, n, dtype=np.int64))))
    return pa.concat_tables(tables)


# ---------------------------------------------------------------- decoding


def preprocess_keys(models: dict[str, ModelSpec]) -> tuple[dict[str, PreprocessConfig], dict[str, str]]:
    """Distinct preprocessing configs (models with equal sizes share one crop) and model -> key."""
    configs: dict[str, PreprocessConfig] = {}
    key_of: dict[str, str] = {}
    for name, m in models.items():
        # Patch size of a TorchScript model is unknown (the copy descriptor has none): crop to image_size.
        patch = 1 if m.arch in ("torchscript", "copy_descriptor") else m.patch_size
        cfg = PreprocessConfig(m.resize_size, m.image_size, patch, whole=m.arch == "copy_descriptor")
        key = next((k for k, c in configs.items() if c == cfg), str(len(configs)))
        configs[key] = cfg
        key_of[name] = key
    return configs, key_of


def decode_batch(
    batch: dict[str, np.ndarray],
    preprocess: dict[str, PreprocessConfig],
    read_bytes: Callable[..., bytes] = read_image_bytes,
) -> dict[str, np.ndarray]:
    """Read and decode each image once, and crop it for every distinct preprocessing in `preprocess`.

    Output: TAG_COLUMNS, error ("" when fine), reads (1 per image: the number of times its bytes were
    read), and one uint8 [B, S, S, 3] column `pixels_<key>` per preprocessing key. Failed rows get zeros.
    """
    n = len(batch["image_id"])
    crops = {k: np.zeros((n, c.crop_size, c.crop_size, 3), np.uint8) for k, c in preprocess.items()}
    errors = np.full(n, "", dtype=object)
    for i in range(n):
        try:
            data = read_bytes(
                str(batch["kind"][i]),
                str(batch["path"][i]),
                None if batch["member"][i] is None else str(batch["member"][i]),
                None if _isnull(batch["offset"][i]) else int(batch["offset"][i]),
                None if _isnull(batch["size"][i]) else int(batch["size"][i]),
            )
            rgb = to_rgb(decode_image(data))
            for k, cfg in preprocess.items():
                crops[k][i] = resize_center_crop(rgb, cfg)
        except ImageDecodeError as err:
            errors[i] = str(err)
        except Exception as err:  # noqa: BLE001 - unreadable file, odd mode: recorded, not fatal
            errors[i] = f"{type(err).__name__}: {err}"
    out = {k: batch[k] for k in TAG_COLUMNS}
    out.update(error=errors, reads=np.ones(n, np.int64))
    out.update({f"pixels_{k}": v for k, v in crops.items()})
    return out


def decode_memory_bytes(max_pixels: int) -> int:
    """Memory a decode task asks for: the largest image ingest lets through, RGB plus a converted copy."""
    return 2 * 3 * max_pixels + (64 << 20)


def _isnull(v) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v))


# ---------------------------------------------------------------- chunks of vectors


def chunk_schema(dims: dict[str, int], dtypes: dict[str, str]) -> pa.Schema:
    """A chunk: TAG_COLUMNS' identity columns, the decode error, one vector column per model."""
    fields = [
        pa.field("row", pa.int64(), nullable=False),
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("error", pa.string()),
    ]
    for name, dim in dims.items():
        value = pa.from_numpy_dtype(vector_dtype(dtypes[name]))
        fields.append(pa.field(f"vector_{name}", pa.list_(value, dim), nullable=False))
    return pa.schema(fields)


def write_chunks(
    batch: dict[str, np.ndarray],
    vectors: dict[str, np.ndarray],
    chunk_root: str | Path,
    dtypes: dict[str, str],
) -> dict[str, np.ndarray]:
    """Write a batch's vectors as one chunk per ingest part it holds; return counts per part.

    `batch` has TAG_COLUMNS, `error` and `reads`; `vectors[model]` is float [B, D] (zeros where the
    decode failed). Vectors are stored in the model's table dtype, so the merge casts nothing.
    """
    dims = {name: v.shape[1] for name, v in vectors.items()}
    schema = chunk_schema(dims, dtypes)
    parts = np.asarray(batch["part"], dtype=np.int64)
    out: dict[str, list[int]] = {k: [] for k in RESULT_COLUMNS}
    for part in np.unique(parts):
        sel = np.flatnonzero(parts == part)
        rows = np.asarray(batch["row"], dtype=np.int64)[sel]
        errors = [e if e else None for e in batch["error"][sel]]
        cols = {
            "row": pa.array(rows),
            "image_id": pa.array(np.asarray(batch["image_id"], dtype=np.int64)[sel]),
            "error": pa.array(errors, pa.string()),
        }
        for name, v in vectors.items():
            values = np.ascontiguousarray(v[sel], dtype=vector_dtype(dtypes[name])).reshape(-1)
            cols[f"vector_{name}"] = pa.FixedSizeListArray.from_arrays(pa.array(values), dims[name])
        path = layout.embed_chunk_path(chunk_root, int(part), int(rows.min()), len(sel))
        write_parquet_atomic(pa.table(cols), path, schema)
        out["part"].append(int(part))
        out["rows"].append(len(sel))
        out["part_rows"].append(int(batch["part_rows"][sel[0]]))
        out["errors"].append(sum(e is not None for e in errors))
        out["reads"].append(int(np.asarray(batch["reads"])[sel].sum()))
    return {k: np.asarray(v, dtype=np.int64) for k, v in out.items()}


class EmbedActor:
    """One replica of every model: embeds decoded crops and writes them as chunks (see write_chunks)."""

    def __init__(
        self,
        models: dict[str, dict],
        pixel_key: dict[str, str],
        cpu_threads: int,
        chunk_root: str,
        omp_wait_policy: str | None = None,
    ) -> None:
        if omp_wait_policy is not None:
            # Before torch loads in this actor process (embeddings/cpu_threads.py).
            wait_with(omp_wait_policy)
        import torch

        from lvd.embeddings.models import load_embedding_model

        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, cpu_threads))
        specs = {name: ModelSpec(**m) for name, m in models.items()}
        self.models = {name: load_embedding_model(s) for name, s in specs.items()}
        self.dtypes = {name: s.dtype for name, s in specs.items()}
        self.pixel_key = pixel_key
        self.chunk_root = chunk_root

    def embed(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """L2-normalised float32 [B, D] per model; zeros for rows whose decode failed."""
        ok = np.array([e == "" for e in batch["error"]], dtype=bool)
        out = {}
        for name, model in self.models.items():
            vecs = np.zeros((len(ok), model.dim), np.float32)
            if ok.any():
                vecs[ok] = model.embed_uint8(batch[f"pixels_{self.pixel_key[name]}"][ok])
            out[name] = vecs
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return write_chunks(batch, self.embed(batch), self.chunk_root, self.dtypes)


# ---------------------------------------------------------------- a part's final files


def finalize_part(
    item: tuple[int, str],
    *,
    stage_dir: str,
    chunk_root: str,
    dtypes: dict[str, str],
    dims: dict[str, int],
) -> dict[str, int]:
    """Merge part `item = (index, ingest file)`'s chunks into its final file per model; remove the chunks.

    Rows are sorted by (image_id, row); a failed decode becomes a null vector with its error. A part
    without ok rows gets empty files, so a resumed run sees it done. Raises when a row is missing.
    Returns {"part", "rows", "errors"}.
    """
    part, ingest_file = item
    chunks = layout.list_embed_chunks(chunk_root, part)
    finals = [layout.part_path(stage_dir, part, name) for name in dtypes]
    if all(f.exists() for f in finals):  # a retry of a task that died after writing them
        _remove(chunks)
        rows, errors = part_counts(finals[0])
        return {"part": part, "rows": rows, "errors": errors}
    expected = ok_rows(ingest_file).num_rows
    schema = chunk_schema(dims, dtypes)
    table = pa.concat_tables([pq.read_table(c, schema=schema) for c in chunks]) if chunks else None
    rows = table.column("row").to_numpy() if table is not None else np.zeros(0, np.int64)
    # A retried batch may have left its rows in two chunks: keep one copy of each row.
    unique, first = np.unique(rows, return_index=True)
    if len(unique) != expected or (expected and (unique[0] != 0 or unique[-1] != expected - 1)):
        raise RuntimeError(
            f"embed part {part}: {len(unique)} of its {expected} ok rows were embedded ({ingest_file})"
        )
    errors_total = 0
    if expected:
        table = table.take(pa.array(first))
        ids = table.column("image_id").to_numpy()
        order = np.lexsort((table.column("row").to_numpy(), ids))
        table = table.take(pa.array(order))
        errors = table.column("error").to_pylist()
        errors_total = sum(e is not None for e in errors)
    for name, dtype in dtypes.items():
        if expected:
            col = table.column(f"vector_{name}").combine_chunks()
            vecs = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dims[name])
            out = embeddings_table(table.column("image_id").to_numpy(), vecs, errors, name, dtype)
        else:
            out = embeddings_schema(dims[name], dtype).empty_table()
        write_parquet_atomic(out, layout.part_path(stage_dir, part, name), out.schema)
    _remove(chunks)
    return {"part": part, "rows": expected, "errors": errors_total}


def _remove(chunks: list[Path]) -> None:
    """Chunks of a part whose final files are written: they would only fill the disk."""
    for c in chunks:
        c.unlink(missing_ok=True)
    if chunks:
        try:
            chunks[0].parent.rmdir()
        except OSError:  # not empty (a temp file of a retried write) or gone: the stage's cleanup ends it
            pass
