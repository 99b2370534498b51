"""Runs a job's stages in order, each once: a stage whose marker matches is skipped.

A stage's marker (`<out>/<stage>/_marker.json`) is written last and records the fingerprint
of the spec sections the stage depends on and of its inputs' markers, its row counts and its
time. A rerun skips a stage whose fingerprints match; a stage with parts but no marker resumes
part by part (the stage itself skips parts that exist).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from lvd.jobs.stage import Stage, StageContext, StageSummary
from lvd.jobs.stages import cluster, dedup, embed, ingest, report, retrieve, sample, shards
from lvd.schemas import layout
from lvd.schemas.job_spec import JobSpec
from lvd.schemas.tables import write_json_atomic

log = logging.getLogger("lvd")

STAGES: tuple[Stage, ...] = (
    ingest.STAGE,
    embed.STAGE,
    dedup.STAGE,
    cluster.STAGE,
    retrieve.STAGE,
    sample.STAGE,
    shards.STAGE,
    report.STAGE,  # last: the decisions table and report.html read every stage's output
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def read_marker(stage_dir: Path, name: str = layout.MARKER) -> dict | None:
    try:
        return json.loads((stage_dir / name).read_text())
    except (OSError, ValueError):
        return None


def _fingerprints(spec: JobSpec, stage: Stage, out_dir: Path) -> dict[str, str]:
    inputs = {}
    for up in stage.inputs:
        marker = read_marker(layout.stage_dir(out_dir, up))
        inputs[up] = marker["config_fingerprint"] + ":" + marker["input_fingerprint"] if marker else "missing"
    blob = json.dumps(inputs, sort_keys=True)
    return {
        "config_fingerprint": spec.fingerprint(*stage.spec_sections),
        "input_fingerprint": hashlib.sha256(blob.encode()).hexdigest()[:16],
    }


def stage_is_done(spec: JobSpec, stage: Stage, out_dir: Path) -> bool:
    marker = read_marker(layout.stage_dir(out_dir, stage.name))
    if marker is None:
        return False
    fp = _fingerprints(spec, stage, out_dir)
    return all(marker.get(k) == v for k, v in fp.items())


@dataclass
class StageReport:
    name: str
    skipped: bool
    seconds: float
    summary: StageSummary


def run_job(
    spec: JobSpec,
    force: Iterable[str] = (),
    until: str | None = None,
    on_stage: Callable[[StageReport], None] | None = None,
) -> list[StageReport]:
    """Run every stage not already done; `force` names stages to redo from scratch.

    Downstream stages rerun only if their config or their inputs' fingerprints changed: stages are
    deterministic, so redoing one with the same config gives the same output.
    """
    force = set(force)
    unknown = force - set(STAGE_NAMES)
    if unknown:
        raise ValueError(f"--force: unknown stage(s) {sorted(unknown)}; stages are {list(STAGE_NAMES)}")
    if until is not None and until not in STAGE_NAMES:
        raise ValueError(f"--until: unknown stage {until!r}; stages are {list(STAGE_NAMES)}")
    out_dir = Path(spec.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / layout.JOB_FILE, spec.model_dump(mode="json"))
    warm_spark = _spark_waits_behind_other_stages(spec, out_dir, force, until)
    reports = []
    for stage in STAGES:
        stage_dir = layout.stage_dir(out_dir, stage.name)
        if stage.name in force:
            # A forced stage starts from nothing: parts from the previous run must not be reused.
            shutil.rmtree(stage_dir, ignore_errors=True)
            shutil.rmtree(layout.previous_stage_dir(out_dir, stage.name), ignore_errors=True)
        t0 = time.perf_counter()
        if stage_is_done(spec, stage, out_dir):
            marker = read_marker(stage_dir)
            summary = stage.summary.from_json(marker.get("summary", {}))
            report = StageReport(stage.name, True, time.perf_counter() - t0, summary)
        else:
            fingerprints = _fingerprints(spec, stage, out_dir)
            started = read_marker(stage_dir, layout.STARTED)
            if started is not None and started != fingerprints:
                # Parts left by an attempt with another config or other inputs are stale: never mix them
                # in. A stage that reuses unchanged parts gets the finished earlier output set aside.
                previous = layout.previous_stage_dir(out_dir, stage.name)
                if stage.reuses_previous and (stage_dir / layout.MARKER).exists():
                    log.info("stage %s: inputs changed, keeping its output aside for reuse", stage.name)
                    shutil.rmtree(previous, ignore_errors=True)
                    previous.parent.mkdir(parents=True, exist_ok=True)
                    stage_dir.rename(previous)
                else:
                    log.info("stage %s: config or inputs changed, clearing %s", stage.name, stage_dir)
                    shutil.rmtree(stage_dir)
            (stage_dir / layout.MARKER).unlink(missing_ok=True)
            stage_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(stage_dir / layout.STARTED, fingerprints)
            log.info("stage %s: running", stage.name)
            summary = stage.run(StageContext(spec=spec, out_dir=out_dir, stage=stage))
            if not isinstance(summary, stage.summary):
                raise TypeError(
                    f"stage {stage.name!r} returned {type(summary).__name__}, not {stage.summary.__name__}"
                )
            seconds = time.perf_counter() - t0
            shutil.rmtree(layout.previous_stage_dir(out_dir, stage.name), ignore_errors=True)
            write_json_atomic(
                stage_dir / layout.MARKER,
                {
                    **fingerprints,
                    "stage": stage.name,
                    "summary": summary.to_json(),
                    "seconds": round(seconds, 3),
                    "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
            )
            report = StageReport(stage.name, False, seconds, summary)
            if warm_spark:
                # After the first stage that ran (it starts Ray, which is slow to start beside a JVM):
                # the JVM and its Python workers start while the next Ray stages run.
                from lvd.jobs.engines import start_spark_in_background

                start_spark_in_background(spec)
                warm_spark = False
        reports.append(report)
        if on_stage:
            on_stage(report)
        if stage.name == until:
            break
    if until is None:
        write_json_atomic(out_dir / layout.REPORT_FILE, job_report(out_dir))
    return reports


def _spark_waits_behind_other_stages(
    spec: JobSpec, out_dir: Path, force: set[str], until: str | None
) -> bool:
    """Whether a Spark stage of this run will do work after other stages do theirs: then Spark is
    started in the background while they run (`run_job`), not when its stage starts."""
    stages = STAGES[: STAGE_NAMES.index(until) + 1] if until is not None else STAGES
    pending = [s for s in stages if s.name in force or not stage_is_done(spec, s, out_dir)]
    return (
        bool(pending)
        and pending[0].resources.engine != "spark"
        and any(s.resources.engine == "spark" for s in pending)
    )


def stage_summaries(out_dir: Path) -> dict[str, tuple[StageSummary | None, float | None]]:
    """Each stage's summary and seconds from its marker (None for a stage that has not finished)."""
    out = {}
    for st in STAGES:
        marker = read_marker(layout.stage_dir(out_dir, st.name))
        out[st.name] = (
            (st.summary.from_json(marker.get("summary", {})), marker.get("seconds"))
            if marker
            else (None, None)
        )
    return out


def funnel(out_dir: Path) -> list[tuple[str, str, object]]:
    """The curation funnel, read from the stage markers: (stage, label, value) rows in stage order."""
    return [
        (name, label, value)
        for name, (summary, _) in stage_summaries(out_dir).items()
        if summary is not None
        for label, value in summary.funnel()
    ]


def job_report(out_dir: Path) -> dict:
    """report.json: the funnel rows, and every stage's summary and seconds."""
    summaries = stage_summaries(out_dir)
    return {
        "funnel": [{"stage": s, "label": label, "value": v} for s, label, v in funnel(out_dir)],
        "stages": {
            name: {"summary": summary.to_json() if summary else None, "seconds": seconds}
            for name, (summary, seconds) in summaries.items()
        },
    }
