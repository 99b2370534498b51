"""`lvd run`/`lvd demo`: run a job here and print each stage and the funnel as they finish."""

from __future__ import annotations

import json
from collections.abc import Iterable

import typer

from jobs.pipeline import StageReport, funnel, run_job
from schemas.job_spec import JobSpec

FUNNEL_ROWS = (
    ("images in", "images_in"),
    ("errors (unreadable / corrupt)", "errors"),
    ("exact duplicates", "exact_duplicates"),
    ("near duplicates (copy detection)", "near_duplicates"),
    ("eval-set overlap", "eval_overlap"),
    ("clustered", "clustered"),
    ("retrieved by seeds", "retrieved"),
    ("curated images", "curated"),
    ("curated samples (with repeats)", "curated_samples"),
    ("shards written", "shards_written"),
)


def _print_stage(report: StageReport) -> None:
    state = "skipped (done)" if report.skipped else f"{report.seconds:8.1f} s"
    typer.echo(f"  {report.name:<9} {state}  {json.dumps(report.summary, sort_keys=True, default=str)[:160]}")


def format_funnel(f: dict) -> str:
    lines = ["funnel:"]
    lines += [f"  {label:<34} {f.get(key, 0):>10}" for label, key in FUNNEL_ROWS]
    lines.append("stage seconds (last run that did the work):")
    lines += [
        f"  {name:<9} {secs if secs is not None else '-':>8}" for name, secs in f["stage_seconds"].items()
    ]
    return "\n".join(lines)


def run_and_report(spec: JobSpec, force: Iterable[str] = (), until: str | None = None) -> list[StageReport]:
    typer.echo(f"job {spec.name!r} -> {spec.output_dir}")
    try:
        reports = run_job(spec, force=force, until=until, on_stage=_print_stage)
    except ValueError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None
    typer.echo(f"this run: {sum(r.seconds for r in reports):.1f} s in stages")
    if until is None:
        from pathlib import Path

        typer.echo(format_funnel(funnel(Path(spec.output_dir))))
    return reports
