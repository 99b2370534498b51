"""`lvd pretrain` and `lvd eval knn` (filled in by the training stage)."""

from __future__ import annotations

from pathlib import Path

import typer


def pretrain(config: str = typer.Option("tiny", help="Config name or YAML path.")) -> None:
    """Pretrain DINOv2 on curated shards."""
    raise typer.Exit(1)


def eval_knn(checkpoint: Path, data: Path) -> None:
    """kNN classification of a checkpoint's backbone on a labelled image folder."""
    raise typer.Exit(1)
