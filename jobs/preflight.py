"""What `lvd validate` checks beyond the spec's own fields, before any work: the inputs it names exist.

`lvd run` and `lvd submit` run these checks too (through the CLI's spec loading). Each problem names
the spec field or source it is about; all of them are reported at once.
"""

from __future__ import annotations

import os
from pathlib import Path

from lvd.curation.ingest import SourceError, check_sources
from lvd.jobs.stages.ingest import source_sets
from lvd.schemas.job_spec import JobSpec, JobSpecError, ModelSpec


def _local_path(uri: str) -> Path | None:
    """The local path a weights value names, or None for a URL (fetched, and checked, when loaded)."""
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    return None if "://" in uri else Path(uri).expanduser()


def input_problems(spec: JobSpec) -> list[str]:
    """One line per source that matches nothing (or cannot be read as its kind) and per local weights
    file that does not exist."""
    problems = []
    for s in source_sets(spec):
        for src in s.sources:
            try:
                check_sources([src], s.what)
            except SourceError as err:
                problems.append(str(err))
    for name in ("retrieval", "copy_detection"):
        model = getattr(spec.embedding, name)
        if model is None or model.random_init or model.weights is None:
            continue
        path = _local_path(model.weights)
        if path is not None and not path.exists():
            problems.append(f"embedding.{name}.weights: no such file or folder: {path}")
        elif path is not None and model.arch not in ("torchscript", "copy_descriptor"):
            problems += [f"embedding.{name}.weights: {p}" for p in _weights_problems(model, name)]
    problem = output_dir_problem(spec.output_dir)
    return problems + ([problem] if problem else [])


def _weights_problems(model: ModelSpec, name: str) -> list[str]:
    """A local ViT checkpoint that the embed stage would refuse (another arch or patch size, not a
    checkpoint): loaded as that stage loads it, memory-mapped, without its sha256 (checked later)."""
    from lvd.embeddings.checkpoints import CheckpointError
    from lvd.embeddings.models import build_module

    try:
        build_module(model.model_copy(update={"sha256": None}))
    except (CheckpointError, ValueError, OSError) as err:
        arch_hint = f" (or set embedding.{name}.arch to the one it holds)" if "holds a" in str(err) else ""
        return [f"{err}{arch_hint}"]
    return []


def output_dir_problem(output_dir: str, name: str = "output_dir") -> str | None:
    """output_dir on local disk that cannot be created or written: its nearest existing folder."""
    if "://" in output_dir and not output_dir.startswith("file://"):
        return None  # object stores: checked by the first write
    path = Path(output_dir.removeprefix("file://")).expanduser()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None:
        return None
    if not existing.is_dir():
        return f"{name}: cannot create {path}: {existing} is a file, not a folder"
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        return (
            f"{name}: cannot write in {existing}: Read-only file system: remount it or choose another {name}"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{name}: cannot write in {existing} (permission denied): choose another {name}"
    return None


def check_inputs(spec: JobSpec) -> None:
    """Raise JobSpecError listing every input of `spec` that is missing."""
    problems = input_problems(spec)
    if problems:
        raise JobSpecError(
            "job spec names inputs or an output it cannot use:\n" + "\n".join(f"  {p}" for p in problems)
        )
