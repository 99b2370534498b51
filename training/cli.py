"""`lvd pretrain` and `lvd eval knn`. torch is imported inside the commands so `lvd --help` stays fast."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import typer


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
        )


def _shards_from_job(outdir: Path) -> str:
    """The shard folder of a curation output directory (read through its index.json)."""
    from lvd.schemas import layout

    index = layout.shards_dir(outdir) / layout.SHARD_INDEX_JSON
    if not index.exists():
        raise typer.BadParameter(f"{index} not found: is {outdir} a finished curation output directory?")
    return str(index.parent)


def pretrain(
    shards: str = typer.Option(
        None, help="Brace pattern 'out/shards/lvd-{000000..000009}.tar' or a shard folder."
    ),
    from_job: Path = typer.Option(None, "--from-job", help="A curation output dir: trains on OUTDIR/shards."),
    config: str = typer.Option(
        "tiny", help="Config name (tiny, vit_small, vit_base, vit_large, vit_giant2) or YAML path."
    ),
    arch: str = typer.Option(
        None, help="Override the config's backbone (vit_tiny/tiny_d4/small/base/large/giant2)."
    ),
    output: Path = typer.Option(
        Path("pretrain-out"), "--output", help="Checkpoints, metrics and the teacher export."
    ),
    steps: int = typer.Option(
        None,
        envvar="LVD_PRETRAIN_STEPS",
        help="Total schedule length in steps (the config's epochs are rescaled to fit).",
    ),
    stop_after: int = typer.Option(
        None, "--stop-after", help="Stop at this step (the schedule keeps its length)."
    ),
    batch_size: int = typer.Option(None, "--batch-size", help="Batch size per data rank (per process)."),
    data_ranks: int = typer.Option(
        None,
        "--data-ranks",
        help="Lay the global batch out for this many ranks (default: one per process): one process with "
        "--data-ranks 2 trains the same steps as --ray-workers 2.",
    ),
    resume: bool = typer.Option(
        True, "--resume/--no-resume", help="Continue from OUTPUT/checkpoint.pth if present."
    ),
    ray_workers: int = typer.Option(
        0, "--ray-workers", help="Run on this many Ray Train workers instead of here."
    ),
    ray_address: str = typer.Option(None, "--ray-address", help="Ray cluster address for --ray-workers."),
    gpu: bool = typer.Option(False, "--gpu", help="Ray Train workers get one GPU each."),
) -> None:
    """Pretrain DINOv2 on curated shards (one process; torchrun sets up DDP/FSDP; or Ray Train workers)."""
    from lvd.embeddings.cpu_threads import wait_passively

    wait_passively()  # before torch loads: the augmentation threads share the cores with torch's
    _setup_logging()
    if (shards is None) == (from_job is None):
        raise typer.BadParameter("give exactly one of --shards and --from-job")
    shard_source = shards if shards is not None else _shards_from_job(from_job)

    from lvd.training.config import load_config

    overrides: dict = {}
    if arch:
        overrides.setdefault("model", {})["arch"] = arch
    if batch_size:
        overrides.setdefault("train", {})["batch_size_per_gpu"] = batch_size
    if data_ranks:
        overrides.setdefault("train", {})["data_ranks"] = data_ranks
    try:
        cfg = load_config(config, overrides)
    except (FileNotFoundError, ValueError) as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None
    if steps:
        cfg = cfg.with_total_steps(steps)
    output.mkdir(parents=True, exist_ok=True)

    if ray_workers:
        from lvd.training.launch import launch_ray_train

        summary = launch_ray_train(
            cfg.model_dump(mode="json"),
            shard_source,
            str(output),
            num_workers=ray_workers,
            use_gpu=gpu,
            resume=resume,
            stop_after=stop_after,
            address=ray_address,
        )
        typer.echo(json.dumps(summary))
        return

    from lvd.training.train import NonFiniteLossError
    from lvd.training.train import pretrain as run_pretrain

    try:
        result = run_pretrain(cfg, shard_source, output, resume=resume, stop_after=stop_after)
    except NonFiniteLossError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(result.summary()))


def eval_knn(
    checkpoint: Path = typer.Argument(
        ..., help="A pretraining checkpoint.pth, teacher export, or any backbone the embed stage loads."
    ),
    data: Path = typer.Argument(
        ...,
        help="Labelled images: DATA/{train,val}/<class>/*, or DATA/<class>/* (split 80/20 per class, "
        "the same split on every run).",
    ),
    k: int = typer.Option(20, help="Neighbours that vote."),
    temperature: float = typer.Option(0.07, help="Vote weight exp(cosine / T)."),
    image_size: int = typer.Option(None, help="Evaluation crop (default: the backbone's training size)."),
    batch_size: int = typer.Option(64),
    baseline: str = typer.Option(
        "random",
        help="Score to read the checkpoint's against, on the same images: 'random' (the same network "
        "at random init), 'none', or another checkpoint's path.",
    ),
) -> None:
    """kNN classification of a checkpoint's backbone on a labelled image folder, beside a baseline."""
    from lvd.training.knn_eval import (
        knn_result,
        knn_val_scores,
        load_eval_backbone,
        paired_test,
        random_init_like,
    )

    kwargs = dict(k=k, temperature=temperature, image_size=image_size, batch_size=batch_size)
    try:
        backbone = load_eval_backbone(checkpoint)
        scores = knn_val_scores(backbone, data, **kwargs)
        result: dict = knn_result(scores, k)
        if baseline != "none":
            base = random_init_like(backbone) if baseline == "random" else load_eval_backbone(baseline)
            base_scores = knn_val_scores(base, data, **{**kwargs, "image_size": scores.image_size})
            test = paired_test(scores.correct, base_scores.correct)
            result["baseline"] = {
                "backbone": "random init" if baseline == "random" else baseline,
                "top1": base_scores.top1,
                "right_only_checkpoint": test.only_a,
                "right_only_baseline": test.only_b,
                "mcnemar_z": round(test.z, 3),
            }
    except (FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(result))
