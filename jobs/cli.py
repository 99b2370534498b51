"""The `lvd` command: run, submit and follow curation jobs; verify shards; pretrain; evaluate."""

from __future__ import annotations

import json
import logging
import os
import re
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
# faiss logs, at info, each CPU build it tries and fails to load before the one it loads: noise that
# reads like an error. Shown with -v.
_NOISY_LOGGERS = ("faiss.loader", "py4j")  # py4j: a line per gateway connection closed
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
    if not verbose:
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    if quiet:
        # Ray sets the levels of its loggers when imported and again in ray.init (from RAY_LOGGER_LEVEL),
        # and Ray Data whenever it configures logging (from RAY_DATA_LOG_LEVEL): set both, import Ray,
        # then lower the levels it has set.
        os.environ["RAY_LOGGER_LEVEL"] = "warning"
        os.environ["RAY_DATA_LOG_LEVEL"] = "WARNING"
        from lvd.jobs.engines import local_env_defaults

        local_env_defaults()  # Ray reads its binding settings when imported
        import ray  # noqa: F401

        for name in _ENGINE_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def _check_stages(force: list[str], until: str | None = None) -> None:
    """Exit 2 naming a --force or --until value that is not a stage, before anything runs."""
    import difflib

    from lvd.jobs.pipeline import STAGE_NAMES

    for option, name in [*(("--force", f) for f in force), *([("--until", until)] if until else [])]:
        if name not in STAGE_NAMES:
            close = difflib.get_close_matches(name, STAGE_NAMES, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            typer.echo(
                f"{option} {name!r} is not a stage: {hint}stages are {', '.join(STAGE_NAMES)}", err=True
            )
            raise typer.Exit(2)


def _load_spec(path: Path):
    """The spec, with its inputs checked (sources and weights exist), or exit 2 with every problem."""
    from lvd.jobs.preflight import check_inputs

    try:
        spec = load_job_spec(path)
        check_inputs(spec)
        return spec
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
    """Check a job spec without running anything: its fields, and that its sources and weights exist."""
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
    _check_stages(force, until)
    spec = _load_spec(job)
    from lvd.jobs.runner import run_and_report
    from lvd.jobs.submit import SHIPPED_ENV

    if os.environ.get(SHIPPED_ENV):
        logging.getLogger(__name__).info(
            "lvd: shipped with this job by `lvd submit` (%s)", Path(__file__).parent
        )

    run_and_report(spec, force=force, until=until)


@app.command()
def demo(
    out: Path = typer.Option(Path("lvd-demo"), "--out", help="Folder for the demo's data and output."),
    images: int = typer.Option(
        None,
        envvar="LVD_DEMO_IMAGES",
        help="Pool size to generate (default 600; 2400 with --ablation).",
    ),
    ablation: bool = typer.Option(
        False, "--ablation", help="A long-tailed, duplicated, eval-leaking grey pool for `lvd ablate`."
    ),
    force: list[str] = typer.Option([], "--force", help="Redo this stage (repeatable)."),
    verbose: bool = typer.Option(False, "-v"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
) -> None:
    """Generate an offline pool and seed set, write a job spec for it, run it and print the funnel."""
    _setup_logging(verbose, quiet)
    _check_stages(force)
    from lvd.jobs.preflight import output_dir_problem

    if problem := output_dir_problem(str(out.resolve()), "--out"):
        typer.echo(problem, err=True)
        raise typer.Exit(2)
    from lvd.jobs.runner import run_and_report

    if ablation:
        from lvd.jobs.ablation_demo import EVAL_SET, build_ablation_demo

        job_path = build_ablation_demo(out, n_images=images or 2400)
    else:
        from lvd.jobs.demo import build_demo

        job_path = build_demo(out, n_images=images or 600)
    typer.echo(f"demo job spec: {job_path}")
    spec = load_job_spec(job_path)
    run_and_report(spec, force=force)
    if ablation:
        typer.echo(f"next: lvd ablate {spec.output_dir} --eval {out / 'data' / 'eval' / EVAL_SET}")


ADDRESS_HELP = (
    "Ray dashboard address of the cluster (Jobs API). With token auth the token comes from "
    "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token."
)
DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def _check_address(value: str) -> str:
    """A dashboard address the Jobs API client takes: http(s)://HOST[:PORT]."""
    if not re.fullmatch(r"https?://[^/\s]+/?", value):
        raise typer.BadParameter(f"{value!r}: give http://HEAD:8265")
    return value


def _address_option():
    return typer.Option(DEFAULT_ADDRESS, help=ADDRESS_HELP, callback=_check_address)


# `lvd status` / `submit --wait` exit codes per final job state (0 for a job still pending or running).
EXIT_CODES = {"FAILED": 1, "STOPPED": 3}
SHIP_HELP = (
    "Which lvd runs the job: 'auto' asks the head's `python` (a probe job) and ships this lvd with "
    "the job (Ray py_modules) unless the cluster has lvd; 'always' ships it; 'never' uses the cluster's."
)


def _shipping(address: str, ship: str):
    """Decide which lvd runs a submitted job and say so on stderr (stdout keeps the job id alone)."""
    from lvd.jobs.submit import SHIP_MODES, decide_shipping

    if ship not in SHIP_MODES:
        typer.echo(f"--ship {ship!r}: use one of {', '.join(SHIP_MODES)}", err=True)
        raise typer.Exit(2)
    shipping = decide_shipping(address, ship)
    typer.echo(f"lvd: {shipping.reason}", err=True)
    return shipping


@app.command()
def submit(
    job: Path = typer.Argument(..., help="Job spec YAML."),
    address: str = _address_option(),
    wait: bool = typer.Option(
        False, help="Stream the job's log until it ends; exit 1 if it FAILED, 3 if it was STOPPED."
    ),
    ship: str = typer.Option("auto", help=SHIP_HELP),
) -> None:
    """Submit a job to a running Ray cluster through the Ray Jobs API; prints the job id."""
    spec = _load_spec(job)
    from lvd.jobs.submit import follow_job, submit_job

    job_id = submit_job(spec, address=address, shipping=_shipping(address, ship))
    typer.echo(job_id)
    if wait:
        final = follow_job(job_id, address)
        typer.echo(f"job {job_id}: {final}", err=True)
        raise typer.Exit(EXIT_CODES.get(final, 0))


@app.command("submit-pretrain", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit_pretrain(
    ctx: typer.Context,
    address: str = _address_option(),
    wait: bool = typer.Option(False, help="Wait until the job ends; exit 1 unless it succeeded."),
    ship: str = typer.Option("auto", help=SHIP_HELP),
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
    shipping = _shipping(address, ship)
    job_id = submit(args, address, config_file=config_file, metadata=metadata, shipping=shipping)
    typer.echo(job_id)
    if wait:
        final = wait_for_job(job_id, address)
        typer.echo(final)
        if final != "SUCCEEDED":
            raise typer.Exit(1)


@app.command()
def status(job_id: str, address: str = _address_option()) -> None:
    """Status of a submitted job; exits 1 if it FAILED, 3 if it was STOPPED."""
    from lvd.jobs.submit import job_status

    state = job_status(job_id, address=address)
    typer.echo(state)
    raise typer.Exit(EXIT_CODES.get(state, 0))


@app.command()
def logs(
    job_id: str,
    address: str = _address_option(),
    follow: bool = typer.Option(
        False, "--follow", "-f", help="Keep streaming until the job ends; exit as `lvd status` does."
    ),
) -> None:
    """Logs of a submitted job."""
    from lvd.jobs.submit import follow_job, job_logs

    if not follow:
        typer.echo(job_logs(job_id, address=address))
        return
    final = follow_job(job_id, address)
    typer.echo(f"job {job_id}: {final}", err=True)
    raise typer.Exit(EXIT_CODES.get(final, 0))


@app.command()
def stop(job_id: str, address: str = _address_option()) -> None:
    """Stop a submitted job."""
    from lvd.jobs.submit import job_status, stop_job

    if stop_job(job_id, address=address):
        typer.echo(f"job {job_id}: stop requested (`lvd status {job_id}` shows STOPPED once it has ended)")
    else:
        typer.echo(f"job {job_id}: not running ({job_status(job_id, address=address)}), nothing to stop")


def _job_of(output_dir: Path):
    """The spec a job's output folder was last run with (its job.json)."""
    from lvd.schemas import layout
    from lvd.schemas.job_spec import parse_job_spec

    try:
        return parse_job_spec(json.loads((output_dir / layout.JOB_FILE).read_text()))
    except FileNotFoundError:
        typer.echo(
            f"{output_dir} is not the output folder of an lvd job (it has no {layout.JOB_FILE})", err=True
        )
        raise typer.Exit(2) from None
    except (OSError, ValueError) as err:
        typer.echo(f"{output_dir} is not the output folder of an lvd job: {err}", err=True)
        raise typer.Exit(2) from None


@app.command()
def report(
    output_dir: Path = typer.Argument(..., help="A job's output folder."),
    verbose: bool = typer.Option(False, "-v"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
) -> None:
    """Write OUTPUT_DIR/report.html (and the decisions table if missing) for a finished job."""
    _setup_logging(verbose, quiet)
    spec = _job_of(output_dir)
    from lvd.jobs.pipeline import STAGES, run_job, stage_is_done
    from lvd.jobs.report_html import write_report
    from lvd.schemas import layout

    last = STAGES[-1]
    missing = [s.name for s in STAGES[:-1] if not stage_is_done(spec, s, output_dir)]
    if missing:
        typer.echo(f"the job has not finished stages {missing}: run `lvd run` first", err=True)
        raise typer.Exit(1)
    if stage_is_done(spec, last, output_dir):
        path = write_report(output_dir, spec)
    else:
        run_job(spec)  # every other stage is done: this runs the report stage only
        path = output_dir / layout.REPORT_HTML
    typer.echo(f"{path} ({path.stat().st_size} bytes)")


@app.command()
def explain(
    output_dir: Path = typer.Argument(..., help="A job's output folder."),
    image: str = typer.Argument(..., help="A pool image's id, or its uri as ingest recorded it."),
) -> None:
    """Tell the story of one pool image: what each stage decided about it, and why."""
    import pyarrow.dataset as ds

    from lvd.curation.decisions import find_rows, referenced_ids, story
    from lvd.schemas import layout

    spec = _job_of(output_dir)
    parts = layout.list_parts(layout.table_dir(output_dir, layout.DECISIONS))
    if not parts:
        typer.echo(f"{output_dir} has no decisions table yet: run `lvd run` (or `lvd report`)", err=True)
        raise typer.Exit(1)
    rows = find_rows(parts, image_ids=[int(image)]) if image.lstrip("-").isdigit() else []
    if not rows:
        rows = find_rows(parts, uri=image) or find_rows(parts, uri=str(Path(image).resolve()))
    images = ds.dataset([str(p) for p in layout.list_parts(layout.table_dir(output_dir, layout.IMAGES))])
    if not rows:
        found = images.to_table(columns=["image_id", "dataset", "uri"], filter=ds.field("uri") == image)
        if found.num_rows:
            typer.echo(
                f"{image} is an image of {found['dataset'][0]}, not of the pool: only pool images are curated"
            )
        else:
            typer.echo(f"no pool image with id or uri {image!r} in {output_dir}", err=True)
        raise typer.Exit(1)
    row = rows[0]
    named = referenced_ids(row)
    uri_of = {}
    if named:
        t = images.to_table(columns=["image_id", "uri"], filter=ds.field("image_id").isin(named))
        uri_of = dict(zip(t["image_id"].to_pylist(), t["uri"].to_pylist(), strict=True))
    typer.echo(story(row, uri_of, spec))


@app.command()
def ablate(
    job_output: Path = typer.Argument(..., help="A finished job's output_dir."),
    eval_sets: list[Path] = typer.Option(
        ..., "--eval", help="A labelled eval set: DIR/{train,val}/<class>/* or DIR/<class>/* (repeatable)."
    ),
    config: str = typer.Option("tiny", help="Pretraining config name or YAML path (as `lvd pretrain`)."),
    steps: int = typer.Option(None, help="Steps per arm (default: the config's schedule)."),
    seed: int = typer.Option(None, help="Training and sampling seed (default: the config's train.seed)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Batch size per data rank."),
    k: int = typer.Option(20, help="kNN neighbours that vote."),
    ray_workers: int = typer.Option(
        0, "--ray-workers", help="Pretrain each arm on this many Ray Train workers."
    ),
    gpu: bool = typer.Option(False, "--gpu", help="Ray Train workers get one GPU each."),
    verbose: bool = typer.Option(False, "-v"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
) -> None:
    """Did curation help? Pretrain the same config, steps, seed and number of images on the curated
    shards, a sample of the deduplicated pool, a sample of the raw pool and the seed sets; kNN on the
    eval sets, curated vs each arm paired on the same images (the DINOv2 paper's Table 2)."""
    _setup_logging(verbose, quiet)
    from lvd.jobs.ablate import AblationSettings, format_markdown, run_ablation
    from lvd.jobs.engines import ensure_ray
    from lvd.jobs.workers import RayFanout
    from lvd.schemas import layout
    from lvd.schemas.job_spec import parse_job_spec

    job_file = job_output / layout.JOB_FILE
    try:
        spec = parse_job_spec(json.loads(job_file.read_text()))
    except (OSError, ValueError) as err:
        typer.echo(f"error: {job_file}: {err} (is {job_output} a job's output_dir?)", err=True)
        raise typer.Exit(2) from None
    missing = [str(p) for p in eval_sets if not p.is_dir()]
    if missing:
        typer.echo(f"error: --eval: no folder {', '.join(missing)}", err=True)
        raise typer.Exit(2)
    spec.output_dir = str(job_output.resolve())
    settings = AblationSettings(
        config=config, steps=steps, seed=seed, batch_size=batch_size, eval_sets=list(eval_sets), k=k,
        ray_workers=ray_workers, gpu=gpu,
    )  # fmt: skip
    try:
        settings.pretrain_config()
    except (FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    ensure_ray(spec)
    try:
        table = run_ablation(spec, settings, RayFanout())
    except (FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(format_markdown(table))
    typer.echo(f"written: {layout.ablate_dir(job_output) / layout.ABLATION_JSON}, {layout.ABLATION_MD}")


@shards_app.command("verify")
def shards_verify(directory: Path) -> None:
    """Check a shard folder against its index: counts, checksums, keys, adjacency, decodability."""
    from lvd.jobs.shard_verify import verify_shards

    if not directory.is_dir():
        typer.echo(f"{directory}: no such folder (give a folder of shards, e.g. OUTPUT_DIR/shards)", err=True)
        raise typer.Exit(2)
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
    from lvd.schemas import layout

    if not layout.list_parts(layout.table_dir(output_dir, layout.EMBEDDINGS), layout.RETRIEVAL):
        typer.echo(f"{output_dir} has no embeddings: run `lvd run JOB --until embed` first", err=True)
        raise typer.Exit(2)
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


def error_line(err: BaseException) -> str:
    """A failure as one short message naming what failed: a task's error unwrapped from Ray's
    wrapper, an OS error with its path, otherwise the type and the first lines of the message."""
    cause = getattr(err, "cause", None)  # ray.exceptions.RayTaskError: the error raised in the task
    if isinstance(cause, BaseException) and cause is not err:
        return error_line(cause)
    if isinstance(err, OSError) and err.strerror and err.filename:
        return f"{err.strerror}: {err.filename}"
    text = str(err)
    if "Traceback (most recent call last)" in text:  # a Python worker's error inside an engine's (Spark)
        last = text.rsplit("Traceback (most recent call last)", 1)[1]
        raised = re.search(r"^(\w+(?:Error|Exception)): (.+)$", last, re.MULTILINE)
        if raised:
            return f"{raised.group(1)}: {raised.group(2).strip()}"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    text = " ".join(lines[:3]) if lines else type(err).__name__
    return text if isinstance(err, (OSError, LookupError)) else f"{type(err).__name__}: {text}"


def main(argv: list[str] | None = None) -> None:
    """The `lvd` command (`argv`: its arguments, default sys.argv[1:]). An error ends it with one
    line on stderr and exit 1 (the traceback with -v)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        app(args=argv, prog_name="lvd")
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as err:  # noqa: BLE001 - usage errors exit 2 inside click; this is the rest
        if "-v" in argv or "--verbose" in argv:
            raise
        print(f"lvd: error: {error_line(err)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
