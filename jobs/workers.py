"""Fanning a stage's per-part work out to Ray workers: one task per item (a part, a group of parts),
each reading and writing files itself and returning a small result (counts, a path, a histogram).

The driver holds only the items and their results, which grow with the number of parts, never with
the number of images. Tasks are submitted a bounded number at a time, and results come back in item
order whatever order the tasks finish in. Task bodies must be idempotent (they write atomically), as
Ray retries a task whose worker died.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from lvd.jobs.progress import Progress

T = TypeVar("T")
R = TypeVar("R")

IN_FLIGHT_PER_CPU = 4  # enough queued work that no worker waits on the driver


def run_tasks(
    fn: Callable[..., R],
    items: Sequence[T],
    *,
    name: str,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    memory: int | None = None,
    rows: Callable[[R], int] | None = None,
    unit: str = "parts",
    total_rows: int | None = None,
    **kwargs: Any,
) -> list[R]:
    """`fn(item, **kwargs)` as one Ray task per item; the results in item order (Ray must be up).

    `rows(result)`: the rows a result stands for, counted in the progress line (else one per item).
    `kwargs` are put in the object store once and shared by every task.
    """
    import ray

    if not items:
        return []
    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if memory is not None:
        options["memory"] = memory
    remote = ray.remote(fn).options(**options)
    shared = {k: ray.put(v) for k, v in kwargs.items()}
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    max_in_flight = max(2, IN_FLIGHT_PER_CPU * cpus)
    progress = Progress(name, total_rows if rows else len(items), unit if rows is None else "rows")
    results: dict[int, R] = {}
    pending: dict[Any, int] = {}
    next_item = 0
    while next_item < len(items) or pending:
        while next_item < len(items) and len(pending) < max_in_flight:
            pending[remote.remote(items[next_item], **shared)] = next_item
            next_item += 1
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            index = pending.pop(ref)
            results[index] = ray.get(ref)
            progress.update(rows(results[index]) if rows else 1)
    progress.close()
    return [results[i] for i in range(len(items))]


def fold_tasks(
    fn: Callable[..., R],
    items: Sequence[T],
    combine: Callable[[R, R], R],
    *,
    name: str,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    max_in_flight: int | None = None,
    **kwargs: Any,
) -> R | None:
    """`fn(item, **kwargs)` as one Ray task per item, the results folded with `combine` in item order
    (None without items). For large results (per-cluster sums): the driver holds the running total
    and at most `max_in_flight` results, never one per item; folding in item order keeps float sums
    the same from run to run whatever order the tasks finish in."""
    import ray

    if not items:
        return None
    remote = ray.remote(fn).options(num_cpus=num_cpus, num_gpus=num_gpus)
    shared = {k: ray.put(v) for k, v in kwargs.items()}
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    window = max(2, IN_FLIGHT_PER_CPU * cpus if max_in_flight is None else max_in_flight)
    progress = Progress(name, len(items), "parts")
    total: R | None = None
    arrived: dict[int, R] = {}
    pending: dict[Any, int] = {}
    next_item = next_fold = 0
    while next_fold < len(items):
        while next_item < len(items) and len(pending) + len(arrived) < window:
            pending[remote.remote(items[next_item], **shared)] = next_item
            next_item += 1
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            arrived[pending.pop(ref)] = ray.get(ref)
            progress.update(1)
        while next_fold in arrived:
            result = arrived.pop(next_fold)
            total = result if total is None else combine(total, result)
            next_fold += 1
    progress.close()
    return total


class Fanout(Protocol):
    """How a driver runs its per-part passes: `RayFanout` in stages, `LocalFanout` in tests."""

    def map(self, fn: Callable[..., R], items: Sequence[T], *, name: str, **kwargs: Any) -> list[R]: ...

    def fold(
        self,
        fn: Callable[..., R],
        items: Sequence[T],
        combine: Callable[[R, R], R],
        *,
        name: str,
        **kwargs: Any,
    ) -> R | None: ...

    def one_place(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R: ...

    def gpu_task_options(self) -> dict[str, float]: ...


GPUS_PER_TASK = 0.25  # a GPU task pass (k-means assignment) shares each GPU among a few tasks


class RayFanout:
    """Per-part passes on Ray tasks (what stages use): `map` = `run_tasks`, `fold` = `fold_tasks`,
    and `one_place` runs a capped step (a k-means fit) on a GPU worker when the cluster has GPUs
    and this process has none, else right here."""

    def gpu_task_options(self) -> dict[str, float]:
        """Task options of a pass that a GPU speeds up: a share of a GPU when the cluster has any."""
        import ray

        return {"num_gpus": GPUS_PER_TASK} if ray.cluster_resources().get("GPU", 0) >= 1 else {}

    def map(self, fn: Callable[..., R], items: Sequence[T], *, name: str, **kwargs: Any) -> list[R]:
        return run_tasks(fn, items, name=name, **kwargs)

    def fold(
        self,
        fn: Callable[..., R],
        items: Sequence[T],
        combine: Callable[[R, R], R],
        *,
        name: str,
        **kwargs: Any,
    ) -> R | None:
        return fold_tasks(fn, items, combine, name=name, **kwargs)

    def one_place(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        import ray

        from lvd.curation.knn import use_gpu

        if not use_gpu() and ray.cluster_resources().get("GPU", 0) >= 1:
            return ray.get(ray.remote(fn).options(num_gpus=1).remote(*args, **kwargs))
        return fn(*args, **kwargs)


class LocalFanout:
    """The same passes in this process, one item after the other (tests, tools without Ray)."""

    def gpu_task_options(self) -> dict[str, float]:
        return {}

    def map(self, fn: Callable[..., R], items: Sequence[T], *, name: str, **kwargs: Any) -> list[R]:
        kwargs = {k: v for k, v in kwargs.items() if k not in _TASK_OPTIONS}
        return [fn(item, **kwargs) for item in items]

    def fold(
        self,
        fn: Callable[..., R],
        items: Sequence[T],
        combine: Callable[[R, R], R],
        *,
        name: str,
        **kwargs: Any,
    ) -> R | None:
        total = None
        for result in self.map(fn, items, name=name, **kwargs):
            total = result if total is None else combine(total, result)
        return total

    def one_place(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        return fn(*args, **kwargs)


_TASK_OPTIONS = ("num_cpus", "num_gpus", "memory", "rows", "unit", "total_rows", "max_in_flight")
