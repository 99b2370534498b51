"""The scratch label parts of a k-means assignment pass: image_id, label and distance per point, one
part per vector part, written by the worker that assigned them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lvd.schemas.tables import write_parquet_atomic

LABELS = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("label", pa.int64(), nullable=False),
        pa.field("distance", pa.float32(), nullable=False),
    ]
)


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
