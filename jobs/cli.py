"""The `lvd` command: run, submit and follow curation jobs; verify shards; pretrain; evaluate."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import typer

from lvd.schemas.job_spec import JobSpecError, load_job_spec

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
shards_app = typer.Typer(no_args_is_help=True, help="Inspect and verify WebDataset shard folders.")
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate a pretrained backbone.")
app.add_typer(shards_app, name="shards")
app.add_typer(eval_app, name="eval")
dedup_app = typer.Typer(no_args_is_help=True, help="Choose dedup thresholds.")
app.add_typer(dedup_app, name="dedup")


# Loggers of the engines whose info lines a quiet run drops too (their warnings still show).
_ENGINE_LOGGERS = ("ray", "ray.data", "py4j")
_RAY_DATA_PROGRESS_LOGGER = "ray.data._internal.progress"


def _setup_logging(verbose: bool, quiet: bool = False) -> None:
    """Plain log lines on stderr (no redrawn bars, so `lvd logs` of a submitted job reads the same).

    quiet: warnings only, and no progress lines; verbose: debug lines too.
    """
    from lvd.jobs import progress

    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # Set levels explicitly: basicConfig does nothing when the root logger already has a handler.
    logging.getLogger().setLevel(level)
    logging.getLogger("lvd").setLevel(level)
    progress.set_enabled(not quiet)
    # lvd turns Ray Data's progress bars off on purpose (its own lines replace them): no warning about it.
    logging.getLogger(_RAY_DATA_PROGRESS_LOGGER).setLevel(logging.ERROR)
    if quiet:
        # Ray sets the levels of its loggers when imported and again in ray.init (from RAY_LOGGER_LEVEL),
        # and Ray Data whenever it configures logging (from RAY_DATA_LOG_LEVEL): set both, import Ray,
        # then lower the levels it has set.
        os.environ["RAY_LOGGER_LEVEL"] = "warning"
        os.environ["RAY_DATA_LOG_LEVEL"] = "WARNING"
        import ray  # noqa: F401

        for name in _ENGINE_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def _load_spec(path: Path):
    try:
        return load_job_spec(path)
    except JobSpecError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None


@app.command()
def schema(
    table: str = typer.Option(None, help="Print this Arrow table schema instead of the job spec's."),
) -> None:
    """Print the job spec's JSON Schema (or an Arrow table schema)."""
    if table:
        from lvd.schemas import tables

        obj = getattr(tables, table.upper(), None)
        if obj is None:
            typer.echo(f"unknown table {table!r}", err=True)
            raise typer.Exit(2)
        typer.echo(str(obj))
        return
    from lvd.schemas.job_spec import JobSpec

    typer.echo(json.dumps(JobSpec.model_json_schema(), indent=2))


@app.command()
def validate(job: Path) -> None:
    """Check a job spec without running anything."""
    spec = _load_spec(job)
    typer.echo(f"ok: job {spec.name!r} writes to {spec.output_dir}")


QUIET_HELP = "No progress lines and no info logs (warnings and the stage and funnel rows still show)."


