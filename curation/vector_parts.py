"""One worker's share of a vector set: an embedding part of one model, restricted to the images the
dedup stage kept, read by the worker that handles it (the driver only lists the parts).

Which dedup part says which of a part's images are kept: the embed and dedup stages both write one
part per ingest part (same part number), so a worker reads the dedup part of its own number. When
the numbers do not line up (a dedup table written in parts of its own size), every worker reads the
`keep` column of every dedup part, filtered to its own images: correct, but it grows with the
number of parts, so `check_kept_alignment` tells the driver which case it is in.

Also the scratch label parts of a k-means assignment pass (image_id, label, distance per point).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from lvd.curation.knn import normalize
from lvd.schemas.layout import part_index
from lvd.schemas.tables import write_parquet_atomic

LABELS = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("label", pa.int64(), nullable=False),
        pa.field("distance", pa.float32(), nullable=False),
    ]
)


@dataclass(frozen=True)
class VectorPart:
    """An embedding part of `model` and the dedup parts whose `keep` selects its images (None: every
    image of the part that has a vector)."""

    index: int  # the part number, which the parts this one's worker writes carry too
    path: str
    model: str
    kept_from: tuple[str, ...] | None = None
    by_number: bool = False  # kept_from is the dedup part of the same number (to be checked)


def plan_vector_parts(
    embed_parts: list[Path], model: str, dedup_parts: list[Path] | None, *, aligned: bool = True
) -> list[VectorPart]:
    """The parts of a kept pool: with `aligned`, each embed part with the dedup part of its number
    when both tables have the same part numbers; otherwise every dedup part for each."""
    if dedup_parts is None:
        return [VectorPart(part_index(p), str(p), model) for p in embed_parts]
    by_index = {part_index(p): str(p) for p in dedup_parts}
    same = aligned and set(by_index) == {part_index(p) for p in embed_parts}
    every = tuple(str(p) for p in dedup_parts)
    return [
        VectorPart(part_index(p), str(p), model, (by_index[part_index(p)],), True)
        if same
        else VectorPart(part_index(p), str(p), model, every)
        for p in embed_parts
    ]


def unaligned(parts: list[VectorPart], dedup_parts: list[Path]) -> list[VectorPart]:
    """The same parts, each reading every dedup part."""
    every = tuple(str(p) for p in dedup_parts)
    return [replace(p, kept_from=every, by_number=False) for p in parts]


def _part_table(part: VectorPart) -> pa.Table:
    flt = (ds.field("model") == part.model) & ds.field("vector").is_valid()
    return ds.dataset(part.path, format="parquet").to_table(columns=["image_id", "vector"], filter=flt)


def _kept_mask(part: VectorPart, ids: np.ndarray) -> np.ndarray:
    if part.kept_from is None:
        return np.ones(ids.size, dtype=bool)
    wanted = pa.array(ids)
    flt = ds.field("keep") & ds.field("image_id").isin(wanted)
    kept = [
        ds.dataset(p, format="parquet").to_table(columns=["image_id"], filter=flt)["image_id"].to_numpy()
        for p in part.kept_from
    ]
    return np.isin(ids, np.concatenate([np.zeros(0, np.int64), *kept]))


def read_part_vectors(part: VectorPart) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of the part's kept images with a vector, sorted by id, vectors L2-normalised
    float32 (as `stage_io.load_vectors` reads the whole set)."""
    table = _part_table(part)
    if table.num_rows == 0:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    ids = table["image_id"].to_numpy()
    keep = _kept_mask(part, ids)
    table = table.filter(pa.array(keep)).sort_by("image_id")
    ids = table["image_id"].to_numpy()
    if np.unique(ids).size != ids.size:
        raise ValueError(f"embeddings hold several {part.model!r} vectors for one image in {part.path}")
    vec = table["vector"].combine_chunks()
    dim = vec.type.list_size
    return ids, normalize(vec.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim))


def count_part_vectors(part: VectorPart) -> int:
    """Kept images of the part that have a vector."""
    ids = _part_table(part)["image_id"].to_numpy()
    return int(_kept_mask(part, ids).sum())


def check_kept_alignment(part: VectorPart) -> bool:
    """For a part that reads the dedup part of its own number: True when that dedup part holds only
    images of this embed part (so, if that holds for every part, the dedup rows of a part's images
    can be nowhere else). Other parts need no check."""
    if not part.by_number:
        return True
    embedded = pq.read_table(part.path, columns=["image_id"])["image_id"].to_numpy()
    deduped = pq.read_table(part.kept_from[0], columns=["image_id"])["image_id"].to_numpy()
    return bool(np.isin(deduped, embedded).all())


def write_labels(path: Path, ids: np.ndarray, labels: np.ndarray, distance: np.ndarray) -> None:
    table = pa.table(
        {
            "image_id": pa.array(ids, pa.int64()),
            "label": pa.array(labels, pa.int64()),
            "distance": pa.array(distance, pa.float32()),
        }
    )
    write_parquet_atomic(table, path, LABELS)


def read_labels(path: Path | str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, labels, distances) of a label part, in id order."""
    t = pq.read_table(path)
    return t["image_id"].to_numpy(), t["label"].to_numpy(), t["distance"].to_numpy()
