"""Ingest stage: list every image of the pool, seed sets and eval sets into the `images` table.

The driver only plans: it expands brace patterns, and Ray tasks resolve the names, check the
sources and list folders (level by level, then whole subtrees) and containers; the driver numbers
the resulting work units (pool first, then seed sets, then eval sets, in spec order), the same
units however the listing was split. Each unit whose part file is missing goes to a Ray task that
reads it, probes the images and writes `part-NNNNN.parquet` itself, so the driver never holds
image bytes and a killed run resumes with the parts it lacks.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lvd.curation.ingest import (
    Mapper,
    SourceSet,
    WorkUnit,
    ingest_unit,
    map_in_process,
    plan_work_units,
    reason_prefix,
)
from lvd.jobs.stage import Resources, Stage, StageContext, StageSummary
from lvd.jobs.workers import run_tasks
from lvd.schemas import layout
from lvd.schemas.job_spec import JobSpec
from lvd.schemas.layout import POOL, eval_dataset, part_path, seed_dataset
from lvd.schemas.tables import IMAGES, write_json_atomic, write_parquet_atomic

log = logging.getLogger("lvd")

LISTING_CPUS = 1.0


def source_sets(spec: JobSpec) -> list[SourceSet]:
    """The job's datasets in unit order: pool, seed sets, eval sets."""
    return [
        SourceSet(POOL, spec.pool, "pool source"),
        *(SourceSet(seed_dataset(s.name), s.sources, f"seed set {s.name!r} source") for s in spec.seeds),
        *(SourceSet(eval_dataset(e.name), e.sources, f"eval set {e.name!r} source") for e in spec.eval_sets),
    ]


def plan_units(spec: JobSpec, mapper: Mapper = map_in_process, parallelism: int = 1) -> list[WorkUnit]:
    """All work units of a job, numbered by their position; checks every source before listing."""
    return plan_work_units(
        source_sets(spec), spec.ingest.files_per_part, mapper=mapper, parallelism=parallelism
    )


def ray_mapper(fn, items: list) -> list:
    """A listing round as Ray tasks (Ray must be up)."""
    return run_tasks(fn, items, name="ingest: listing", num_cpus=LISTING_CPUS, unit="tasks")


def summarize_part(table: pa.Table) -> dict:
    """Counts of one part: rows and errors per dataset, errors per reason prefix, notes per prefix."""
    datasets = table.column("dataset").to_pylist()
    errors = table.column("error").to_pylist()
    by_dataset: dict[str, dict[str, int]] = {}
    by_reason: Counter[str] = Counter()
    for ds, err in zip(datasets, errors, strict=True):
        counts = by_dataset.setdefault(ds, {"images": 0, "errors": 0})
        counts["images"] += 1
        if err is not None:
            counts["errors"] += 1
            by_reason[reason_prefix(err)] += 1
    by_note = Counter(
        reason_prefix(item) for note in table.column("note").to_pylist() if note for item in note.split("; ")
    )
    return {"by_dataset": by_dataset, "errors_by_reason": dict(by_reason), "notes": dict(by_note)}


def ingest_part(item: tuple[int, WorkUnit], *, stage_dir: str, limits: dict) -> dict:
    """Task: ingest one unit and write its part; return the part's small summary."""
    index, unit = item
    table = ingest_unit(unit, **limits)
    write_parquet_atomic(table, part_path(stage_dir, index), IMAGES)
    return summarize_part(table)


def summarize_part_file(path: str) -> dict:
    """Task: the summary of a part written by an earlier run (three small columns)."""
    return summarize_part(pq.read_table(path, columns=["dataset", "error", "note"]))


def _limits(spec: JobSpec) -> dict:
    """`ingest_unit`'s limits from the spec."""
    i = spec.ingest
    return {
        "max_pixels": i.max_pixels,
        "max_bytes": i.max_bytes,
        "min_side": i.min_side,
        "max_aspect_ratio": i.max_aspect_ratio,
    }


def _plan_fingerprint(units: list[WorkUnit], spec: JobSpec) -> str:
    """sha256 of the plan's JSON (sorted keys), fed unit by unit: no copy of the whole plan as text."""
    h = hashlib.sha256()
    h.update(
        f'{{"max_aspect_ratio": {json.dumps(spec.ingest.max_aspect_ratio)}, '
        f'"max_bytes": {json.dumps(spec.ingest.max_bytes)}, '
        f'"max_pixels": {json.dumps(spec.ingest.max_pixels)}, '
        f'"min_side": {json.dumps(spec.ingest.min_side)}, "units": ['.encode()
    )
    for i, u in enumerate(units):
        h.update(((", " if i else "") + json.dumps(u.to_dict(), sort_keys=True)).encode())
    h.update(b"]}")
    return h.hexdigest()[:16]


def unit_digests(units: list[WorkUnit], spec: JobSpec) -> list[str]:
    """Per unit, what its part depends on (the unit and the limits): equal digests, equal parts."""
    limits = json.dumps(_limits(spec), sort_keys=True)
    return [
        hashlib.sha256((limits + json.dumps(u.to_dict(), sort_keys=True)).encode()).hexdigest()[:16]
        for u in units
    ]


def _read_plan(stage_dir: Path) -> dict:
    try:
        return json.loads((stage_dir / layout.INGEST_PLAN).read_text())
    except (OSError, ValueError):
        return {}


