"""kNN search on Ray.

`search_parts`: the sharded search that scales with the cluster. The database is split over shard
actors that read their own vector parts; a task per query part reads its queries, asks every shard
and writes its own results; the driver only plans and holds per-part counts. The plain pieces
(what a shard, a query part and a writer do) are in `curation.knn_sharded`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from lvd.curation.knn import (
    edge_recall,
    empty_table,
    resolve_index,
    runs_on_gpu,
    table_training_size,
    training_size,
    without_refine,
)
from lvd.curation.knn_sharded import (
    PartWriter,
    Shard,
    VectorPart,
    merge_topk,
    pick_sample,
    sample_threshold,
    search_vector_part,
    train_index,
)
from lvd.curation.seeded import KNN_RECALL_SAMPLE, KNN_TRAIN_SAMPLE
from lvd.schemas import layout
from lvd.schemas.job_spec import SearchSpec
from lvd.schemas.tables import write_json_atomic

log = logging.getLogger("lvd")

KEYED_SEED = 0  # seed of the keyed training and recall samples
RECALL_SAMPLE = 1000  # queries of the IVF recall check
# Database vectors (by the parts' row counts) up to which a CPU cluster's search, with the shard
# count left to lvd, runs in one task that holds the whole flat index: starting shard actors (a new
# process each, FAISS and lvd imported) costs more than such a search.
ONE_TASK_ROWS = 1 << 16


@dataclass
class SearchResult:
    """What a sharded search did; per-part detail stays in the result parts."""

    queries: int  # query vectors searched (with those of parts an earlier run wrote)
    rows: int  # result rows written
    database: int  # database vectors
    shards: int  # database shards (one task or shard actors; 0: every part was written by an earlier run)
    exact: bool  # flat index (else `index`)
    index: str  # the factory string that ran ("Flat" when exact)
    device: str  # where the shards searched: "gpu" or "cpu"
    recall: float | None  # IVF recall against exact search on a sample; None when exact or not asked
    resumed_parts: int  # query parts an earlier run had written


def _shard_count(search: SearchSpec, n_parts: int, gpus: int, nodes: int) -> int:
    """`search.search_actors` shards when set, else one per GPU on a GPU cluster and one per node on
    a CPU cluster; never more than parts, nor more GPU shards than GPUs."""
    want = search.search_actors or (gpus or nodes)
    if gpus and want > gpus:
        log.warning("knn: %d shard actors asked for, the cluster has %d GPUs; using %d", want, gpus, gpus)
        want = gpus
    return max(1, min(want, n_parts))


def _resources(n_shards: int, gpus: int, node_cpus: list[float]) -> tuple[dict[str, Any], float]:
    """(shard actor options, CPUs per query task). On a CPU cluster the shards of a node share it
    with one query task's worth of CPUs: a shard's FAISS gets as many threads as it reserves CPUs
    (Ray sets OMP_NUM_THREADS so), and query tasks, which mostly wait on the shards, always fit."""
    if gpus:
        return {"num_cpus": 1, "num_gpus": 1, "scheduling_strategy": "SPREAD"}, 1.0
    cpus = min(node_cpus) if node_cpus else 1.0
    per_node = -(-n_shards // max(1, len(node_cpus)))
    actor_cpus = cpus / (per_node + 1)
    if actor_cpus >= 1:
        actor_cpus = float(int(actor_cpus))
    task_cpus = min(1.0, cpus - per_node * actor_cpus)
    return {"num_cpus": actor_cpus, "scheduling_strategy": "SPREAD"}, task_cpus


def _merged(actors: list, method: str, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every shard's answer for the queries, merged (shards answer in any order; the merge is a sort)."""
    import ray

    ref = ray.put(np.ascontiguousarray(xq))
    pending = [getattr(a, method).remote(ref, k) for a in actors]
    merged = (np.zeros((xq.shape[0], 0), np.float32), np.zeros((xq.shape[0], 0), np.int64))
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        merged = merge_topk([merged, ray.get(done[0])], k)
    return merged


def _keyed_sample(actors: list, size: int, n: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
    """The keyed sample of `size` database rows, gathered from the shards (small: for the recall check)."""
    import ray

    slack = 1.0
    while True:
        bound = sample_threshold(size, n, slack)
        parts = ray.get([a.candidates.remote(KEYED_SEED, stream, bound) for a in actors])
        ids = np.concatenate([p[0] for p in parts])
        if ids.size >= min(size, n):
            keys = np.concatenate([p[1] for p in parts])
            return pick_sample(ids, keys, np.concatenate([p[2] for p in parts]), size)
        slack *= 4


def _train(actors: list, factory: str, dim: int, n: int, table: int | None = None, nprobe: int = 1) -> Any:
    """The trained empty index (an object ref), trained by the first shard (on its GPU when it has
    one) on the keyed sample the shards send it: neither the sample nor the index passes through
    the driver. `table`: that table of an `IndexTables`, on the keyed sample of seed KEYED_SEED + table
    (as `curation.knn.build_tables` draws it)."""
    import ray

    if table is None:
        seed, size = (
            KEYED_SEED,
            training_size(faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT), n),
        )
    else:
        seed, size = KEYED_SEED + table, table_training_size(empty_table(factory, dim, table, nprobe), n)
    slack = 1.0
    while True:
        bound = sample_threshold(size, n, slack)
        candidates = [a.candidates.remote(seed, KNN_TRAIN_SAMPLE, bound) for a in actors]
        enough, trained = (
            actors[0]
            .train.options(num_returns=2)
            .remote(factory, dim, size, *candidates, table=table, nprobe=nprobe)
        )
        if ray.get(enough):
            return trained
        slack *= 4  # fewer candidates than the sample needs (rare): widen the bound