@app.command()
def run(
    job: Path = typer.Argument(..., help="Job spec YAML."),
    force: list[str] = typer.Option([], "--force", help="Redo this stage (repeatable)."),
    until: str = typer.Option(None, help="Stop after this stage."),
    verbose: bool = typer.Option(False, "-v"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
) -> None:
    """Run a job here: Ray in-process (or the cluster it was submitted to), Spark local[*] by default.

    Each stage logs its progress (rows done, rows per second, time left) every few seconds."""
    _setup_logging(verbose, quiet)
    spec = _load_spec(job)
    from lvd.jobs.runner import run_and_report

    run_and_report(spec, force=force, until=until)


@app.command()
def demo(
    out: Path = typer.Option(Path("lvd-demo"), "--out", help="Folder for the demo's data and output."),
    images: int = typer.Option(600, help="Pool size to generate."),
    force: list[str] = typer.Option([], "--force", help="Redo this stage (repeatable)."),
    verbose: bool = typer.Option(False, "-v"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
) -> None:
    """Generate an offline pool and seed set, write a job spec for it, run it and print the funnel."""
    _setup_logging(verbose, quiet)
    from lvd.jobs.demo import build_demo
    from lvd.jobs.runner import run_and_report

    job_path = build_demo(out, n_images=images)
    typer.echo(f"demo job spec: {job_path}")
    run_and_report(load_job_spec(job_path), force=force)


@app.command()
def submit(
    job: Path = typer.Argument(..., help="Job spec YAML."),
    address: str = typer.Option("http://127.0.0.1:8265", help="Ray dashboard address of the cluster."),
    wait: bool = typer.Option(False, help="Follow the job's logs until it ends."),
) -> None:
    """Submit a job to a running Ray cluster through the Ray Jobs API."""
    spec = _load_spec(job)
    from lvd.jobs.submit import submit_job

    job_id = submit_job(spec, address=address, wait=wait)
    typer.echo(job_id)


@app.command("submit-pretrain", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit_pretrain(
    ctx: typer.Context,
    address: str = typer.Option("http://127.0.0.1:8265", help="Ray dashboard address of the cluster."),
    wait: bool = typer.Option(False, help="Wait until the job ends; exit 1 unless it succeeded."),
) -> None:
    """Run `lvd pretrain` on a running Ray cluster as a Ray job. Every other option is `lvd pretrain`'s,
    e.g. `--from-job OUT --output OUT/pretrain --ray-workers 8 --gpu`; paths must be valid on the
    cluster (shared storage), a config YAML is uploaded with the job."""
    from lvd.jobs.submit import submit_pretrain as submit
    from lvd.jobs.submit import wait_for_job

    command = typer.main.get_command(app).commands["pretrain"]
    # The options are parsed (and a bad one reported, exit 2) here, before anything reaches the cluster.
    params = command.make_context("lvd pretrain", list(ctx.args)).params
    if not any(a == "--output" or a.startswith("--output=") for a in ctx.args):
        typer.echo("give --output: a folder on the cluster's storage for checkpoints and metrics", err=True)
        raise typer.Exit(2)
    args, config_file = [], None
    for param in command.params:
        value = params.get(param.name)
        if value is None:
            continue
        if param.name in ("from_job", "output"):
            value = Path(value).resolve()
        elif param.name == "shards" and "://" not in value:
            value = Path(value).resolve()
        elif param.name == "config" and Path(value).is_file():
            config_file, value = Path(value).resolve(), Path(value).name
        if getattr(param, "is_flag", False):
            flag = param.opts[0] if value else (param.secondary_opts or [None])[0]
            args += [flag] if flag else []
        else:
            args += [param.opts[0], str(value)]
    metadata = {"output_dir": str(Path(params["output"]).resolve())}
    job_id = submit(args, address, config_file=config_file, metadata=metadata)
    typer.echo(job_id)
    if wait:
        final = wait_for_job(job_id, address)
        typer.echo(final)
        if final != "SUCCEEDED":
            raise typer.Exit(1)


@app.command()
def status(job_id: str, address: str = typer.Option("http://127.0.0.1:8265")) -> None:
    """Status of a submitted job."""
    from lvd.jobs.submit import job_status

    typer.echo(job_status(job_id, address=address))


@app.command()
def logs(job_id: str, address: str = typer.Option("http://127.0.0.1:8265")) -> None:
    """Logs of a submitted job."""
    from lvd.jobs.submit import job_logs

    typer.echo(job_logs(job_id, address=address))


@app.command()
def stop(job_id: str, address: str = typer.Option("http://127.0.0.1:8265")) -> None:
    """Stop a submitted job."""
    from lvd.jobs.submit import stop_job

    typer.echo("stopped" if stop_job(job_id, address=address) else "not running")


@shards_app.command("verify")
def shards_verify(directory: Path) -> None:
    """Check a shard folder against its index: counts, checksums, keys, adjacency, decodability."""
    from lvd.jobs.shard_verify import verify_shards

    problems = verify_shards(directory)
    for p in problems:
        typer.echo(p, err=True)
    if problems:
        typer.echo(f"{len(problems)} problem(s) in {directory}", err=True)
        raise typer.Exit(1)
    typer.echo(f"ok: {directory}")


@dedup_app.command("calibrate")
def dedup_calibrate(
    output_dir: Path = typer.Argument(..., help="A job's output_dir, embedded (lvd run --until embed)."),
    out: Path | None = typer.Option(None, help="Where the example PNGs go (default OUTPUT_DIR/calibrate)."),
    low: float = typer.Option(0.4, help="Lowest bin edge (cosine)."),
    high: float = typer.Option(1.0, help="Highest bin edge (cosine)."),
    step: float = typer.Option(0.05, help="Bin width."),
    examples: int = typer.Option(4, min=0, help="Example pairs written per bin."),
    k: int = typer.Option(16, min=1, help="Neighbours per image the pairs come from."),
    max_images: int = typer.Option(20_000, min=2, help="Pool images sampled (keyed) at most."),
) -> None:
    """Neighbour pairs per cosine bin, and example pairs per bin as side-by-side thumbnails."""
    from lvd.jobs.calibrate import calibrate

    out = out or output_dir / "calibrate"
    model, bins = calibrate(
        output_dir, out, low=low, high=high, step=step, examples=examples, k=k, max_images=max_images
    )
    typer.echo(f"{model} vectors, pairs among each image's {k} nearest neighbours:")
    for b in bins:
        typer.echo(f"  [{b.low:.2f}, {b.high:.2f})  {b.pairs:>8} pairs  {len(b.examples)} examples")
    typer.echo(f"examples: {out}/<bin>/pair-N.png")


# Training commands live with the training package; their modules import torch lazily.
from lvd.training.cli import eval_knn, pretrain  # noqa: E402

app.command("pretrain")(pretrain)
eval_app.command("knn")(eval_knn)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
