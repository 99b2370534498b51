"""Ingest stage: list every image of the pool, seed sets and eval sets into the `images` table.

The driver only plans: it expands the sources into numbered work units (pool first, then seed
sets, then eval sets, in spec order) and hands the units whose part file is missing to Ray
Data. Each task reads its unit, probes the images and writes `part-NNNNN.parquet` itself, so
the driver never holds image bytes and a killed run resumes with the parts it lacks.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lvd.curation.ingest import WorkUnit, check_sources, ingest_unit, list_work_units, reason_prefix
from lvd.jobs.stage import Resources, Stage, StageContext, StageSummary
from lvd.schemas import layout
from lvd.schemas.job_spec import JobSpec
from lvd.schemas.layout import POOL, eval_dataset, part_path, seed_dataset
from lvd.schemas.tables import IMAGES, write_json_atomic, write_parquet_atomic

log = logging.getLogger("lvd")

PLAN = "_plan.json"  # fingerprint of the work units the parts were written for


def plan_units(spec: JobSpec) -> list[WorkUnit]:
    """All work units of a job, numbered by their position; checks every source first."""
    check_sources(spec.pool, "pool source")
    for s in spec.seeds:
        check_sources(s.sources, f"seed set {s.name!r} source")
    for e in spec.eval_sets:
        check_sources(e.sources, f"eval set {e.name!r} source")
    per_part = spec.ingest.files_per_part
    units = list_work_units(spec.pool, POOL, per_part)
    for s in spec.seeds:
        units += list_work_units(s.sources, seed_dataset(s.name), per_part)
    for e in spec.eval_sets:
        units += list_work_units(e.sources, eval_dataset(e.name), per_part)
    return units


def summarize_part(table: pa.Table) -> dict:
    """Counts of one part: rows and errors per dataset, errors per reason prefix."""
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
    return {"by_dataset": by_dataset, "errors_by_reason": dict(by_reason)}


def _ingest_batch(batch: dict[str, np.ndarray], stage_dir: str, max_pixels: int, max_bytes: int) -> dict:
    """Ray Data task body: ingest each unit of the batch and write its part; return small summaries."""
    summaries = []
    for index, unit_json in zip(batch["index"], batch["unit"], strict=True):
        unit = WorkUnit.from_dict(json.loads(unit_json))
        table = ingest_unit(unit, max_pixels=max_pixels, max_bytes=max_bytes)
        write_parquet_atomic(table, part_path(stage_dir, int(index)), IMAGES)
        summaries.append(json.dumps(summarize_part(table)))
    return {"index": np.asarray(batch["index"]), "summary": np.asarray(summaries, dtype=object)}


def _plan_fingerprint(units: list[WorkUnit], spec: JobSpec) -> str:
    blob = json.dumps(
        {
            "units": [u.to_dict() for u in units],
            "max_pixels": spec.ingest.max_pixels,
            "max_bytes": spec.ingest.max_bytes,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _drop_stale_parts(stage_dir: Path, fingerprint: str, n_units: int) -> None:
    """Parts written for another plan (sources or limits changed) must not be resumed."""
    plan_file = stage_dir / PLAN
    try:
        old = json.loads(plan_file.read_text()).get("fingerprint")
    except (OSError, ValueError):
        old = None
    if old != fingerprint:
        for part in layout.list_parts(stage_dir):
            part.unlink()
    else:
        for part in layout.list_parts(stage_dir):
            if layout.part_index(part) >= n_units:
                part.unlink()
    write_json_atomic(plan_file, {"fingerprint": fingerprint, "units": n_units})


def _merge(summaries: list[dict]) -> dict:
    by_dataset: dict[str, dict[str, int]] = {}
    by_reason: Counter[str] = Counter()
    for s in summaries:
        for ds, counts in s["by_dataset"].items():
            acc = by_dataset.setdefault(ds, {"images": 0, "errors": 0})
            acc["images"] += counts["images"]
            acc["errors"] += counts["errors"]
        by_reason.update(s["errors_by_reason"])
    return {
        "images": sum(c["images"] for c in by_dataset.values()),
        "errors": sum(c["errors"] for c in by_dataset.values()),
        "pool_images": by_dataset.get(POOL, {}).get("images", 0),
        "pool_errors": by_dataset.get(POOL, {}).get("errors", 0),
        "errors_by_reason": dict(sorted(by_reason.items())),
        "by_dataset": dict(sorted(by_dataset.items())),
    }


@dataclass
class IngestSummary(StageSummary):
    """images/errors: all rows and rows with an error, over every dataset."""

    FUNNEL = (("images in", "pool_images"), ("errors (unreadable / corrupt)", "pool_errors"))
    images: int = 0
    errors: int = 0
    pool_images: int = 0
    pool_errors: int = 0
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    by_dataset: dict[str, dict[str, int]] = field(default_factory=dict)
    parts: int = 0
    parts_written: int = 0


def run(ctx: StageContext) -> IngestSummary:
    """Ingest all sources of the job."""
    spec = ctx.spec
    stage_dir = ctx.output_dir(layout.IMAGES)
    stage_dir.mkdir(parents=True, exist_ok=True)
    units = plan_units(spec)
    _drop_stale_parts(stage_dir, _plan_fingerprint(units, spec), len(units))
    todo = [i for i in range(len(units)) if not part_path(stage_dir, i).exists()]
    log.info("ingest: %d work units, %d to do", len(units), len(todo))

    summaries: dict[int, dict] = {}
    if todo:
        import ray

        ctx.ray()
        items = [{"index": i, "unit": json.dumps(units[i].to_dict())} for i in todo]
        results = (
            ray.data.from_items(items, override_num_blocks=len(items))
            .map_batches(
                _ingest_batch,
                batch_size=1,
                fn_kwargs={
                    "stage_dir": str(stage_dir),
                    "max_pixels": spec.ingest.max_pixels,
                    "max_bytes": spec.ingest.max_bytes,
                },
                num_cpus=1,
            )
            .take_all()
        )
        summaries = {int(r["index"]): json.loads(r["summary"]) for r in results}

    missing = [i for i in range(len(units)) if not part_path(stage_dir, i).exists()]
    if missing:
        raise RuntimeError(f"ingest: parts {missing[:10]} were not written")
    for i in range(len(units)):
        if i not in summaries:  # resumed part: count it from its file (two small columns)
            summaries[i] = summarize_part(
                pq.read_table(part_path(stage_dir, i), columns=["dataset", "error"])
            )
    return IngestSummary(
        **_merge([summaries[i] for i in range(len(units))]), parts=len(units), parts_written=len(todo)
    )


STAGE = Stage(
    name="ingest",
    reads=(),
    writes=(layout.IMAGES,),
    spec_sections=("pool", "seeds", "eval_sets", "ingest"),
    resources=Resources(engine="ray"),
    summary=IngestSummary,
    run=run,
)
