"""FAISS nearest-neighbour search on L2-normalised vectors (inner product = cosine).

Small sets get an exact flat index; from `exact_below` vectors up, the index comes from a factory
string (IVF by default), trained on a sample and filled in chunks. Searches run in query chunks so
memory is bounded by `chunk_size` rows of results, never N x N. Indexes move to all GPUs when FAISS
sees any.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Container, Iterator
from dataclasses import dataclass

import faiss
import numpy as np

from lvd.curation.seeded import KNN_RECALL_SAMPLE, KNN_TRAIN_SAMPLE, keyed_uniform
from lvd.schemas.job_spec import DedupSpec

# One source of truth for defaults: the job spec (these functions are also called directly).
DEDUP_DEFAULTS = DedupSpec()

log = logging.getLogger("lvd")

ADD_CHUNK = 262_144  # vectors per index.add call: bounds the temporary copies FAISS makes


def use_gpu() -> bool:
    return faiss.get_num_gpus() > 0


AUTO_INDEX = "auto"
# Parts of a factory string FAISS has no GPU version of: fast-scan PQ (`x4fs`), refinement wrappers and
# HNSW storage. An index holding one stays on the CPU even on a GPU node.
_CPU_ONLY = ("fs", "RFlat", "Refine", "HNSW")


def runs_on_gpu(factory: str) -> bool:
    """Whether FAISS can move an index built from `factory` to a GPU."""
    return not any(part in factory for part in _CPU_ONLY)


def _pq_width(dim: int) -> int:
    """Sub-quantizers for fast-scan PQ: the most of 64, 32, 16, 8 that divide `dim` (4 bits each)."""
    return next((m for m in (64, 32, 16, 8) if dim % m == 0), 0)


def auto_index(n: int, dim: int, gpu: bool) -> str:
    """The default factory string for `n` vectors of width `dim` on a CPU or a GPU.

    IVF lists: about 2 sqrt(n) up to a million vectors (FAISS's rule of thumb, and the set-up
    benchmarked here at 1M), then about one list per 500 vectors, so a probe scans the same short
    lists as the pool grows. The cap bounds the training set (40 vectors per list) and its k-means:
    GPUs train more lists than CPUs can. Past 16k lists an HNSW graph finds the lists to probe.
    Codes on a CPU: fast-scan PQ with an exact float re-ranking of the candidates (`RFlat`). On a
    GPU, FAISS has neither: 8-bit scalar codes (`SQ8`), a quarter of the float memory, with cosines
    close enough to the float ones for a copy threshold.
    """
    n = max(n, 1)
    cap = 262_144 if gpu else 65_536
    nlist = int(min(max(2 ** round(math.log2(max(2 * math.sqrt(n), n / 500))), 256), cap))
    if gpu:
        return f"IVF{nlist},SQ8"
    coarse = f"IVF{nlist}_HNSW32" if nlist > 16_384 else f"IVF{nlist}"
    m = _pq_width(dim)
    return f"{coarse},PQ{m}x4fs,RFlat" if m else f"{coarse},SQ8"


def resolve_index(factory: str, n: int, dim: int, gpu: bool) -> str:
    """`factory` as given, or the device's default for "auto"; warns when a given one cannot use the
    GPU of a GPU node."""
    if factory == AUTO_INDEX:
        return auto_index(n, dim, gpu)
    if gpu and not runs_on_gpu(factory):
        log.warning("faiss: index %r has no GPU version; it runs on the CPU of a GPU node", factory)
    return factory


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm as a C-contiguous float32 array (zero rows stay zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.maximum(norms, 1e-12, out=norms)
    return np.ascontiguousarray(x / norms, dtype=np.float32)


def _to_gpu(index: faiss.Index) -> faiss.Index:
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError) as err:  # index types without a GPU version stay on CPU
        log.warning("faiss: keeping index on CPU (%s)", err)
        return index


def _set_nprobe(index: faiss.Index, nprobe: int) -> None:
    # The GPU parameter space also reaches into GPU indexes (and falls back for CPU ones).
    space = faiss.GpuParameterSpace() if use_gpu() else faiss.ParameterSpace()
    try:
        space.set_index_parameter(index, "nprobe", nprobe)
    except RuntimeError:
        pass  # no nprobe on this index type (e.g. flat)


def keyed_sample(ids: np.ndarray, size: int, seed: int, stream: int) -> np.ndarray:
    """Positions of the `size` rows with the smallest keyed draw, in image_id order.

    The draw is a function of the image id only, so the same rows are chosen from any split of the
    data into parts or shards (see `curation.knn_sharded`)."""
    ids = np.asarray(ids, dtype=np.int64)
    if size >= ids.size:
        return np.argsort(ids, kind="stable")
    keys = keyed_uniform(ids, seed, stream)
    chosen = np.lexsort((ids, keys))[:size]
    return chosen[np.argsort(ids[chosen], kind="stable")]


def training_size(factory_index: faiss.Index, n: int, requested: int | None = None) -> int:
    """Vectors to train an index from the factory on: `requested`, by default 40 per IVF list and
    at least 50k; at most n. Grows with the number of lists, not with n."""
    ivf = faiss.try_extract_index_ivf(factory_index)
    nlist = ivf.nlist if ivf is not None else 0
    size = min(n, requested or max(50_000, 40 * nlist))
    if size < nlist:
        raise ValueError(f"an index with {nlist} lists needs at least {nlist} training vectors, got {size}")
    if size < 39 * nlist:
        log.warning("faiss: training %d lists on %d vectors (< 39 per list); recall may suffer", nlist, size)
    return size


@dataclass(frozen=True)
class IndexInfo:
    exact: bool
    description: str
    trained_on: int


def build_index(
    xb: np.ndarray,
    *,
    factory: str = DEDUP_DEFAULTS.index,
    exact_below: int = 1_000_000,
    nprobe: int = DEDUP_DEFAULTS.nprobe,
    train_size: int | None = None,
    seed: int = 0,
    ids: np.ndarray | None = None,
) -> tuple[faiss.Index, IndexInfo]:
    """An inner-product index over the rows of `xb` (already L2-normalised float32).

    Exact (flat) below `exact_below` rows; else `factory` ("auto": `auto_index` for this device), trained on a sample of `train_size` rows
    (default: 40 per IVF list, at least 50k) and filled in chunks. With `ids` (the image_id of each
    row) the sample is the keyed one a sharded build draws (`keyed_sample`), so both train alike;
    without, a random sample.
    """
    n, d = xb.shape
    if n < exact_below:
        index: faiss.Index = faiss.IndexFlatIP(d)
        info = IndexInfo(True, "Flat", 0)
    else:
        factory = resolve_index(factory, n, d, use_gpu())
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        size = training_size(index, n, train_size)
        if ids is not None:
            sample = keyed_sample(ids, size, seed, KNN_TRAIN_SAMPLE)
        else:
            rng = np.random.default_rng(seed)
            sample = np.sort(rng.choice(n, size=size, replace=False)) if size < n else slice(None)
        info = IndexInfo(False, factory, size)
        if use_gpu():
            index = _to_gpu(index)
        index.train(np.ascontiguousarray(xb[sample]))
    if info.exact and use_gpu():
        index = _to_gpu(index)
    for start in range(0, n, ADD_CHUNK):
        index.add(np.ascontiguousarray(xb[start : start + ADD_CHUNK]))
    _set_nprobe(index, nprobe)
    return index, info


def search_chunks(
    index: faiss.Index, xq: np.ndarray, k: int, chunk_size: int = 65_536, skip: Container[int] = ()
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first query row, similarities, neighbour ids) per chunk of `chunk_size` queries, except the
    chunks whose first row is in `skip` (done by an earlier, interrupted run)."""
    k = min(k, index.ntotal)
    for start in range(0, xq.shape[0], chunk_size):
        if start in skip:
            continue
        sims, ids = index.search(np.ascontiguousarray(xq[start : start + chunk_size]), k)
        yield start, sims, ids


