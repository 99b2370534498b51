"""`lvd run`/`lvd demo`: run a job here and print each stage and the funnel as they finish."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import typer

from lvd.jobs.pipeline import StageReport, funnel, run_job, stage_summaries
from lvd.schemas import layout
from lvd.schemas.job_spec import JobSpec


def _print_stage(report: StageReport) -> None:
    state = "skipped (done)" if report.skipped else f"{report.seconds:8.1f} s"
    rows = ", ".join(f"{label} {value}" for label, value in report.summary.funnel())
    typer.echo(f"  {report.name:<9} {state}  {rows}")


def format_funnel(out_dir: Path) -> str:
    """The funnel rows of every finished stage, then each stage's seconds."""
    lines = ["funnel:"]
    lines += [f"  {label:<34} {value:>10}" for _, label, value in funnel(out_dir)]
    lines.append("stage seconds (last run that did the work):")
    lines += [
        f"  {name:<9} {secs if secs is not None else '-':>8}"
        for name, (_, secs) in stage_summaries(out_dir).items()
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
        typer.echo(format_funnel(Path(spec.output_dir)))
        report = Path(spec.output_dir) / layout.REPORT_HTML
        if report.exists():
            typer.echo(
                f"report: {report}  (lvd explain {spec.output_dir} IMAGE_ID_OR_URI: one image's story)"
            )
    return reports
