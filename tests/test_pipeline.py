"""The stage runner: markers, skipping, --force, and fingerprints (stages here are stand-ins that count calls)."""

import sys
import types

import pyarrow as pa
import pytest

from jobs import pipeline
from schemas.job_spec import parse_job_spec
from schemas.tables import part_path, read_parts, write_parquet_atomic

SCHEMA = pa.schema([pa.field("x", pa.int64(), nullable=False)])
CALLS: list[str] = []


def _stage_module(name: str, upstream: str | None):
    def run(ctx):
        CALLS.append(name)
        base = read_parts(ctx.input_dir(upstream), SCHEMA).column("x").to_pylist() if upstream else [1, 2, 3]
        # Resume part by part: a part already written is kept.
        for i, x in enumerate(base):
            if not part_path(ctx.stage_dir, i).exists():
                write_parquet_atomic(pa.table({"x": [x * 10]}), part_path(ctx.stage_dir, i), SCHEMA)
        return {"rows": len(base)}

    mod = types.ModuleType(f"fake_{name}")
    mod.run = run
    return mod


@pytest.fixture
def fake_stages(monkeypatch):
    stages = (
        pipeline.Stage("a", "fake_a", (), ("pool",)),
        pipeline.Stage("b", "fake_b", ("a",), ("dedup",)),
        pipeline.Stage("c", "fake_c", ("b",), ("shards",)),
    )
    for st, up in zip(stages, [None, "a", "b"], strict=True):
        monkeypatch.setitem(sys.modules, st.module, _stage_module(st.name, up))
    monkeypatch.setattr(pipeline, "STAGES", stages)
    monkeypatch.setattr(pipeline, "STAGE_NAMES", tuple(s.name for s in stages))
    monkeypatch.setattr(pipeline, "funnel", lambda out_dir: {})
    CALLS.clear()
    return stages


def _spec(tmp_path, **extra):
    return parse_job_spec(
        {
            "name": "t",
            "output_dir": str(tmp_path / "out"),
            "pool": [{"uri": "p"}],
            "sampling": {"target_size": 5},
            **extra,
        }
    )


def test_second_run_skips_every_stage(tmp_path, fake_stages):
    spec = _spec(tmp_path)
    first = pipeline.run_job(spec)
    assert [r.skipped for r in first] == [False, False, False] and CALLS == ["a", "b", "c"]
    second = pipeline.run_job(spec)
    assert [r.skipped for r in second] == [True, True, True] and CALLS == ["a", "b", "c"]
    assert read_parts(tmp_path / "out" / "c", SCHEMA).column("x").to_pylist() == [1000, 2000, 3000]


def test_force_redoes_the_stage_and_everything_downstream(tmp_path, fake_stages):
    spec = _spec(tmp_path)
    pipeline.run_job(spec)
    CALLS.clear()
    reports = pipeline.run_job(spec, force=["b"])
    assert [r.skipped for r in reports] == [True, False, True]
    assert CALLS == ["b"]  # c's inputs are unchanged (same config, same upstream fingerprint)


def test_config_change_reruns_only_dependent_stages(tmp_path, fake_stages):
    pipeline.run_job(_spec(tmp_path))
    CALLS.clear()
    reports = pipeline.run_job(_spec(tmp_path, dedup={"k": 3}))
    assert [r.skipped for r in reports] == [True, False, False]
    assert CALLS == ["b", "c"]


def test_interrupted_stage_resumes_without_duplicating_rows(tmp_path, fake_stages):
    spec = _spec(tmp_path)
    pipeline.run_job(spec)
    # As if the job died in stage c after one part: no marker, one part left behind.
    (tmp_path / "out" / "c" / pipeline.MARKER).unlink()
    (part_path(tmp_path / "out" / "c", 2)).unlink()
    CALLS.clear()
    pipeline.run_job(spec)
    assert CALLS == ["c"]
    assert sorted(read_parts(tmp_path / "out" / "c", SCHEMA).column("x").to_pylist()) == [1000, 2000, 3000]


def test_unknown_force_stage_is_rejected_before_work(tmp_path, fake_stages):
    with pytest.raises(ValueError, match="unknown stage"):
        pipeline.run_job(_spec(tmp_path), force=["embedd"])
    assert CALLS == []


def test_parts_of_an_attempt_with_another_config_are_not_reused(tmp_path, fake_stages):
    pipeline.run_job(_spec(tmp_path))
    # Stage c died after writing a stale part; then its config changes.
    (tmp_path / "out" / "c" / pipeline.MARKER).unlink()
    write_parquet_atomic(pa.table({"x": [-1]}), part_path(tmp_path / "out" / "c", 7), SCHEMA)
    pipeline.run_job(_spec(tmp_path, shards={"samples_per_shard": 3}))
    assert sorted(read_parts(tmp_path / "out" / "c", SCHEMA).column("x").to_pylist()) == [1000, 2000, 3000]