def search(
    index: faiss.Index, xq: np.ndarray, k: int, chunk_size: int = 65_536
) -> tuple[np.ndarray, np.ndarray]:
    """All results at once (for query sets whose k results fit in memory)."""
    k = min(k, index.ntotal)
    if xq.shape[0] == 0 or k == 0:
        return np.zeros((xq.shape[0], k), np.float32), np.zeros((xq.shape[0], k), np.int64)
    parts = list(search_chunks(index, xq, k, chunk_size))
    return np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])


def exact_knn(xq: np.ndarray, xb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product kNN (FAISS blocks it, so no len(xq) x len(xb) matrix is kept)."""
    return faiss.knn(
        np.ascontiguousarray(xq), np.ascontiguousarray(xb), min(k, xb.shape[0]), faiss.METRIC_INNER_PRODUCT
    )


def edge_recall(
    exact_sims: np.ndarray,
    exact_ids: np.ndarray,
    approx_ids: np.ndarray,
    query_ids: np.ndarray,
    threshold: float | None,
) -> float | None:
    """Recall of an approximate search against the exact one for the same queries.

    With `threshold`: the share of exact neighbour pairs (self excluded, `query_ids` being the
    queries' own ids) with similarity above it that the approximate search also returns, i.e. the
    recall of graph edges; None when there are none. Without: the share of the exact top-k ids that
    it returns.
    """
    found = (exact_ids[:, :, None] == approx_ids[:, None, :]).any(axis=2)
    if threshold is None:
        return float(found.mean())
    edges = (exact_sims > threshold) & (exact_ids != np.asarray(query_ids)[:, None]) & (exact_ids >= 0)
    if not edges.any():
        return None
    return float(found[edges].mean())


def recall_against_exact(
    index: faiss.Index,
    xb: np.ndarray,
    k: int,
    *,
    threshold: float | None = None,
    sample_size: int = 1000,
    seed: int = 0,
    ids: np.ndarray | None = None,
) -> float | None:
    """Recall of `index` against brute force, for a sample of the indexed rows as queries (see
    `edge_recall`). With `ids` (each row's image_id) the sample is the keyed one a sharded search
    draws; without, a random one.
    """
    n = xb.shape[0]
    if ids is not None:
        rows = keyed_sample(ids, sample_size, seed, KNN_RECALL_SAMPLE)
    else:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(n, size=min(sample_size, n), replace=False))
    xq = xb[rows]
    exact_s, exact_i = exact_knn(xq, xb, k)
    _, approx_i = index.search(np.ascontiguousarray(xq), exact_i.shape[1])
    return edge_recall(exact_s, exact_i, approx_i, rows, threshold)
