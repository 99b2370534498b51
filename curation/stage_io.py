"""Whole tables as numpy (images of a dataset, vectors of ids, the kept pool): the in-memory references
that tests and tools compare the stages' per-part passes with. Stages never read whole tables: they hand
parts to workers (ARCHITECTURE.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from lvd.curation.knn import normalize
from lvd.schemas.layout import COPY_DETECTION, RETRIEVAL
from lvd.schemas.tables import DEDUP, IMAGES, read_parts


def load_images(image_parts: list[Path], dataset: str, columns: list[str]) -> pa.Table:
    """Images of one dataset ("pool", "seed:NAME", "eval:NAME") with status ok, sorted by image_id."""
    cols = sorted({"image_id", "dataset", "status", *columns})
    table = read_parts(image_parts, IMAGES, columns=cols)
    mask = pc.and_(pc.equal(table["dataset"], dataset), pc.equal(table["status"], "ok"))
    table = table.filter(mask).select(["image_id", *[c for c in columns if c != "image_id"]])
    return table.sort_by("image_id")


def load_vectors(embed_parts: list[Path], model: str, image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of the `image_ids` that have a `model` vector, sorted by id, vectors L2-normalised
    float32. `embed_parts`: that model's parts. Failed embeds (null vectors) are left out."""
    wanted = pa.array(np.asarray(image_ids, dtype=np.int64))
    flt = (ds.field("model") == model) & ds.field("vector").is_valid() & ds.field("image_id").isin(wanted)
    # Part by part: parts of different models hold vectors of different sizes.
    tables = [
        t
        for f in embed_parts
        if (
            t := ds.dataset(f, format="parquet").to_table(columns=["image_id", "vector"], filter=flt)
        ).num_rows
    ]
    if not tables or len(image_ids) == 0:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    if len({t.schema.field("vector").type.list_size for t in tables}) > 1:
        raise ValueError(f"embeddings: {model!r} vectors of different sizes")
    table = pa.concat_tables(tables, promote_options="permissive")
    table = table.sort_by("image_id")
    ids = table["image_id"].to_numpy()
    if np.unique(ids).size != ids.size:
        raise ValueError(f"embeddings hold several {model!r} vectors for one image")
    vec = table["vector"].combine_chunks()
    dim = vec.type.list_size
    flat = vec.flatten().to_numpy(zero_copy_only=False)
    return ids, normalize(flat.reshape(-1, dim))


def copy_detection_model(spec) -> str:
    """Dedup embeddings: the copy-detection model's, or the retrieval model's when the spec sets
    copy_detection to null."""
    return COPY_DETECTION if spec.embedding.copy_detection is not None else RETRIEVAL


def detector_name(spec) -> str:
    """Which copy detector dedup compares with, for logs, summaries and the README's wording."""
    model = spec.embedding.copy_detection
    if model is None:
        r = spec.embedding.retrieval
        weights = Path(r.weights).name if r.weights else "random init"
        return f"retrieval model {r.arch} ({weights}), copy_detection set to null"
    if model.arch == "copy_descriptor":
        return "copy_descriptor (built-in, no learned weights)"
    return f"{model.arch} ({Path(model.weights).name if model.weights else 'random init'})"


def kept_pool_ids(dedup_parts: list[Path]) -> np.ndarray:
    """Pool images the dedup stage kept, sorted."""
    table = read_parts(dedup_parts, DEDUP, columns=["image_id", "keep"])
    return np.sort(table.filter(table["keep"])["image_id"].to_numpy())
