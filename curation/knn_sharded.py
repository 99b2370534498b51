"""Sharded kNN search, the plain pieces: what one database shard, one query part and one result
writer do. The Ray fan-out (shards on actors, query parts on tasks) is `curation.knn_ray.search_parts`.

The database is split into shards, each a FAISS index over the vectors of some embed parts, with
the image_ids as the ids it answers with. A query part is searched against every shard and the
per-shard top-k lists are merged. Results do not depend on the split:
- every top-k list, per shard and merged, is ordered by (similarity descending, image_id ascending);
- an IVF index is trained once, on a keyed sample (`curation.knn.keyed_sample`: the same rows for
  any split), and copied to every shard before it adds its own vectors, so all shards share one
  quantizer and a query probes the same lists in each.
With a flat index the merged lists equal one flat index's over the whole database; with IVF,Flat
too. Quantised indexes that re-rank a candidate list (",RFlat") re-rank per shard, which may only
find more neighbours than one index would. Several tables (`search.tables`, `curation.knn.IndexTables`):
each table is trained once on its own keyed sample and copied to every shard; each shard re-ranks
the union of its tables' candidates exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from lvd.curation.knn import ADD_CHUNK, _set_nprobe, _to_gpu, empty_table, fill_tables, normalize, use_gpu
from lvd.curation.seeded import keyed_uniform
from lvd.schemas import layout
from lvd.schemas.tables import write_parquet_atomic

# The number of queries a written part answers, kept in its parquet metadata (a resumed search
# reports it without reading the part).
QUERIES_KEY = b"lvd.queries"


@dataclass(frozen=True)
class VectorPart:
    """The vectors of one embed part, optionally only those of some of its images.

    `rows`: parquet files with an image_id column (an ingest part, a dedup part or several, a
    scratch list); only their image_ids are used, after filtering them by `where` (e.g.
    `pc.field("keep")`, or a dataset and status). None: every image of the part that has a vector.
    """

    vectors: Path
    rows: Path | tuple[Path, ...] | None = None
    where: pc.Expression | None = None


def in_sorted(values: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    """Which of `values` are in the sorted array `sorted_ids`."""
    if sorted_ids.size == 0:
        return np.zeros(values.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_ids, values), sorted_ids.size - 1)
    return sorted_ids[pos] == values


def _with_vector(part: VectorPart) -> pc.Expression:
    """The filter of the part's images that have a vector and are in its `rows`."""
    flt = ds.field("vector").is_valid()
    if part.rows is None:
        return flt
    rows = [str(p) for p in part.rows] if isinstance(part.rows, tuple) else str(part.rows)
    wanted = ds.dataset(rows, format="parquet").to_table(columns=["image_id"], filter=part.where)
    return flt & ds.field("image_id").isin(wanted["image_id"].combine_chunks())


def count_vector_part(part: VectorPart) -> int:
    """The number of the part's images that have a vector and are in its `rows`."""
    return ds.dataset(part.vectors, format="parquet").count_rows(filter=_with_vector(part))


