"""The stage runner: markers, skipping, --force, and fingerprints (stages here are stand-ins that count calls)."""

import dataclasses
from dataclasses import dataclass

import pyarrow as pa
import pytest

from lvd.jobs import pipeline
from lvd.jobs.stage import Resources, Stage, StageContext, StageSummary, UndeclaredTableError
from lvd.schemas import layout
from lvd.schemas.job_spec import parse_job_spec
from lvd.schemas.tables import read_parts, write_parquet_atomic

SCHEMA = pa.schema([pa.field("x", pa.int64(), nullable=False)])
CALLS: list[str] = []
TABLES = {name: layout.Table(f"t{name}", name, SCHEMA) for name in "abc"}


@dataclass
class RowsSummary(StageSummary):
    FUNNEL = (("rows", "rows"),)
    rows: int = 0


def _fake_stage(name: str, upstream: str | None, section: str) -> Stage:
    def run(ctx: StageContext) -> RowsSummary:
        CALLS.append(name)
        base = (
            read_parts(ctx.parts(TABLES[upstream]), SCHEMA).column("x").to_pylist() if upstream else [1, 2, 3]
        )
        # Resume part by part: a part already written is kept.
        out = ctx.output_dir(TABLES[name])
        for i, x in enumerate(base):
            if not layout.part_path(out, i).exists():
                write_parquet_atomic(pa.table({"x": [x * 10]}), layout.part_path(out, i), SCHEMA)
        return RowsSummary(rows=len(base))

    return Stage(
        name=name,
        reads=(TABLES[upstream],) if upstream else (),
        writes=(TABLES[name],),
        spec_sections=(section,),
        resources=Resources(engine="ray"),
        summary=RowsSummary,
        run=run,
    )


@pytest.fixture
def fake_stages(monkeypatch):
    stages = (_fake_stage("a", None, "pool"), _fake_stage("b", "a", "dedup"), _fake_stage("c", "b", "shards"))
    monkeypatch.setattr(pipeline, "STAGES", stages)
    monkeypatch.setattr(pipeline, "STAGE_NAMES", tuple(s.name for s in stages))
    CALLS.clear()
    return stages


def _rows(tmp_path, name: str) -> list[int]:
    return read_parts(layout.list_parts(tmp_path / "out" / name), SCHEMA).column("x").to_pylist()


def _spec(tmp_path, **extra):
    return parse_job_spec(
        {
            "name": "t",
            "output_dir": str(tmp_path / "out"),
            "pool": [{"uri": "p"}],
            "sampling": {"target_size": 5},
            "embedding": {"retrieval": {"weights": "random"}},
            **extra,
        }
    )


def test_second_run_skips_every_stage(tmp_path, fake_stages):
    spec = _spec(tmp_path)
    first = pipeline.run_job(spec)
    assert [r.skipped for r in first] == [False, False, False] and CALLS == ["a", "b", "c"]
    second = pipeline.run_job(spec)
    assert [r.skipped for r in second] == [True, True, True] and CALLS == ["a", "b", "c"]
    assert _rows(tmp_path, "c") == [1000, 2000, 3000]


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
    (tmp_path / "out" / "c" / layout.MARKER).unlink()
    layout.part_path(tmp_path / "out" / "c", 2).unlink()
    CALLS.clear()
    pipeline.run_job(spec)
    assert CALLS == ["c"]
    assert sorted(_rows(tmp_path, "c")) == [1000, 2000, 3000]


def test_unknown_force_stage_is_rejected_before_work(tmp_path, fake_stages):
    with pytest.raises(ValueError, match="unknown stage"):
        pipeline.run_job(_spec(tmp_path), force=["embedd"])
    assert CALLS == []


def test_parts_of_an_attempt_with_another_config_are_not_reused(tmp_path, fake_stages):
    pipeline.run_job(_spec(tmp_path))
    # Stage c died after writing a stale part; then its config changes.
    (tmp_path / "out" / "c" / layout.MARKER).unlink()
    write_parquet_atomic(pa.table({"x": [-1]}), layout.part_path(tmp_path / "out" / "c", 7), SCHEMA)
    pipeline.run_job(_spec(tmp_path, shards={"samples_per_shard": 3}))
    assert sorted(_rows(tmp_path, "c")) == [1000, 2000, 3000]


