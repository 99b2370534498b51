"""Image ids: exact through pandas, JSON and the HTML report, and unchanged when a job folder moves."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lvd.schemas import ids, layout

# Odd values above 2^53: no float64 holds them, so any float round trip changes them.
BIG = [2**53 + 1, 2**62 + 12345, 2**63 - 1]


def _table() -> pa.Table:
    return pa.table(
        {
            "image_id": pa.array(BIG, pa.int64()),
            "duplicate_of": pa.array([None, BIG[0], BIG[2]], pa.int64()),
            "uri": ["a", "b", "c"],
            "size": pa.array([1, None, 3], pa.int64()),
        }
    )


def test_nullable_ids_round_trip_through_pandas(tmp_path):
    table = _table()
    # What the helper guards against: the plain conversion turns the nullable column into floats.
    plain = table.to_pandas()
    assert plain["duplicate_of"].dtype == "float64"
    assert [int(v) for v in plain["duplicate_of"].dropna()] != BIG[::2]

    df = ids.to_pandas(table)
    assert list(df.columns) == table.column_names
    assert df["duplicate_of"].isna().tolist() == [True, False, False]
    assert [int(v) for v in df["duplicate_of"].dropna()] == [BIG[0], BIG[2]]
    assert [int(v) for v in df["image_id"]] == BIG
    assert df["size"].dtype == "float64"  # not an id: converted as usual
    # Back to Arrow and through parquet: the same values and types.
    back = pa.Table.from_pandas(df, preserve_index=False)
    assert back["image_id"].to_pylist() == BIG
    assert back["duplicate_of"].to_pylist() == table["duplicate_of"].to_pylist()
    pq.write_table(table, tmp_path / "part-00000.parquet")
    again = ids.to_pandas(pq.read_table(tmp_path / "part-00000.parquet"))
    assert again["duplicate_of"].tolist()[1:] == [BIG[0], BIG[2]]


def test_ids_round_trip_through_json_read_as_float64():
    rows = _table().to_pylist()
    text = json.dumps([ids.json_safe(r) for r in rows])
    # A JavaScript reader: every JSON number is a float64.
    parsed = json.loads(text, parse_int=float)
    assert [ids.from_json(r) for r in parsed] == [{**r, "size": r["size"] and float(r["size"])} for r in rows]
    # The same rows without json_safe lose their ids in such a reader.
    lossy = json.loads(json.dumps(rows), parse_int=float)
    assert [int(r["image_id"]) for r in lossy] != BIG


def test_report_html_shows_ids_exactly(demo_job):
    spec, _, _, _ = demo_job
    out = Path(spec.output_dir)
    all_ids = set(layout.read_table(out, layout.IMAGES, columns=["image_id"])["image_id"].to_pylist())
    html = (out / layout.REPORT_HTML).read_text()
    shown = {int(v) for v in re.findall(r'alt="(\d+)"', html)}
    assert shown and shown <= all_ids
    assert any(v > ids.FLOAT64_EXACT for v in shown)  # ids a float64 reader would round


def test_moving_the_job_folder_keeps_ids_and_picks(moved_demo_job):
    (root, out), (moved, moved_out), _ = moved_demo_job
    assert moved_out == moved / out.relative_to(root)

    def by_place(folder: Path, base: Path) -> dict[str, int]:
        t = layout.read_table(folder, layout.IMAGES, columns=["uri", "image_id"])
        uris = t["uri"].to_pylist()
        assert all(u.startswith(str(base) + "/") for u in uris)  # read from where the data is now
        return {u[len(str(base)) :]: i for u, i in zip(uris, t["image_id"].to_pylist(), strict=True)}

    before, after = by_place(out, root), by_place(moved_out, moved)
    assert after == before
    for table, cols in (
        (layout.CURATED, ["image_id", "repeats"]),
        (layout.DEDUP, ["image_id", "duplicate_of"]),
    ):
        old = (
            ids.to_pandas(layout.read_table(out, table, columns=cols))
            .sort_values(cols)
            .reset_index(drop=True)
        )
        new = ids.to_pandas(layout.read_table(moved_out, table, columns=cols)).sort_values(cols)
        pd.testing.assert_frame_equal(new.reset_index(drop=True), old)
