"""Image ids outside the pipeline: exact in pandas, JSON and HTML.

Ids are 63-bit integers (`curation.ingest.stable_image_id`); most exceed 2^53, the largest integer
a float64 holds exactly. Inside the pipeline they stay Arrow int64. Readers that go through float64
corrupt them silently: pandas turns an int64 column with nulls (`duplicate_of`, `seed_id`) into
float64, and JavaScript's JSON.parse reads every number as a float64. So ids leave the pipeline as
Arrow-backed pandas columns (`to_pandas`, `read_pandas`) or as decimal strings (`json_safe`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

# Every column, in any table, that holds an image id (or, for component_id, the smallest id of a component).
ID_COLUMNS = frozenset({"image_id", "component_id", "duplicate_of", "seed_id", "eval_match", "query_id"})

# 2^53: integers above it are not all representable as float64.
FLOAT64_EXACT = 1 << 53


def to_pandas(table: pa.Table) -> pd.DataFrame:
    """A DataFrame whose id columns are Arrow-backed int64 (`int64[pyarrow]`): nulls stay nulls and
    values stay exact; the other columns convert as `pa.Table.to_pandas` converts them."""
    ids = [name for name in table.column_names if name in ID_COLUMNS]
    df = table.drop_columns(ids).to_pandas()
    for name in ids:
        column = table[name].cast(pa.int64())
        df.insert(table.column_names.index(name), name, pd.Series(column.to_pandas(types_mapper=_arrow)))
    return df


def _arrow(arrow_type: pa.DataType) -> pd.ArrowDtype:
    return pd.ArrowDtype(arrow_type)


def read_pandas(out_dir: str | Path, table: Any, model: str | None = None, columns: list[str] | None = None):
    """A whole table of a job as a pandas DataFrame with exact ids (`layout.read_table` + `to_pandas`)."""
    from lvd.schemas import layout

    return to_pandas(layout.read_table(out_dir, table, model=model, columns=columns))


def json_safe(row: dict[str, Any]) -> dict[str, Any]:
    """A row for a JSON document: its id columns as decimal strings (null stays null)."""
    return {k: (str(v) if k in ID_COLUMNS and v is not None else v) for k, v in row.items()}


def from_json(row: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `json_safe`: id columns back to ints."""
    return {k: (int(v) if k in ID_COLUMNS and v is not None else v) for k, v in row.items()}