def _drop_stale_parts(stage_dir: Path, fingerprint: str, digests: list[str]) -> None:
    """Parts written for another plan (sources or limits changed) must not be resumed."""
    if _read_plan(stage_dir).get("fingerprint") != fingerprint:
        for part in layout.list_parts(stage_dir):
            part.unlink()
    else:
        for part in layout.list_parts(stage_dir):
            if layout.part_index(part) >= len(digests):
                part.unlink()
    write_json_atomic(
        stage_dir / layout.INGEST_PLAN,
        {"fingerprint": fingerprint, "units": len(digests), "digests": digests},
    )


def adopt_previous_parts(previous: Path | None, stage_dir: Path, digests: list[str]) -> int:
    """Move into place the parts of an earlier run (sources since added or removed) whose unit and
    limits are unchanged, wherever the unit now sits in the plan; return how many were adopted."""
    if previous is None:
        return 0
    old_index = {d: j for j, d in enumerate(_read_plan(previous).get("digests", []))}
    adopted = 0
    for i, digest in enumerate(digests):
        j = old_index.get(digest)
        target = part_path(stage_dir, i)
        if j is None or target.exists() or not part_path(previous, j).exists():
            continue
        part_path(previous, j).rename(target)
        adopted += 1
    return adopted


def _merge(summaries: list[dict]) -> dict:
    by_dataset: dict[str, dict[str, int]] = {}
    by_reason: Counter[str] = Counter()
    by_note: Counter[str] = Counter()
    for s in summaries:
        for ds, counts in s["by_dataset"].items():
            acc = by_dataset.setdefault(ds, {"images": 0, "errors": 0})
            acc["images"] += counts["images"]
            acc["errors"] += counts["errors"]
        by_reason.update(s["errors_by_reason"])
        by_note.update(s.get("notes", {}))
    return {
        "images": sum(c["images"] for c in by_dataset.values()),
        "errors": sum(c["errors"] for c in by_dataset.values()),
        "pool_images": by_dataset.get(POOL, {}).get("images", 0),
        "pool_errors": by_dataset.get(POOL, {}).get("errors", 0),
        "errors_by_reason": dict(sorted(by_reason.items())),
        "notes": dict(sorted(by_note.items())),
        "by_dataset": dict(sorted(by_dataset.items())),
    }


class NoReadableImages(ValueError):
    """A seed or eval set (or the pool) of which no image could be used."""


def check_readable(by_dataset: dict[str, dict[str, int]], sets: list[SourceSet]) -> None:
    """Raise NoReadableImages naming every dataset with no usable image (it would curate nothing, or
    retrieve for nothing, without saying so)."""
    empty = []
    for s in sets:
        counts = by_dataset.get(s.dataset, {"images": 0, "errors": 0})
        if counts["images"] == counts["errors"]:
            what = s.what.removesuffix(" source")
            empty.append(f"{what}: none of its {counts['images']} files is a readable image")
    if empty:
        raise NoReadableImages("; ".join(empty) + " (the images table lists each file with its reason)")


@dataclass
class IngestSummary(StageSummary):
    """images/errors: all rows and rows with an error, over every dataset; notes: usable images with
    something odd about them (animated, EXIF orientation), per note prefix."""

    FUNNEL = (("images in", "pool_images"), ("- unreadable or corrupt", "pool_errors"))
    images: int = 0
    errors: int = 0
    pool_images: int = 0
    pool_errors: int = 0
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)
    by_dataset: dict[str, dict[str, int]] = field(default_factory=dict)
    parts: int = 0
    parts_written: int = 0
    parts_reused: int = 0  # adopted from the run before sources were added (`reuses_previous`)


def run(ctx: StageContext) -> IngestSummary:
    """Ingest all sources of the job."""
    import ray

    spec = ctx.spec
    stage_dir = ctx.output_dir(layout.IMAGES)
    stage_dir.mkdir(parents=True, exist_ok=True)
    ctx.ray()
    units = plan_units(spec, ray_mapper, max(1, int(ray.cluster_resources().get("CPU", 1))))
    digests = unit_digests(units, spec)
    _drop_stale_parts(stage_dir, _plan_fingerprint(units, spec), digests)
    adopted = adopt_previous_parts(ctx.previous_dir, stage_dir, digests)
    todo = [i for i in range(len(units)) if not part_path(stage_dir, i).exists()]
    log.info("ingest: %d work units, %d to do, %d from the earlier run", len(units), len(todo), adopted)

    written = run_tasks(
        ingest_part,
        [(i, units[i]) for i in todo],
        name="ingest",
        stage_dir=str(stage_dir),
        limits=_limits(spec),
    )
    summaries = dict(zip(todo, written, strict=True))
    missing = [i for i in range(len(units)) if not part_path(stage_dir, i).exists()]
    if missing:
        raise RuntimeError(f"ingest: parts {missing[:10]} were not written")
    resumed = [i for i in range(len(units)) if i not in summaries]
    counted = run_tasks(
        summarize_part_file, [str(part_path(stage_dir, i)) for i in resumed], name="ingest: resumed parts"
    )
    summaries.update(zip(resumed, counted, strict=True))
    merged = _merge([summaries[i] for i in range(len(units))])
    # After the parts are written: a rerun with the sets fixed redoes only what changed.
    check_readable(merged["by_dataset"], source_sets(spec))
    return IngestSummary(**merged, parts=len(units), parts_written=len(todo), parts_reused=adopted)


STAGE = Stage(
    name="ingest",
    reads=(),
    writes=(layout.IMAGES,),
    spec_sections=("pool", "seeds", "eval_sets", "ingest"),
    resources=Resources(engine="ray"),
    summary=IngestSummary,
    run=run,
    reuses_previous=True,
)