def test_a_stage_that_reuses_previous_output_sees_it_aside_on_changed_inputs(tmp_path, monkeypatch):
    """Stage b declares reuses_previous: when a's config changes, b's finished output is kept aside
    for b's rerun (not mixed into its folder) and removed when b finishes; c's is cleared as before."""
    seen: list[list[int] | None] = []
    a, b, c = _fake_stage("a", None, "pool"), _fake_stage("b", "a", "dedup"), _fake_stage("c", "b", "shards")
    inner = b.run

    def run_b(ctx: StageContext) -> RowsSummary:
        previous = ctx.previous_dir
        seen.append(
            None
            if previous is None
            else sorted(read_parts(layout.list_parts(previous), SCHEMA)["x"].to_pylist())
        )
        assert layout.list_parts(ctx.output_dir(TABLES["b"])) == []  # nothing stale in its own folder
        return inner(ctx)

    b = dataclasses.replace(b, run=run_b, reuses_previous=True)
    stages = (a, b, c)
    monkeypatch.setattr(pipeline, "STAGES", stages)
    monkeypatch.setattr(pipeline, "STAGE_NAMES", tuple(s.name for s in stages))
    pipeline.run_job(_spec(tmp_path))
    pipeline.run_job(_spec(tmp_path, pool=[{"uri": "p"}, {"uri": "q"}]))
    assert seen == [None, [100, 200, 300]]
    assert not layout.previous_stage_dir(tmp_path / "out", "b").exists()
    assert sorted(_rows(tmp_path, "b")) == [100, 200, 300]
    # A forced stage never sees an earlier output.
    pipeline.run_job(_spec(tmp_path), force=["b"])
    assert seen[-1] is None


def test_a_stage_cannot_open_a_table_it_did_not_declare(tmp_path, fake_stages):
    ctx = StageContext(spec=_spec(tmp_path), out_dir=tmp_path / "out", stage=fake_stages[2])
    assert ctx.parts(TABLES["b"]) == []  # declared: fine (nothing written yet)
    with pytest.raises(UndeclaredTableError, match="'c' does not declare that it reads table 'ta'"):
        ctx.parts(TABLES["a"])
    with pytest.raises(UndeclaredTableError, match="writes table 'tb'"):
        ctx.output_dir(TABLES["b"])


def test_the_product_stages_read_only_what_they_declare():
    """Every real stage's inputs come from its declared tables, in pipeline order."""
    seen: set[str] = set()
    for st in pipeline.STAGES:
        assert set(st.inputs) <= seen, (st.name, st.inputs)
        seen.add(st.name)
        assert all(t.stage == st.name for t in st.writes)


def test_funnel_and_report_come_from_the_stage_summaries(tmp_path, fake_stages):
    pipeline.run_job(_spec(tmp_path))
    assert pipeline.funnel(tmp_path / "out") == [("a", "rows", 3), ("b", "rows", 3), ("c", "rows", 3)]
    report = pipeline.job_report(tmp_path / "out")
    assert report["stages"]["b"]["summary"] == {"rows": 3}


def test_spark_starts_in_the_background_only_when_a_spark_stage_waits_behind_others(
    tmp_path, fake_stages, monkeypatch
):
    from lvd.jobs import engines

    stages = (*fake_stages[:2], dataclasses.replace(fake_stages[2], resources=Resources(engine="spark")))
    monkeypatch.setattr(pipeline, "STAGES", stages)
    warmed = []
    monkeypatch.setattr(engines, "start_spark_in_background", lambda spec: warmed.append(spec.name))
    spec = _spec(tmp_path)
    pipeline.run_job(spec, until="b")  # the Spark stage is not part of this run
    assert warmed == []
    pipeline.run_job(spec)  # c (Spark) waits behind nothing else to do: it starts Spark itself
    assert warmed == []
    pipeline.run_job(spec, force=["a"])  # c is done and stays done
    assert warmed == []
    pipeline.run_job(_spec(tmp_path, shards={"seed": 1}), force=["b"])  # b first, then c
    assert warmed == ["t"]
