"""What `lvd validate` checks beyond the spec's own fields, before any work: the inputs it names exist.

`lvd run` and `lvd submit` run these checks too (through the CLI's spec loading). Each problem names
the spec field or source it is about; all of them are reported at once.
"""

from __future__ import annotations

from pathlib import Path

from lvd.curation.ingest import SourceError, check_sources
from lvd.jobs.stages.ingest import source_sets
from lvd.schemas.job_spec import JobSpec, JobSpecError


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
    return problems


def check_inputs(spec: JobSpec) -> None:
    """Raise JobSpecError listing every input of `spec` that is missing."""
    problems = input_problems(spec)
    if problems:
        raise JobSpecError(
            "job spec names inputs that do not exist:\n" + "\n".join(f"  {p}" for p in problems)
        )
