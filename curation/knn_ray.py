"""kNN search spread over Ray actors (DESIGN.md sec. 5): each actor holds one copy of the index and
searches whole query chunks, so results equal the in-process `curation.knn.search_chunks`.

The index crosses the object store once, serialised to a uint8 array; every actor deserialises it
(and moves it to its GPU when FAISS sees one). Chunks go round-robin with at most a few per actor in
flight and come back in query order, so driver memory stays bounded like the in-process search.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Container, Iterator

import faiss
import numpy as np

from lvd.curation.knn import _set_nprobe, _to_gpu, search, search_chunks, use_gpu

log = logging.getLogger("lvd")

IN_FLIGHT_PER_ACTOR = 2  # one chunk searching, one queued: actors never wait on the driver


class _SearchActor:
    """Holds a deserialised copy of the index; searches query chunks with it."""

    def __init__(self, index_bytes: np.ndarray, nprobe: int | None):
        index = faiss.deserialize_index(index_bytes)
        if faiss.get_num_gpus() > 0:
            index = _to_gpu(index)
        if nprobe is not None:
            _set_nprobe(index, nprobe)
        self.index = index

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(np.ascontiguousarray(xq), k)


def ray_ready() -> bool:
    """Whether Ray is imported and initialised in this process (no import when it is not installed)."""
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def _serialize(index: faiss.Index) -> np.ndarray:
    if use_gpu():
        index = faiss.index_gpu_to_cpu(index)  # GPU indexes cannot be serialised; CPU ones are cloned
    return faiss.serialize_index(index)


def search_chunks_parallel(
    index: faiss.Index,
    xq: np.ndarray,
    k: int,
    chunk_size: int = 65_536,
    n_actors: int = 2,
    nprobe: int | None = None,
    skip: Container[int] = (),
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Like `search_chunks`, with the chunks searched by `n_actors` Ray actors (Ray must be up).

    `nprobe` None keeps the index's own setting (it travels with the serialised index).
    """
    import ray

    if n_actors < 1:
        raise ValueError(f"n_actors must be >= 1, got {n_actors}")
    k = min(k, index.ntotal)
    n = xq.shape[0]
    starts = [start for start in range(0, n, chunk_size) if start not in skip]
    n_actors = min(n_actors, len(starts))
    if n_actors == 0:
        return
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0) > 0
    # Actors beyond the cluster's size would never start and their chunks would wait forever.
    fits = int(resources.get("GPU" if gpus else "CPU", 0))
    if n_actors > fits:
        log.warning("knn: %d search actors asked for, the cluster fits %d; using %d", n_actors, fits, fits)
        n_actors = max(fits, 1)
    actor_cls = ray.remote(_SearchActor).options(num_cpus=1, num_gpus=1 if gpus else 0)
    index_ref = ray.put(_serialize(index))
    actors = [actor_cls.remote(index_ref, nprobe) for _ in range(n_actors)]
    del index_ref  # the actors hold it until they have deserialised it
    pending: deque[tuple[int, ray.ObjectRef]] = deque()
    try:
        for j, start in enumerate(starts):
            if len(pending) >= IN_FLIGHT_PER_ACTOR * n_actors:
                first, ref = pending.popleft()
                sims, ids = ray.get(ref)
                yield first, sims, ids
            chunk = np.ascontiguousarray(xq[start : start + chunk_size])
            pending.append((start, actors[j % n_actors].search.remote(chunk, k)))
        while pending:
            first, ref = pending.popleft()
            sims, ids = ray.get(ref)
            yield first, sims, ids
    finally:
        for actor in actors:  # free their CPUs/GPUs now rather than at garbage collection
            ray.kill(actor)


def search_parallel(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    chunk_size: int = 65_536,
    n_actors: int = 2,
    nprobe: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, ids) of all queries, in query order, searched by Ray actors.

    Identical to `curation.knn.search` with the same `chunk_size`.
    """
    k = min(k, index.ntotal)
    if queries.shape[0] == 0 or k == 0:
        return np.zeros((queries.shape[0], k), np.float32), np.zeros((queries.shape[0], k), np.int64)
    parts = list(search_chunks_parallel(index, queries, k, chunk_size, n_actors, nprobe))
    return np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])


def search_chunks_auto(
    index: faiss.Index,
    xq: np.ndarray,
    k: int,
    chunk_size: int = 65_536,
    n_actors: int = 0,
    nprobe: int | None = None,
    skip: Container[int] = (),
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Ray actors when `n_actors` > 0 and Ray is initialised, else the in-process search."""
    if n_actors > 0 and ray_ready():
        return search_chunks_parallel(index, xq, k, chunk_size, n_actors, nprobe, skip)
    if n_actors > 0:
        log.warning(
            "knn: %d search actors asked for but Ray is not initialised; searching in-process", n_actors
        )
    return search_chunks(index, xq, k, chunk_size, skip)


def search_auto(
    index: faiss.Index,
    xq: np.ndarray,
    k: int,
    chunk_size: int = 65_536,
    n_actors: int = 0,
    nprobe: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`search_parallel` when `n_actors` > 0 and Ray is initialised, else `curation.knn.search`."""
    if n_actors > 0 and ray_ready():
        return search_parallel(index, xq, k, chunk_size, n_actors, nprobe)
    if n_actors > 0:
        log.warning(
            "knn: %d search actors asked for but Ray is not initialised; searching in-process", n_actors
        )
    return search(index, xq, k, chunk_size)
