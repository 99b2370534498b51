"""Reading the inputs of the curation stages (images, embeddings) as numpy, and writing their parts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from curation.knn import normalize
from schemas.tables import DEDUP, part_path, read_parts, write_parquet_atomic

ROWS_PER_PART = 1_000_000


def _parts(stage_dir: Path) -> list[str]:
    return [str(p) for p in sorted(Path(stage_dir).glob("part-*.parquet"))]


def load_images(ingest_dir: Path, dataset: str, columns: list[str]) -> pa.Table:
    """Images of one dataset ("pool", "seed:NAME", "eval:NAME") with status ok, sorted by image_id."""
    cols = sorted({"image_id", "dataset", "status", *columns})
    table = read_parts(ingest_dir, columns=cols)
    mask = pc.and_(pc.equal(table["dataset"], dataset), pc.equal(table["status"], "ok"))
    table = table.filter(mask).select(["image_id", *[c for c in columns if c != "image_id"]])
    return table.sort_by("image_id")


def load_vectors(embed_dir: Path, model: str, image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of the `image_ids` that have a `model` vector, sorted by id, vectors L2-normalised
    float32. Failed embeds (null vectors) are left out."""
    wanted = pa.array(np.asarray(image_ids, dtype=np.int64))
    flt = (ds.field("model") == model) & ds.field("vector").is_valid() & ds.field("image_id").isin(wanted)
    # Part by part: parts of different models hold vectors of different sizes.
    tables = [
        t
        for f in _parts(embed_dir)
        if (
            t := ds.dataset(f, format="parquet").to_table(columns=["image_id", "vector"], filter=flt)
        ).num_rows
    ]
    if not tables or len(image_ids) == 0:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    if len({t.schema.field("vector").type.list_size for t in tables}) > 1:
        raise ValueError(f"embeddings in {embed_dir}: {model!r} vectors of different sizes")
    table = pa.concat_tables(tables, promote_options="permissive")
    table = table.sort_by("image_id")
    ids = table["image_id"].to_numpy()
    if np.unique(ids).size != ids.size:
        raise ValueError(f"embeddings in {embed_dir} hold several {model!r} vectors for one image")
    vec = table["vector"].combine_chunks()
    dim = vec.type.list_size
    flat = vec.flatten().to_numpy(zero_copy_only=False)
    return ids, normalize(flat.reshape(-1, dim))


def copy_detection_model(spec) -> str:
    """Dedup embeddings: the copy-detection model's when the spec has one, else the retrieval model's."""
    return "copy_detection" if spec.embedding.copy_detection is not None else "retrieval"


def kept_pool_ids(dedup_dir: Path) -> np.ndarray:
    """Pool images the dedup stage kept, sorted."""
    table = read_parts(dedup_dir, DEDUP, columns=["image_id", "keep"])
    return np.sort(table.filter(table["keep"])["image_id"].to_numpy())


def write_parts(
    table: pa.Table, stage_dir: Path, schema: pa.Schema, rows_per_part: int = ROWS_PER_PART
) -> int:
    """Write `table` as numbered parts (atomic each), removing parts of an earlier, larger run."""
    stage_dir = Path(stage_dir)
    count = max(1, -(-table.num_rows // rows_per_part))
    for i in range(count):
        write_parquet_atomic(table.slice(i * rows_per_part, rows_per_part), part_path(stage_dir, i), schema)
    for stale in _parts(stage_dir)[count:]:
        Path(stale).unlink()
    return count
