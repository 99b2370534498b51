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
import torch

from lvd.curation.seeded import KNN_RECALL_SAMPLE, KNN_TRAIN_SAMPLE, keyed_uniform
from lvd.embeddings.hardware import cpu_has_native_bf16
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


def training_size(
    factory_index: faiss.Index, n: int, requested: int | None = None, per_list: int = 40
) -> int:
    """Vectors to train an index from the factory on: `requested`, by default `per_list` per IVF list
    and at least 50k; at most n. Grows with the number of lists, not with n."""
    ivf = faiss.try_extract_index_ivf(factory_index)
    nlist = ivf.nlist if ivf is not None else 0
    size = min(n, requested or max(50_000, per_list * nlist))
    if size < nlist:
        raise ValueError(f"an index with {nlist} lists needs at least {nlist} training vectors, got {size}")
    if size < min(39, per_list) * nlist:
        log.warning("faiss: training %d lists on %d vectors (< 39 per list); recall may suffer", nlist, size)
    return size


@dataclass(frozen=True)
class IndexInfo:
    exact: bool
    description: str
    trained_on: int


def without_refine(factory: str) -> str:
    """The factory string less a trailing exact re-ranking stage (",RFlat", ",Refine(...)")."""
    parts = factory.split(",")
    while len(parts) > 1 and (parts[-1] == "RFlat" or parts[-1].startswith("Refine")):
        parts.pop()
    return ",".join(parts)


TABLE_TRAIN_PER_LIST = 20  # training vectors per IVF list of each of several tables
PROBE_CHUNK = 16_384  # queries per coarse-score matmul: bounds its (queries x lists) scores


