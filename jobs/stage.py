"""The stage contract: what a stage reads, writes, depends on and needs, declared in one object.

Each module in `lvd.jobs.stages` exports `STAGE`, a `Stage`; the runner imports those objects.
A stage's driver gets a `StageContext`, which hands out the paths of the tables the stage declared
and refuses any other, so the declaration is the whole truth about a stage's inputs. A stage
returns a typed summary (a `StageSummary` dataclass) that the marker stores and the funnel reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from lvd.schemas import layout
from lvd.schemas.job_spec import JobSpec
from lvd.schemas.layout import Table

S = TypeVar("S", bound="StageSummary")


@dataclass
class StageSummary:
    """Counts a stage reports. Subclasses add fields and say which of them are funnel rows."""

    # (label, field) pairs: the stage's rows in the job's funnel, in order.
    FUNNEL: ClassVar[tuple[tuple[str, str], ...]] = ()

    def funnel(self) -> list[tuple[str, Any]]:
        return [(label, getattr(self, name)) for label, name in self.FUNNEL]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls: type[S], data: dict[str, Any]) -> S:
        """From a marker; fields a marker of an older version lacks keep their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class Resources:
    """What a stage's workers run on. `engine` is where the per-image work happens; `gpu`: its
    workers take a GPU each when the cluster has them."""

    engine: Literal["ray", "spark"]
    gpu: bool = False


@dataclass(frozen=True)
class Stage:
    name: str
    reads: tuple[Table, ...]
    writes: tuple[Table, ...]
    spec_sections: tuple[str, ...]  # job spec sections the stage's output depends on
    resources: Resources
    summary: type[StageSummary]
    run: Callable[[StageContext], StageSummary]
    # When its config or inputs change, the runner keeps the stage's earlier output aside
    # (`StageContext.previous_dir`) instead of deleting it, so the stage can adopt the parts whose
    # own inputs did not change (incremental runs: a source added to the spec).
    reuses_previous: bool = False

    @property
    def inputs(self) -> tuple[str, ...]:
        """Upstream stages: those that write a table this stage reads (in their order of first read)."""
        return tuple(dict.fromkeys(t.stage for t in self.reads))

    def __post_init__(self) -> None:
        wrong = [t.name for t in self.writes if t.stage != self.name]
        if wrong:
            raise ValueError(f"stage {self.name!r} declares tables of other stages as written: {wrong}")


class UndeclaredTableError(RuntimeError):
    """A stage asked for a table its declaration does not name."""


@dataclass
class StageContext:
    """What a stage driver gets: the spec, the engines, and the paths of its declared tables."""

    spec: JobSpec
    out_dir: Path
    stage: Stage

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def stage_dir(self) -> Path:
        return layout.stage_dir(self.out_dir, self.stage.name)

    @property
    def previous_dir(self) -> Path | None:
        """The stage's output from an earlier run with other inputs, kept by the runner while this
        run adopts what it can (stages declaring `reuses_previous`); None when there is none."""
        folder = layout.previous_stage_dir(self.out_dir, self.stage.name)
        return folder if self.stage.reuses_previous and folder.is_dir() else None

    def scratch_dir(self, name: str) -> Path:
        return layout.scratch_dir(self.stage_dir, name)

    def _check(self, table: Table, *, write: bool) -> None:
        allowed = self.stage.writes if write else self.stage.reads + self.stage.writes
        if table not in allowed:
            verb = "write" if write else "read"
            raise UndeclaredTableError(
                f"stage {self.stage.name!r} does not declare that it {verb}s table {table.name!r}"
            )

    def parts(self, table: Table, model: str | None = None) -> list[Path]:
        """The part files of a table this stage reads (or wrote), in part order."""
        self._check(table, write=False)
        return layout.list_parts(layout.table_dir(self.out_dir, table), model)

    def table_file(self, table: Table) -> Path:
        """The file of a single-file table this stage reads or writes."""
        self._check(table, write=table in self.stage.writes)
        return layout.table_file(self.out_dir, table)

    def input_dir(self, table: Table) -> Path:
        """The folder of a table this stage reads (for readers that take a folder)."""
        self._check(table, write=False)
        return layout.table_dir(self.out_dir, table)

    def output_dir(self, table: Table) -> Path:
        """The folder this stage writes a table's parts into."""
        self._check(table, write=True)
        return layout.table_dir(self.out_dir, table)

    def ray(self) -> None:
        """Make sure Ray is up (in-process local instance, or the cluster this job runs on)."""
        from lvd.jobs.engines import ensure_ray

        ensure_ray(self.spec)

    def spark(self):
        """The SparkSession of this job (local[*] by default, a cluster by spec.spark.master)."""
        from lvd.jobs.engines import get_spark

        return get_spark(self.spec)