class _ShardActor(Shard):
    """A shard on a Ray actor."""

    def train(
        self, factory: str, dim: int, size: int, *candidates, table: int | None = None, nprobe: int = 1
    ) -> tuple[bool, np.ndarray | None]:
        """(whether the candidates held the whole sample, the trained index) for two object refs."""
        trained = train_index(factory, dim, size, candidates, table, nprobe)
        return trained is not None, trained

    def build(self, trained: Any, nprobe: int) -> int:
        """`Shard.build`; the trained tables of an `IndexTables` come as a list of object refs (Ray
        resolves only refs passed as arguments themselves), fetched here, not through the driver."""
        if isinstance(trained, list):
            import ray

            trained = ray.get(trained)
        return super().build(trained, nprobe)


def _start_shards(
    database_parts: Sequence[VectorPart],
    k: int,
    search: SearchSpec,
    exclude_ids: np.ndarray | None,
    recall_threshold: float | None,
    check_recall: bool,
) -> tuple[list, dict[str, Any], float]:
    """Shard actors with their indexes built; (actors, state, CPUs per query task)."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    node_cpus = [node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")]
    node_cpus = [cpu for cpu in node_cpus if cpu > 0]
    n_shards = _shard_count(search, len(database_parts), gpus, len(node_cpus))
    options, task_cpus = _resources(n_shards, gpus, node_cpus)
    groups = [g for g in np.array_split(np.arange(len(database_parts)), n_shards) if g.size]
    exclude_ref = ray.put(exclude_ids) if exclude_ids is not None else None
    actor_cls = ray.remote(_ShardActor).options(**options)
    actors = [actor_cls.remote([database_parts[i] for i in g], exclude_ref) for g in groups]
    shapes = ray.get([a.shape.remote() for a in actors])
    n = sum(m for m, _ in shapes)
    dims = {d for m, d in shapes if m}
    if len(dims) > 1:
        raise ValueError(f"knn: database parts hold vectors of different sizes {sorted(dims)}")
    dim = dims.pop() if dims else 0
    exact = n < search.exact_below or n < 2  # nothing to train an index on
    trained, recall, exact_answer, factory = None, None, None, "Flat"
    if not exact:
        if check_recall:  # exact answers from the raw vectors, before the build frees them
            recall_ids, xq = _keyed_sample(actors, RECALL_SAMPLE, n, KNN_RECALL_SAMPLE)
            exact_answer = _merged(actors, "exact_search", xq, k)
        if search.tables > 1:  # `IndexTables` run on the CPU
            factory = resolve_index(search.index, n, dim, gpu=False)
            trained = [_train(actors, factory, dim, n, t, search.nprobe) for t in range(search.tables)]
        else:
            factory = resolve_index(search.index, n, dim, gpu=gpus > 0)
            trained = _train(actors, factory, dim, n)
    ray.get([a.build.remote(trained, search.nprobe) for a in actors])
    if exact_answer is not None:
        _, approx_ids = _merged(actors, "search", xq, exact_answer[1].shape[1])
        recall = edge_recall(exact_answer[0], exact_answer[1], approx_ids, recall_ids, recall_threshold)
        log.info("knn: %s nprobe %d, recall vs exact on a sample: %s", factory, search.nprobe, recall)
    device = "gpu" if gpus and (exact or (runs_on_gpu(factory) and search.tables == 1)) else "cpu"
    if not exact and search.tables > 1:
        factory = f"{search.tables} x {without_refine(factory)}"
    state = {"database": n, "shards": len(actors), "exact": exact, "recall": recall, "index": factory}
    state["device"] = device
    log.info("knn: %d database vectors on %d shard actors, index %s on %s", n, len(actors), factory, device)
    return actors, state, task_cpus


def _search_query_part(
    item: tuple[int, VectorPart],
    *,
    shards: list,
    k: int,
    chunk_size: int,
    write: PartWriter,
    exclude_ids: np.ndarray | None,
) -> tuple[int, int]:
    """A query part's task: its queries go to every shard, the merged top-k to its result part."""
    index, part = item
    return search_vector_part(
        index, part, lambda xq: _merged(shards, "search", xq, k), write, chunk_size, exclude_ids
    )