class IndexTables:
    """Several IVF indexes over the same rows, each with its own coarse partition (trained on its own
    keyed sample), searched together and re-ranked by the exact inner product.

    Why: within a dense, nearly isotropic cloud of images an IVF partition splits many moderately
    similar pairs, and which pairs it splits depends on the partition. A copy that one partition puts
    in a list its original's query does not probe is usually probed in another, so T tables with
    nprobe lists each find far more of the pairs above a copy threshold than one table with T x nprobe
    (measured in `benchmarks/curation.py`). Each table's lists are chosen from the coarse scores of a
    bf16 matmul (float32 without native bf16), once per query chunk; each table returns its k best by
    its code estimate, and the union is ranked by the exact inner product with the float32 rows.
    """

    def __init__(self, indexes: list[faiss.Index], vectors: np.ndarray, nprobe: int):
        for index in indexes:
            index.nprobe = min(nprobe, index.nlist)
        self.indexes = indexes
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # the rows, for re-ranking
        self.nprobe = nprobe
        dtype = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
        self._centroids = [
            torch.from_numpy(_ivf_centroids(index)).to(dtype).T.contiguous() for index in indexes
        ]

    @property
    def ntotal(self) -> int:
        return int(self.vectors.shape[0])

    def _probes(self, table: int, xq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(coarse scores, list numbers) of each query's `nprobe` best lists in one table."""
        weights = self._centroids[table]
        nprobe = self.indexes[table].nprobe
        scores, lists = [], []
        for start in range(0, xq.shape[0], PROBE_CHUNK):
            rows = torch.from_numpy(xq[start : start + PROBE_CHUNK]).to(weights.dtype)
            top = (rows @ weights).float().topk(nprobe, dim=1)
            scores.append(top.values.numpy())
            lists.append(top.indices.numpy().astype(np.int64))
        return np.concatenate(scores), np.concatenate(lists)

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(inner products, row numbers) of each query's k best rows among every table's k best,
        by exact inner product, descending (ties by row number); -1 where fewer were found."""
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        m = xq.shape[0]
        found = []
        for table, index in enumerate(self.indexes):
            dis, lists = self._probes(table, xq)
            found.append(index.search_preassigned(xq, k, lists, dis)[1])
        ids = np.sort(np.concatenate(found, axis=1), axis=1)
        ids[:, 1:][ids[:, 1:] == ids[:, :-1]] = -1  # a row found by several tables counts once
        sims = np.full(ids.shape, -np.inf, dtype=np.float32)
        valid = ids >= 0
        safe = np.where(valid, ids, 0)
        faiss.fvec_inner_products_by_idx(
            faiss.swig_ptr(sims),
            faiss.swig_ptr(xq),
            faiss.swig_ptr(self.vectors),
            faiss.swig_ptr(safe),
            xq.shape[1],
            m,
            ids.shape[1],
        )
        sims[~valid] = -np.inf
        key = np.where(valid, -sims.astype(np.float64), np.inf)
        order = np.lexsort((np.where(valid, ids, np.iinfo(np.int64).max), key), axis=-1)[:, :k]
        sims, ids = np.take_along_axis(sims, order, axis=1), np.take_along_axis(ids, order, axis=1)
        missing = ~np.isfinite(sims)
        sims[missing], ids[missing] = -np.inf, -1
        return sims, ids


def _ivf_centroids(index: faiss.Index) -> np.ndarray:
    return index.quantizer.reconstruct_n(0, index.nlist)


def empty_table(factory: str, dim: int, table: int, nprobe: int) -> faiss.IndexIVF:
    """Table `table`'s untrained index: `factory` less its re-ranking stage (`IndexTables` re-ranks),
    probing `nprobe` lists, with its own k-means start (so tables differ even on the same rows)."""
    index = faiss.index_factory(dim, without_refine(factory), faiss.METRIC_INNER_PRODUCT)
    if not isinstance(index, faiss.IndexIVF):
        raise ValueError(f"index tables need an IVF index without a transform, got {factory!r}")
    index.nprobe = min(nprobe, index.nlist)
    index.cp.seed += table
    return index


def table_training_size(index: faiss.Index, n: int, requested: int | None = None) -> int:
    # Half the vectors per list one index trains on: a table's partition need not be the best one,
    # only different from the others', and training is a large share of a table's cost.
    return training_size(index, n, requested, per_list=TABLE_TRAIN_PER_LIST)


def fill_tables(trained: list[faiss.Index], xb: np.ndarray, nprobe: int) -> IndexTables:
    """`IndexTables` over the rows of `xb` from trained empty tables (`empty_table`)."""
    for index in trained:
        for start in range(0, xb.shape[0], ADD_CHUNK):
            index.add(np.ascontiguousarray(xb[start : start + ADD_CHUNK]))
    return IndexTables(trained, xb, nprobe)


def build_tables(
    xb: np.ndarray,
    factory: str,
    tables: int,
    *,
    nprobe: int,
    ids: np.ndarray | None,
    seed: int,
    train_size: int | None = None,
) -> tuple[IndexTables, int]:
    """`tables` IVF indexes of `factory` over the rows of `xb` (`IndexTables`), table t trained on the
    keyed sample of seed `seed + t` (table 0 on the rows one index trains on, if as many). Returns
    (the tables, training rows per table)."""
    n, d = xb.shape
    trained, size = [], 0
    for table in range(tables):
        index = empty_table(factory, d, table, nprobe)
        size = table_training_size(index, n, train_size)
        if ids is not None:
            sample = keyed_sample(ids, size, seed + table, KNN_TRAIN_SAMPLE)
        else:
            rng = np.random.default_rng(seed + table)
            sample = np.sort(rng.choice(n, size=size, replace=False)) if size < n else slice(None)
        index.train(np.ascontiguousarray(xb[sample]))
        trained.append(index)
    return fill_tables(trained, xb, nprobe), size


def build_index(
    xb: np.ndarray,
    *,
    factory: str = DEDUP_DEFAULTS.index,
    exact_below: int = 1_000_000,
    nprobe: int = DEDUP_DEFAULTS.nprobe,
    train_size: int | None = None,
    seed: int = 0,
    ids: np.ndarray | None = None,
    tables: int = 1,
) -> tuple[faiss.Index | IndexTables, IndexInfo]:
    """An inner-product index over the rows of `xb` (already L2-normalised float32).

    Exact (flat) below `exact_below` rows; else `factory` ("auto": `auto_index` for this device), trained on a sample of `train_size` rows
    (default: 40 per IVF list, at least 50k) and filled in chunks. With `ids` (the image_id of each
    row) the sample is the keyed one a sharded build draws (`keyed_sample`), so both train alike;
    without, a random sample. `tables` > 1: that many IVF indexes on the CPU (`IndexTables`).
    """
    n, d = xb.shape
    if n >= exact_below and tables > 1:
        factory = resolve_index(factory, n, d, gpu=False)
        index, size = build_tables(
            xb, factory, tables, nprobe=nprobe, ids=ids, seed=seed, train_size=train_size
        )
        return index, IndexInfo(False, f"{tables} x {without_refine(factory)}", size)
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