def read_vector_part(part: VectorPart, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(image_ids sorted, L2-normalised float32 vectors) of a part: images with a vector, limited to
    the part's `rows`, without the images in `exclude` (sorted image_ids)."""
    data = ds.dataset(part.vectors, format="parquet")
    dim = data.schema.field("vector").type.list_size
    table = data.to_table(columns=["image_id", "vector"], filter=_with_vector(part)).sort_by("image_id")
    ids = table["image_id"].to_numpy()
    if exclude is not None and exclude.size:
        keep = ~in_sorted(ids, exclude)
        table, ids = table.filter(pa.array(keep)), ids[keep]
    if ids.size > 1 and (ids[1:] == ids[:-1]).any():
        raise ValueError(f"{part.vectors}: several vectors for one image")
    flat = table["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return ids, normalize(flat.reshape(-1, dim))


def sort_topk(sims: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's first k by (similarity descending, image_id ascending); missing hits (id -1) last."""
    key = np.where(ids >= 0, -sims.astype(np.float64), np.inf)
    order = np.lexsort((ids, key), axis=-1)[:, :k]
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(ids, order, axis=1)


def merge_topk(results: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """One top-k per query from several shards' (similarities, image_ids) for the same queries."""
    sims = np.concatenate([r[0] for r in results], axis=1)
    ids = np.concatenate([r[1] for r in results], axis=1)
    return sort_topk(sims, ids, min(k, sims.shape[1]))


def sample_threshold(size: int, n: int, slack: float = 1.0) -> float:
    """A keyed-draw bound under which comfortably more than `size` of `n` rows fall (slack widens it)."""
    if size >= n:
        return 1.0
    return min(1.0, size / n * (1.0 + slack * 6.0 / np.sqrt(size)) + 1.0 / n)


def pick_sample(
    ids: np.ndarray, keys: np.ndarray, vectors: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The `size` rows with the smallest (key, image_id), in image_id order: the same rows
    `curation.knn.keyed_sample` picks from the whole database, given every row with a key under
    some bound that at least `size` rows fall under."""
    chosen = np.lexsort((ids, keys))[:size]
    chosen = chosen[np.argsort(ids[chosen], kind="stable")]
    return ids[chosen], vectors[chosen]


def train_index(
    factory: str,
    dim: int,
    size: int,
    candidates: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    table: int | None = None,
    nprobe: int = 1,
) -> np.ndarray | None:
    """An empty index from `factory`, trained on the `size` keyed-sample rows picked from the shards'
    `candidates` ((ids, keys, vectors) each), serialised for the shards. None when the candidates
    hold fewer than `size` rows (the caller widens the bound and asks again). `table`: the empty
    table of that number of an `IndexTables` (`curation.knn.empty_table`), trained on the CPU."""
    ids = np.concatenate([c[0] for c in candidates])
    if ids.size < size:
        return None
    keys = np.concatenate([c[1] for c in candidates])
    vectors = np.concatenate([c[2] for c in candidates])
    _, sample = pick_sample(ids, keys, vectors, size)
    if table is not None:
        index = empty_table(factory, dim, table, nprobe)
        index.train(np.ascontiguousarray(sample))
        return faiss.serialize_index(index)
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if use_gpu():
        index = _to_gpu(index)
    index.train(np.ascontiguousarray(sample))
    if use_gpu():
        index = faiss.index_gpu_to_cpu(index)
    return faiss.serialize_index(index)


class Shard:
    """One shard of the database: first the raw vectors of its parts (for the training sample and
    exact answers), then, after `build`, a FAISS index over them and the raw vectors gone."""

    def __init__(self, parts: Sequence[VectorPart], exclude: np.ndarray | None = None):
        self._raw: list[tuple[np.ndarray, np.ndarray]] = []
        self.dim = 0
        for part in parts:
            self._add_raw(*read_vector_part(part, exclude), source=str(part.vectors))
        self.ids = np.concatenate([r[0] for r in self._raw]) if self._raw else np.zeros(0, np.int64)
        self.index: faiss.Index | None = None

    @classmethod
    def from_vectors(cls, ids: np.ndarray, vectors: np.ndarray) -> Shard:
        """A shard over vectors already in memory (L2-normalised float32, one image_id per row)."""
        shard = cls([])
        shard._add_raw(np.asarray(ids, dtype=np.int64), vectors, source="vectors")
        shard.ids = np.asarray(ids, dtype=np.int64)
        return shard

    def _add_raw(self, ids: np.ndarray, vectors: np.ndarray, source: str) -> None:
        if not ids.size:
            return
        if self.dim and vectors.shape[1] != self.dim:
            raise ValueError(f"{source}: vectors of {vectors.shape[1]} dims, not {self.dim}")
        self.dim = vectors.shape[1]
        self._raw.append((ids, vectors))

    def shape(self) -> tuple[int, int]:
        return int(self.ids.size), self.dim

    def candidates(self, seed: int, stream: int, bound: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, keys, vectors) of the rows whose keyed draw is under `bound` (see `pick_sample`)."""
        out_ids, out_keys, out_vec = (
            [np.zeros(0, np.int64)],
            [np.zeros(0)],
            [np.zeros((0, self.dim), np.float32)],
        )
        for ids, vectors in self._raw:
            keys = keyed_uniform(ids, seed, stream)
            take = keys < bound
            out_ids.append(ids[take])
            out_keys.append(keys[take])
            out_vec.append(vectors[take])
        return np.concatenate(out_ids), np.concatenate(out_keys), np.concatenate(out_vec)

    def exact_search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force top-k over the raw vectors (before `build`), sorted like `search`."""
        results = [(np.zeros((xq.shape[0], 0), np.float32), np.zeros((xq.shape[0], 0), np.int64))]
        for ids, vectors in self._raw:
            sims, pos = faiss.knn(
                np.ascontiguousarray(xq), vectors, min(k, ids.size), faiss.METRIC_INNER_PRODUCT
            )
            results.append((sims, np.where(pos >= 0, ids[np.maximum(pos, 0)], -1)))
        return merge_topk(results, k)

    def build(self, trained: np.ndarray | list[np.ndarray] | None, nprobe: int) -> int:
        """Index the raw vectors: flat when `trained` is None, else into a copy of the trained empty
        index. Each part's raw vectors are freed once added, so memory peaks near one copy of them.
        Moves to the GPU when FAISS sees one. A list of trained empty tables: `IndexTables` on the
        CPU, which keeps the raw vectors for its exact re-ranking. Returns the number of vectors indexed."""
        if isinstance(trained, list):
            raw = [v for _, v in self._raw]
            vectors = np.concatenate(raw) if raw else np.zeros((0, max(self.dim, 1)), np.float32)
            self._raw = []
            self.index = fill_tables([faiss.deserialize_index(t) for t in trained], vectors, nprobe)
            return int(self.index.ntotal)
        if trained is None:
            index = faiss.IndexFlatIP(max(self.dim, 1))
        else:
            index = faiss.deserialize_index(trained)
        if use_gpu():
            index = _to_gpu(index)
        while self._raw:
            _, vectors = self._raw.pop(0)
            for start in range(0, vectors.shape[0], ADD_CHUNK):
                index.add(np.ascontiguousarray(vectors[start : start + ADD_CHUNK]))
            del vectors
        _set_nprobe(index, nprobe)
        self.index = index
        return int(index.ntotal)

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, image_ids) of each query's top min(k, shard size), sorted by (similarity
        descending, image_id ascending); -1 where the index found fewer."""
        if self.index is None:
            raise RuntimeError("shard searched before build()")
        k = min(k, int(self.index.ntotal))
        if k == 0:
            return np.zeros((xq.shape[0], 0), np.float32), np.zeros((xq.shape[0], 0), np.int64)
        sims, pos = self.index.search(np.ascontiguousarray(xq), k)
        ids = np.where(pos >= 0, self.ids[np.maximum(pos, 0)], -1)
        return sort_topk(sims, ids, k)


# ---------------------------------------------------------------- results, one part per query part


class PartWriter:
    """Turns a query part's search results into rows, written as one parquet file per query part in
    `folder` (the part index is the query part's position in the list searched). Subclasses say
    which rows; the file is written by `write_results`, atomically, so its presence means done."""

    schema: ClassVar[pa.Schema]

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def output(self, part: int) -> Path:
        return layout.part_path(self.folder, part)

    def rows(self, query_ids: np.ndarray, sims: np.ndarray, ids: np.ndarray) -> pa.Table:
        raise NotImplementedError


EDGES = pa.schema(
    [
        pa.field("src", pa.int64(), nullable=False),  # the query image
        pa.field("dst", pa.int64(), nullable=False),  # a database image among its k nearest
        pa.field("sim", pa.float32(), nullable=False),
    ]
)


class EdgeWriter(PartWriter):
    """Edges (query, neighbour) with cosine above `threshold`; a query's own id is no edge."""

    schema = EDGES

    def __init__(self, folder: str | Path, threshold: float):
        super().__init__(folder)
        self.threshold = threshold

    def rows(self, query_ids: np.ndarray, sims: np.ndarray, ids: np.ndarray) -> pa.Table:
        hit = (sims > self.threshold) & (ids >= 0) & (ids != query_ids[:, None])
        r, c = np.nonzero(hit)
        return pa.table(
            {"src": pa.array(query_ids[r]), "dst": pa.array(ids[r, c]), "sim": pa.array(sims[r, c])},
            schema=EDGES,
        )


TOPK = pa.schema(
    [
        pa.field("query_id", pa.int64(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),  # 0 = nearest
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),  # cosine
    ]
)


class TopKWriter(PartWriter):
    """Every query's neighbours in rank order (queries in image_id order), missing hits left out."""

    schema = TOPK

    def rows(self, query_ids: np.ndarray, sims: np.ndarray, ids: np.ndarray) -> pa.Table:
        valid = ids >= 0
        r, c = np.nonzero(valid)
        return pa.table(
            {
                "query_id": pa.array(query_ids[r]),
                "rank": pa.array(c.astype(np.int32)),
                "image_id": pa.array(ids[r, c]),
                "score": pa.array(sims[r, c]),
            },
            schema=TOPK,
        )


def written_counts(path: Path) -> tuple[int, int]:
    """(queries, rows) of a result part an earlier run wrote."""
    meta = pq.read_metadata(path)
    queries = (meta.metadata or {}).get(QUERIES_KEY)
    return int(queries) if queries is not None else 0, meta.num_rows


def search_vector_part(
    part_index: int,
    part: VectorPart,
    search: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    writer: PartWriter,
    chunk_size: int,
    exclude: np.ndarray | None = None,
) -> tuple[int, int]:
    """Search one query part chunk by chunk with `search` (queries -> merged (similarities, ids))
    and write its result rows. A part already written is not searched again. Returns (queries, rows)."""
    out = writer.output(part_index)
    if out.exists():
        return written_counts(out)
    ids, vectors = read_vector_part(part, exclude)
    tables = [writer.schema.empty_table()]
    for start in range(0, ids.size, chunk_size):
        sims, nbrs = search(vectors[start : start + chunk_size])
        tables.append(writer.rows(ids[start : start + chunk_size], sims, nbrs))
    table = pa.concat_tables(tables)
    write_parquet_atomic(table, out, writer.schema.with_metadata({QUERIES_KEY: str(ids.size).encode()}))
    return int(ids.size), table.num_rows


def read_results(writer: PartWriter, columns: list[str] | None = None) -> pa.Table:
    """All result parts of a search as one table: for thresholded edges (small), not for top-k rows
    of a whole pool."""
    parts = layout.list_parts(writer.folder)
    if not parts:
        return writer.schema.empty_table().select(columns or writer.schema.names)
    return pa.concat_tables([pq.read_table(p, columns=columns, schema=writer.schema) for p in parts])