def _one_task_search(
    items: list[tuple[int, VectorPart]],
    *,
    database_parts: Sequence[VectorPart],
    k: int,
    chunk_size: int,
    write: PartWriter,
    exclude_ids: np.ndarray | None,
) -> tuple[int, list[tuple[int, int]]]:
    """A small search in one task: the whole database in one flat shard, every query part searched
    and written as its own task would. Returns (database vectors, (queries, rows) per query part)."""
    shard = Shard(database_parts, exclude_ids)
    n, _ = shard.shape()
    shard.build(None, 1)
    counts = [
        search_vector_part(i, part, lambda xq: shard.search(xq, k), write, chunk_size, exclude_ids)
        for i, part in items
    ]
    return n, counts


def _fits_one_task(database_parts: Sequence[VectorPart], search: SearchSpec) -> bool:
    """Whether `search_parts` runs in one task: a CPU cluster, shard count left to lvd, and a
    database (read from the parts' footers) small enough for a flat index."""
    import pyarrow.parquet as pq
    import ray

    if search.search_actors or ray.cluster_resources().get("GPU", 0):
        return False
    rows = sum(pq.read_metadata(p.vectors).num_rows for p in database_parts)
    return rows <= ONE_TASK_ROWS and rows < search.exact_below


def search_parts(
    query_parts: Sequence[VectorPart],
    database_parts: Sequence[VectorPart],
    k: int,
    search: SearchSpec,
    *,
    write: PartWriter,
    exclude_ids: np.ndarray | None = None,
    recall_threshold: float | None = None,
    check_recall: bool = True,
    name: str = "knn",
) -> SearchResult:
    """The k nearest database vectors of every query vector, searched on Ray (Ray must be up).

    query_parts / database_parts: `VectorPart`s (an embed part, optionally limited to the images
      listed in a parquet file); query part i's results go to `write.output(i)`.
    k: neighbours per query (fewer when the database is smaller). A query that is also in the
      database finds itself (writers such as `EdgeWriter` drop self pairs; ask for k + 1).
    search: the search section of the spec. Flat (exact) index below `search.exact_below` database
      vectors, else `search.index` ("auto": chosen for the pool's size and device) trained once on a keyed sample (40 per IVF list, at least 50k),
      probed with `search.nprobe`. `search.search_actors` shard actors (0: one per GPU, or one per
      node on a CPU cluster); queries go in chunks of `search.chunk_size`.
    write: a `PartWriter` (e.g. `EdgeWriter`, `TopKWriter`) turning results into rows; each query
      part's task writes its own file, atomically. Parts already written (an earlier, killed run of
      the same search) are not searched again; with all written no shard is started.
    exclude_ids: sorted image_ids left out of both queries and database (e.g. exact duplicates).
    recall_threshold / check_recall: with an IVF index, the recall against exact search for a keyed
      sample of database rows as queries (`curation.knn.edge_recall` with that threshold).

    Returns counts only; every neighbour list sorted by (similarity desc, image_id asc).
    """
    import ray

    from lvd.jobs.workers import run_tasks

    items = list(enumerate(query_parts))
    if not items:
        return SearchResult(0, 0, 0, 0, True, "Flat", "cpu", None, 0)
    state_file = write.folder / layout.SEARCH_STATE
    resumed = sum(1 for i, _ in items if write.output(i).exists())
    if resumed < len(items) and _fits_one_task(database_parts, search):
        n, counts = ray.get(
            ray.remote(_one_task_search).remote(
                items,
                database_parts=database_parts,
                k=k,
                chunk_size=search.chunk_size,
                write=write,
                exclude_ids=exclude_ids,
            )
        )
        log.info("%s: %d database vectors, searched in one task", name, n)
        return SearchResult(
            queries=sum(c[0] for c in counts),
            rows=sum(c[1] for c in counts),
            database=n,
            shards=1,
            exact=True,
            index="Flat",
            device="cpu",
            recall=None,
            resumed_parts=resumed,
        )
    actors: list = []
    task_cpus = 1.0
    try:
        if resumed < len(items) or not state_file.exists():
            actors, state, task_cpus = _start_shards(
                database_parts, k, search, exclude_ids, recall_threshold, check_recall
            )
            write_json_atomic(state_file, state)
        else:
            state = json.loads(state_file.read_text())
            state["shards"] = 0
        if resumed:
            log.info("%s: %d of %d query parts written by an earlier run", name, resumed, len(items))
        counts = run_tasks(
            _search_query_part,
            items,
            name=name,
            num_cpus=task_cpus,
            rows=lambda r: r[0],
            shards=actors,
            k=k,
            chunk_size=search.chunk_size,
            write=write,
            exclude_ids=exclude_ids,
        )
    finally:
        for actor in actors:  # free their memory, CPUs and GPUs now
            ray.kill(actor)
    return SearchResult(
        queries=sum(c[0] for c in counts),
        rows=sum(c[1] for c in counts),
        database=state["database"],
        shards=state["shards"],
        exact=state["exact"],
        index=state.get("index", "Flat" if state["exact"] else search.index),
        device=state.get("device", "cpu"),
        recall=state["recall"],
        resumed_parts=resumed,
    )
