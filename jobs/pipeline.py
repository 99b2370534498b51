"""Runs a job's stages in order, each once: a stage whose marker matches is skipped.

A stage's marker (`<out>/<stage>/_marker.json`) is written last and records the fingerprint
of the spec sections the stage depends on and of its inputs' markers, its row counts and its
time. A rerun skips a stage whose fingerprints match; a stage with parts but no marker resumes
part by part (the stage itself skips parts that exist).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.job_spec import JobSpec

log = logging.getLogger("lvd")

MARKER = "_marker.json"
STARTED = "_started.json"  # fingerprints of the attempt whose parts are in the folder


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # module with `run(ctx: StageContext) -> dict`
    inputs: tuple[str, ...]  # upstream stages whose markers feed this one's fingerprint
    sections: tuple[str, ...]  # job spec sections this stage's output depends on


STAGES: tuple[Stage, ...] = (
    Stage("ingest", "jobs.stages.ingest", (), ("pool", "seeds", "eval_sets", "ingest")),
    Stage("embed", "jobs.stages.embed", ("ingest",), ("embedding",)),
    Stage("dedup", "jobs.stages.dedup", ("ingest", "embed"), ("dedup",)),
    Stage("cluster", "jobs.stages.cluster", ("dedup", "embed"), ("clustering",)),
    Stage("retrieve", "jobs.stages.retrieve", ("dedup", "embed", "cluster"), ("seeds",)),
    Stage("sample", "jobs.stages.sample", ("retrieve", "cluster"), ("sampling",)),
    Stage("shards", "jobs.stages.shards", ("sample", "ingest", "cluster"), ("shards",)),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


@dataclass
class StageContext:
    """What a stage driver gets: the spec, its own folder and its inputs' folders."""

    spec: JobSpec
    out_dir: Path
    stage: str
    _cache: dict[str, Any] = field(default_factory=dict)

    @property
    def stage_dir(self) -> Path:
        return self.out_dir / self.stage

    def input_dir(self, stage: str) -> Path:
        return self.out_dir / stage

    def ray(self) -> None:
        """Make sure Ray is up (in-process local instance, or the cluster this job runs on)."""
        from jobs.engines import ensure_ray

        ensure_ray(self.spec)

    def spark(self):
        """The SparkSession of this job (local[*] by default, a cluster by spec.spark.master)."""
        from jobs.engines import get_spark

        return get_spark(self.spec)


def read_marker(stage_dir: Path, name: str = MARKER) -> dict | None:
    try:
        return json.loads((stage_dir / name).read_text())
    except (OSError, ValueError):
        return None


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _fingerprints(spec: JobSpec, stage: Stage, out_dir: Path) -> dict[str, str]:
    inputs = {}
    for up in stage.inputs:
        marker = read_marker(out_dir / up)
        inputs[up] = marker["config_fingerprint"] + ":" + marker["input_fingerprint"] if marker else "missing"
    blob = json.dumps(inputs, sort_keys=True)
    return {
        "config_fingerprint": spec.fingerprint(*stage.sections),
        "input_fingerprint": hashlib.sha256(blob.encode()).hexdigest()[:16],
    }


def stage_is_done(spec: JobSpec, stage: Stage, out_dir: Path) -> bool:
    marker = read_marker(out_dir / stage.name)
    if marker is None:
        return False
    fp = _fingerprints(spec, stage, out_dir)
    return all(marker.get(k) == v for k, v in fp.items())


@dataclass
class StageReport:
    name: str
    skipped: bool
    seconds: float
    summary: dict


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
    write_json_atomic(out_dir / "job.json", spec.model_dump(mode="json"))
    reports = []
    for stage in STAGES:
        stage_dir = out_dir / stage.name
        if stage.name in force:
            # A forced stage starts from nothing: parts from the previous run must not be reused.
            shutil.rmtree(stage_dir, ignore_errors=True)
        t0 = time.perf_counter()
        if stage_is_done(spec, stage, out_dir):
            marker = read_marker(stage_dir)
            report = StageReport(stage.name, True, time.perf_counter() - t0, marker.get("summary", {}))
        else:
            fingerprints = _fingerprints(spec, stage, out_dir)
            started = read_marker(stage_dir, STARTED)
            if started is not None and started != fingerprints:
                # Parts left by an attempt with another config or other inputs are stale: never mix them in.
                log.info("stage %s: config or inputs changed, clearing %s", stage.name, stage_dir)
                shutil.rmtree(stage_dir)
            (stage_dir / MARKER).unlink(missing_ok=True)
            stage_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(stage_dir / STARTED, fingerprints)
            log.info("stage %s: running", stage.name)
            ctx = StageContext(spec=spec, out_dir=out_dir, stage=stage.name)
            summary = importlib.import_module(stage.module).run(ctx) or {}
            seconds = time.perf_counter() - t0
            write_json_atomic(
                stage_dir / MARKER,
                {
                    **fingerprints,
                    "stage": stage.name,
                    "summary": summary,
                    "seconds": round(seconds, 3),
                    "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
            )
            report = StageReport(stage.name, False, seconds, summary)
        reports.append(report)
        if on_stage:
            on_stage(report)
        if stage.name == until:
            break
    if until is None:
        write_json_atomic(out_dir / "report.json", funnel(out_dir))
    return reports


def funnel(out_dir: Path) -> dict:
    """The curation funnel, read from the stage markers."""
    s = {st.name: (read_marker(out_dir / st.name) or {}).get("summary", {}) for st in STAGES}
    return {
        "images_in": s["ingest"].get("pool_images", 0),
        "errors": s["ingest"].get("pool_errors", 0),
        "embed_errors": s["embed"].get("errors", 0),
        "exact_duplicates": s["dedup"].get("exact", 0),
        "near_duplicates": s["dedup"].get("copy", 0),
        "eval_overlap": s["dedup"].get("eval_overlap", 0),
        "clustered": s["cluster"].get("images", 0),
        "retrieved": s["retrieve"].get("images", 0),
        "curated": s["sample"].get("images", 0),
        "curated_samples": s["sample"].get("samples", 0),
        "shards_written": s["shards"].get("shards", 0),
        "stage_seconds": {st.name: (read_marker(out_dir / st.name) or {}).get("seconds") for st in STAGES},
    }
