"""Pool deduplication as in LVD-142M: exact (content hash), copy detection (kNN graph + union-find)
and eval-set overlap (drop the whole component of any pool image that matches an eval image).

Accounting is sequential, like the paper's funnel (1.2B -> self-dedup -> 1.1B -> eval dedup -> 744M):
an image's reason is the first filter that removed it. Exact copies of a kept image are "exact",
the other dropped members of a component are "copy", and a component that touches an eval image
loses its kept image too, as "eval-overlap" (so the whole component is gone).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from lvd.curation.knn import build_index, recall_against_exact, search, search_chunks
from lvd.curation.knn_sharded import EDGES, in_sorted
from lvd.curation.union_find import connected_components
from lvd.schemas import layout
from lvd.schemas.job_spec import DedupSpec
from lvd.schemas.layout import POOL
from lvd.schemas.tables import DEDUP, read_parts, write_parquet_atomic

# One source of truth for defaults: the job spec (these functions are also called directly).
DEDUP_DEFAULTS = DedupSpec()

log = logging.getLogger("lvd")

EXACT, COPY, EVAL_OVERLAP = "exact", "copy", "eval-overlap"
KEEP_RULES = ("largest_then_smallest_id", "smallest_id")
GROUPINGS = ("components", "leader")


def exact_duplicate_of(sha256: Sequence[str | None], image_ids: np.ndarray) -> np.ndarray:
    """Row index of the image kept for each row's content hash: the smallest image_id with that hash.

    Rows without a hash (None) are their own representative.
    """
    image_ids = np.asarray(image_ids, dtype=np.int64)
    codes, _ = pd.factorize(pd.Series(sha256, dtype=object), use_na_sentinel=True)
    rep = np.arange(image_ids.size, dtype=np.int64)
    hashed = np.flatnonzero(codes >= 0)
    if hashed.size:
        order = hashed[np.lexsort((image_ids[hashed], codes[hashed]))]
        group = codes[order]
        first = np.r_[True, group[1:] != group[:-1]]
        group_rep = order[first]  # one representative per code, in code order of `order`
        rep[order] = group_rep[np.cumsum(first) - 1]
    return rep


@dataclass
class CopyEdges:
    src: np.ndarray  # row indices (int64)
    dst: np.ndarray
    sims: np.ndarray  # float32 cosine of each edge
    exact_search: bool
    recall: float | None  # IVF edge recall against brute force on a sample; None when exact


def copy_detection_edges(
    vectors: np.ndarray,
    *,
    ids: np.ndarray | None = None,
    k: int = 64,
    threshold: float = 0.6,
    index: str = DEDUP_DEFAULTS.index,
    nprobe: int = DEDUP_DEFAULTS.nprobe,
    exact_below: int = 1_000_000,
    chunk_size: int = 65_536,
    recall_sample: int = 1000,
    seed: int = 0,
    tables: int = DEDUP_DEFAULTS.tables,
) -> CopyEdges:
    """Edges (i, j) between each row and those of its k nearest neighbours with cosine > threshold.

    `vectors` are L2-normalised float32, `ids` their image_ids (the IVF training and recall samples
    are then the keyed ones the sharded search draws). Only thresholded edges are kept, chunk by chunk.
    `tables` > 1: that many IVF partitions searched together (`curation.knn.IndexTables`).
    """
    n = vectors.shape[0]
    if n < 2:
        empty = np.zeros(0, np.int64)
        return CopyEdges(empty, empty, np.zeros(0, np.float32), True, None)
    idx, info = build_index(
        vectors, factory=index, exact_below=exact_below, nprobe=nprobe, seed=seed, ids=ids, tables=tables
    )
    src, dst, sims = [], [], []
    for start, s, i in search_chunks(idx, vectors, k + 1, chunk_size):  # k + 1: a row finds itself
        rows = np.arange(start, start + s.shape[0], dtype=np.int64)[:, None]
        hit = (s > threshold) & (i >= 0) & (i != rows)
        r, c = np.nonzero(hit)
        src.append(rows[r, 0])
        dst.append(i[r, c].astype(np.int64))
        sims.append(s[r, c])
    recall = None
    if not info.exact:
        recall = recall_against_exact(
            idx, vectors, k + 1, threshold=threshold, sample_size=recall_sample, seed=seed, ids=ids
        )
        log.info(
            "dedup: %s nprobe %d, edge recall vs exact on a sample: %s", info.description, nprobe, recall
        )
    return CopyEdges(np.concatenate(src), np.concatenate(dst), np.concatenate(sims), info.exact, recall)


def choose_kept(
    labels: np.ndarray, image_ids: np.ndarray, area: np.ndarray | None, keep_rule: str
) -> np.ndarray:
    """Row index of the image kept in each row's component.

    largest_then_smallest_id: largest width*height, ties to the smallest image_id;
    smallest_id: the smallest image_id. Without areas both rules keep the smallest image_id.
    """
    if keep_rule not in KEEP_RULES:
        raise ValueError(f"unknown keep_rule {keep_rule!r}; choose one of {KEEP_RULES}")
    n = labels.size
    if keep_rule == "largest_then_smallest_id" and area is not None:
        order = np.lexsort((image_ids, -np.asarray(area, dtype=np.int64), labels))
    else:
        order = np.lexsort((image_ids, labels))
    first = np.r_[True, labels[order][1:] != labels[order][:-1]]
    kept_of_label = np.empty(n, dtype=np.int64)
    kept_of_label[labels[order][first]] = order[first]
    return kept_of_label[labels]


def keep_order(image_ids: np.ndarray, area: np.ndarray | None, keep_rule: str) -> np.ndarray:
    """Rank of each row in the keep rule's order (0 = the image a rule keeps first)."""
    if keep_rule not in KEEP_RULES:
        raise ValueError(f"unknown keep_rule {keep_rule!r}; choose one of {KEEP_RULES}")
    if keep_rule == "largest_then_smallest_id" and area is not None:
        order = np.lexsort((image_ids, -np.asarray(area, dtype=np.float64)))
    else:
        order = np.argsort(image_ids, kind="stable")
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size)
    return rank


def leader_kept(rank: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Leader grouping: row index of the kept image each row is dropped for (itself when kept).

    The result of visiting rows in `rank` order and keeping a row unless an edge joins it to a row
    already kept (then it is dropped for the first such row in the order). An image is dropped
    only for its own edge to a kept image, so a chain A~B~C keeps C when A is kept and B is not.
    Computed in rounds over the edges, not row by row: a row is decided kept once every row before
    it among its neighbours is decided dropped, and dropped once one of them is kept.
    """
    n = rank.size
    src = np.asarray(src, dtype=np.int64)
    dst = np.asarray(dst, dtype=np.int64)
    swap = rank[src] > rank[dst]
    first = np.where(swap, dst, src)  # the edge's endpoint earlier in the order
    later = np.where(swap, src, dst)
    loop = first == later
    first, later = first[~loop], later[~loop]
    undecided, keep, drop = 0, 1, 2
    state = np.zeros(n, dtype=np.int8)
    kept_for = np.arange(n, dtype=np.int64)
    by_rank = np.argsort(rank)  # the row at each rank
    while (state == undecided).any():
        # Dropped: an undecided row with a kept neighbour earlier in the order, for the first such.
        hit = (state[first] == keep) & (state[later] == undecided)
        if hit.any():
            best = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
            np.minimum.at(best, later[hit], rank[first[hit]])
            newly = np.flatnonzero(best < np.iinfo(np.int64).max)
            state[newly] = drop
            kept_for[newly] = by_rank[best[newly]]
        # Kept: an undecided row none of whose earlier neighbours is undecided or kept.
        blocking = state[first] != drop
        blocked = np.bincount(later[blocking], minlength=n) > 0
        state[(state == undecided) & ~blocked] = keep
    return kept_for


def grouped_kept(
    image_ids: np.ndarray,
    area: np.ndarray | None,
    keep_rule: str,
    grouping: str,
    copy_src: np.ndarray,
    copy_dst: np.ndarray,
) -> np.ndarray:
    """Row of the image kept for each row under `grouping` "leader" (see `leader_kept`); the order is
    the keep rule's. ("components" keeps one image per connected component: `choose_kept`.)"""
    if grouping != "leader":
        raise ValueError(f"unknown grouping {grouping!r}; choose one of {GROUPINGS}")
    return leader_kept(keep_order(image_ids, area, keep_rule), copy_src, copy_dst)


def component_size_stats(labels: np.ndarray, pool_images: int) -> dict:
    """Sizes of the duplicate components (two images or more) of graph nodes labelled `labels`:
    how many components, the largest, its share of the pool, and a histogram by size range."""
    sizes = np.bincount(labels)
    sizes = sizes[sizes >= 2]
    hist: dict[str, int] = {}
    lo = 2
    while sizes.size and lo <= sizes.max():
        hi = lo * 2 - 1
        count = int(((sizes >= lo) & (sizes <= hi)).sum())
        if count:
            hist[f"{lo}-{hi}" if hi > lo else str(lo)] = count
        lo *= 2
    largest = int(sizes.max()) if sizes.size else 1
    return {
        "components": int(sizes.size),
        "largest": largest,
        "largest_share": largest / pool_images if pool_images else 0.0,
        "histogram": hist,
    }


def eval_overlap(
    pool_vectors: np.ndarray,
    eval_vectors: np.ndarray,
    *,
    threshold: float = 0.45,
    index: str = DEDUP_DEFAULTS.index,
    nprobe: int = DEDUP_DEFAULTS.nprobe,
    exact_below: int = 1_000_000,
    chunk_size: int = 65_536,
    tables: int = DEDUP_DEFAULTS.tables,
) -> np.ndarray:
    """Which pool rows have an eval image with cosine > threshold (nearest eval vector per pool row)."""
    matched = np.zeros(pool_vectors.shape[0], dtype=bool)
    if eval_vectors.shape[0] == 0 or pool_vectors.shape[0] == 0:
        return matched
    idx, _ = build_index(eval_vectors, factory=index, exact_below=exact_below, nprobe=nprobe, tables=tables)
    sims, ids = search(idx, pool_vectors, 1, chunk_size)
    return (sims[:, 0] > threshold) & (ids[:, 0] >= 0)


@dataclass
class DedupResult:
    component_id: np.ndarray  # int64: smallest image_id of the row's component
    keep: np.ndarray  # bool
    reason: np.ndarray  # object: None, "exact", "copy" or "eval-overlap"
    duplicate_of: np.ndarray  # int64 image_id kept for the component, -1 when none (kept / eval-overlap)
    copy_edges: int
    exact_search: bool
    ivf_recall: float | None

    def counts(self) -> dict[str, int]:
        reasons = pd.Series(self.reason, dtype=object).value_counts()
        return {
            "images": int(self.keep.size),
            "exact": int(reasons.get(EXACT, 0)),
            "copy": int(reasons.get(COPY, 0)),
            "eval_overlap": int(reasons.get(EVAL_OVERLAP, 0)),
            "kept": int(self.keep.sum()),
        }


def dedup_pool(
    image_ids: np.ndarray,
    vectors: np.ndarray,
    *,
    sha256: Sequence[str | None] | None = None,
    width: np.ndarray | None = None,
    height: np.ndarray | None = None,
    eval_vectors: np.ndarray | None = None,
    k: int = 64,
    threshold: float = 0.6,
    eval_threshold: float = 0.45,
    index: str = DEDUP_DEFAULTS.index,
    nprobe: int = DEDUP_DEFAULTS.nprobe,
    exact_below: int = 1_000_000,
    chunk_size: int = 65_536,
    keep_rule: str = "largest_then_smallest_id",
    grouping: str = DEDUP_DEFAULTS.grouping,
    seed: int = 0,
    tables: int = DEDUP_DEFAULTS.tables,
    verify_from: float | None = None,
    verify_score: float = DEDUP_DEFAULTS.verify_score,
    read_image: Callable[[int], bytes] | None = None,
) -> DedupResult:
    """Exact, copy-detection and eval-overlap dedup of a pool (rows of L2-normalised `vectors`), all
    in memory: the reference the part-by-part dedup (`jobs/stages/dedup.py`) is tested against.
    `verify_from`: pixel verification of the pairs in (verify_from, threshold], reading row r's
    encoded image with `read_image(r)` (see `verified_edges`)."""
    image_ids = np.asarray(image_ids, dtype=np.int64)
    n = image_ids.size
    if vectors.shape[0] != n:
        raise ValueError(f"{n} image ids but {vectors.shape[0]} vectors")
    if np.unique(image_ids).size != n:
        raise ValueError("image_ids must be unique")
    rows = np.arange(n, dtype=np.int64)
    exact_rep = exact_duplicate_of(sha256, image_ids) if sha256 is not None else rows
    is_exact_dup = exact_rep != rows
    unique_rows = np.flatnonzero(~is_exact_dup)
    search_params = dict(
        index=index, nprobe=nprobe, exact_below=exact_below, chunk_size=chunk_size, tables=tables
    )
    # Exact copies have the same vector: search only one of each, join the rest by their hash edge.
    searched = vectors if unique_rows.size == n else vectors[unique_rows]  # no copy when all are distinct
    search_threshold = threshold if verify_from is None else verify_from
    edges = copy_detection_edges(
        searched, ids=image_ids[unique_rows], k=k, threshold=search_threshold, seed=seed, **search_params
    )
    if verify_from is not None:
        from lvd.curation.copy_verifier import verify_pairs

        if read_image is None:
            raise ValueError("verify_from needs read_image: the verifier compares the images' pixels")

        table = pa.table({"src": edges.src, "dst": edges.dst, "sim": edges.sims})
        pairs = band_pairs(edges.src, edges.dst, edges.sims, threshold)
        scores, _ = verify_pairs(
            [(int(a), int(b)) for a, b in pairs], lambda r: read_image(int(unique_rows[r]))
        )
        table = verified_edges(table, threshold, pairs, scores > verify_score)
        edges = CopyEdges(
            table["src"].to_numpy(),
            table["dst"].to_numpy(),
            table["sim"].to_numpy(),
            edges.exact_search,
            edges.recall,
        )
    src = np.concatenate([rows[is_exact_dup], unique_rows[edges.src]])
    dst = np.concatenate([exact_rep[is_exact_dup], unique_rows[edges.dst]])
    labels = connected_components(n, src, dst)

    component_id = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(component_id, labels, image_ids)
    component_id = component_id[labels]
    area = None
    if width is not None and height is not None:
        area = np.nan_to_num(np.asarray(width, dtype=np.float64)) * np.nan_to_num(
            np.asarray(height, dtype=np.float64)
        )
    if grouping == "components":
        kept_row = choose_kept(labels, image_ids, area, keep_rule)
    else:
        kept_row = grouped_kept(
            image_ids, area, keep_rule, grouping, unique_rows[edges.src], unique_rows[edges.dst]
        )
        kept_row[is_exact_dup] = kept_row[exact_rep[is_exact_dup]]  # exact copies follow their hash's image

    keep = kept_row == rows
    reason = np.full(n, None, dtype=object)
    reason[~keep & is_exact_dup] = EXACT
    reason[~keep & ~is_exact_dup] = COPY
    duplicate_of = np.where(keep, -1, image_ids[kept_row])
    if eval_vectors is not None and eval_vectors.shape[0]:
        matched = eval_overlap(vectors, eval_vectors, threshold=eval_threshold, **search_params)
        touched = np.zeros(n, dtype=bool)
        touched[labels[matched]] = True
        lost = keep & touched[labels]
        keep[lost] = False
        reason[lost] = EVAL_OVERLAP
    return DedupResult(
        component_id, keep, reason, duplicate_of, int(edges.src.size), edges.exact_search, edges.recall
    )


# ---------------------------------------------------------------- part by part (the dedup stage)
#
# The stage's workers do the per-image work on parts; the driver holds only what grows with the
# duplicates (exact and copy edges, the decisions of their components) or with the parts:
#   1. `bucket_pool_rows` (a task per group of ingest parts): each part's pool rows that have a
#      vector, with their area, to a scratch rows file; their (sha256, image_id) into hash buckets;
#   2. `exact_edges_of_bucket` (a task per bucket): each exact copy -> smallest image_id of its hash;
#   3. the copy-detection and eval-overlap searches (`curation.knn_ray.search_parts`) over the rows;
#   4. `component_decisions` (driver) on the nodes of the edges, with `areas_of` (tasks) for them;
#   5. `write_dedup_part` (a task per part): its rows joined with the decisions.
# The decisions equal `dedup_pool`'s on the same images.

POOL_ROWS = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("area", pa.float64(), nullable=False),  # width * height, 0 when unknown
    ]
)
HASHES = pa.schema(
    [pa.field("sha256", pa.string(), nullable=False), pa.field("image_id", pa.int64(), nullable=False)]
)

REASONS = (None, EXACT, COPY, EVAL_OVERLAP)  # reason codes 0..3 of `Decisions.reason`


def pool_rows(ingest_part: Path, embed_part: Path | None) -> pa.Table:
    """Pool images with status ok of an ingest part that have a vector in its embed part (the same
    part index): image_id, sha256, area; sorted by image_id."""
    images = ds.dataset(ingest_part, format="parquet").to_table(
        columns=["image_id", "sha256", "width", "height"],
        filter=(ds.field("dataset") == POOL) & (ds.field("status") == "ok"),
    )
    if embed_part is None or not Path(embed_part).exists():
        images = images.slice(0, 0)
    else:
        embedded = ds.dataset(embed_part, format="parquet").to_table(
            columns=["image_id"], filter=ds.field("vector").is_valid()
        )
        images = images.filter(pc.is_in(images["image_id"], embedded["image_id"].combine_chunks()))
    images = images.sort_by("image_id")
    area = np.nan_to_num(images["width"].to_numpy(zero_copy_only=False).astype(np.float64)) * np.nan_to_num(
        images["height"].to_numpy(zero_copy_only=False).astype(np.float64)
    )
    return pa.table({"image_id": images["image_id"], "sha256": images["sha256"], "area": pa.array(area)})


def hash_bucket(sha256: pa.Array, n_buckets: int) -> np.ndarray:
    """The bucket of each content hash: a fixed hash of the string, the same in every process."""
    values = np.asarray(sha256.to_numpy(zero_copy_only=False), dtype=object)
    return (pd.util.hash_array(values, categorize=False) % np.uint64(n_buckets)).astype(np.int64)


def bucket_pool_rows(
    group: Sequence[tuple[int, Path, Path | None]], *, rows_dir: Path, buckets_dir: Path, n_buckets: int
) -> int:
    """Map step of exact dedup, for a group of (part index, ingest part, embed part): writes each
    part's pool rows (`POOL_ROWS`) to `rows_dir`, and the group's (sha256, image_id) of hashed rows
    into one file per hash bucket. Rows files go last, so a group whose rows files all exist is
    done. Returns the number of pool rows."""
    parts, hashed = [], []
    for index, ingest_part, embed_part in group:
        rows = pool_rows(ingest_part, embed_part)
        parts.append((index, rows))
        hashed.append(rows.select(["sha256", "image_id"]).filter(rows["sha256"].is_valid()))
    hashes = pa.concat_tables(hashed) if hashed else HASHES.empty_table()
    if hashes.num_rows:
        bucket = hash_bucket(hashes["sha256"].combine_chunks(), n_buckets)
        first = group[0][0]
        for b in np.unique(bucket):
            out = layout.part_path(layout.bucket_dir(buckets_dir, int(b)), first)
            write_parquet_atomic(hashes.filter(pa.array(bucket == b)), out, HASHES)
    for index, rows in parts:
        write_parquet_atomic(rows.select(["image_id", "area"]), layout.part_path(rows_dir, index), POOL_ROWS)
    return sum(rows.num_rows for _, rows in parts)


def exact_edges_of_bucket(bucket: Path) -> tuple[np.ndarray, np.ndarray]:
    """Reduce step of exact dedup: (duplicate, kept) image_id pairs of one hash bucket, where kept is
    the smallest image_id with the same sha256 and duplicate every other image with it."""
    table = read_parts(layout.list_parts(bucket), HASHES)
    ids = table["image_id"].to_numpy()
    rep = exact_duplicate_of(table["sha256"].to_numpy(zero_copy_only=False), ids)
    dup = np.flatnonzero(rep != np.arange(ids.size))
    return ids[dup], ids[rep[dup]]


def graph_nodes(*id_arrays: np.ndarray) -> np.ndarray:
    """The sorted image_ids that appear in any of the arrays (edge endpoints, eval matches)."""
    arrays = [np.asarray(a, dtype=np.int64) for a in id_arrays]
    return np.unique(np.concatenate(arrays)) if arrays else np.zeros(0, np.int64)


def areas_of(rows_file: Path, *, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image_id, area) of a rows file's images that are in `nodes` (sorted image_ids)."""
    rows = pq.read_table(rows_file, columns=["image_id", "area"])
    ids = rows["image_id"].to_numpy()
    hit = in_sorted(ids, nodes)
    return ids[hit], rows["area"].to_numpy()[hit]


@dataclass
class Decisions:
    """The dedup decisions for the images in a duplicate component or matched by an eval image, in
    image_id order. Every other pool image is kept, alone in its component."""

    image_id: np.ndarray
    component_id: np.ndarray  # smallest image_id of the component
    keep: np.ndarray
    reason: np.ndarray  # int8 codes into REASONS
    duplicate_of: np.ndarray  # image kept for the component; -1 when kept or lost to eval overlap

    def count(self, reason: str) -> int:
        return int((self.reason == REASONS.index(reason)).sum())


def component_decisions(
    nodes: np.ndarray,
    area: np.ndarray | None,
    exact_src: np.ndarray,
    exact_dst: np.ndarray,
    copy_src: np.ndarray,
    copy_dst: np.ndarray,
    eval_matched: np.ndarray,
    keep_rule: str,
    grouping: str = "components",
) -> Decisions:
    """`dedup_pool`'s decisions, computed on the graph's nodes only (`graph_nodes` of every edge
    endpoint and eval match; `area` of each node, None for smallest_id). Exact edges go from each
    exact copy to the kept image of its hash, copy edges are the kNN edges above the threshold.
    `grouping`: one kept image per connected component, or "leader" (see `leader_kept`); eval
    overlap always removes whole components, as the paper does."""
    nodes = np.asarray(nodes, dtype=np.int64)
    n = nodes.size
    src = np.searchsorted(nodes, np.concatenate([exact_src, copy_src]).astype(np.int64))
    dst = np.searchsorted(nodes, np.concatenate([exact_dst, copy_dst]).astype(np.int64))
    labels = connected_components(n, src, dst)  # smallest node index = smallest image_id
    exact_at = np.searchsorted(nodes, np.asarray(exact_src, dtype=np.int64))
    if grouping == "components":
        kept_row = choose_kept(labels, nodes, area, keep_rule)
    else:
        n_exact = np.asarray(exact_src).size
        kept_row = grouped_kept(nodes, area, keep_rule, grouping, src[n_exact:], dst[n_exact:])
        kept_row[exact_at] = kept_row[dst[:n_exact]]  # exact copies follow their hash's image
    keep = kept_row == np.arange(n)
    is_exact_dup = np.zeros(n, dtype=bool)
    is_exact_dup[exact_at] = True
    reason = np.zeros(n, dtype=np.int8)
    reason[~keep & is_exact_dup] = REASONS.index(EXACT)
    reason[~keep & ~is_exact_dup] = REASONS.index(COPY)
    duplicate_of = np.where(keep, -1, nodes[kept_row])
    touched = np.zeros(n, dtype=bool)
    touched[labels[np.searchsorted(nodes, np.asarray(eval_matched, dtype=np.int64))]] = True
    lost = keep & touched[labels]
    keep[lost] = False
    reason[lost] = REASONS.index(EVAL_OVERLAP)
    return Decisions(nodes, nodes[labels], keep, reason, duplicate_of)


def write_dedup_part(
    item: tuple[int, Path], *, decisions: Decisions, out_dir: Path, earlier: dict[int, Path] | None = None
) -> tuple[int, int, np.ndarray, np.ndarray]:
    """One DEDUP part: the rows file's images (part `index`) with their decisions. `earlier`: the
    earlier run's DEDUP part of each part index whose images are unchanged. Returns (rows, kept, the
    image_ids whose keep differs from the earlier part's, their keep now); the flips are bounded
    by the duplicates, as the decisions are."""
    index, rows_file = item
    ids = pq.read_table(rows_file, columns=["image_id"])["image_id"].to_numpy()
    component_id, keep = ids.copy(), np.ones(ids.size, dtype=bool)
    reason, duplicate_of = np.zeros(ids.size, dtype=np.int8), np.full(ids.size, -1, dtype=np.int64)
    hit = in_sorted(ids, decisions.image_id)
    at = np.searchsorted(decisions.image_id, ids[hit])
    component_id[hit] = decisions.component_id[at]
    keep[hit] = decisions.keep[at]
    reason[hit] = decisions.reason[at]
    duplicate_of[hit] = decisions.duplicate_of[at]
    table = pa.table(
        {
            "image_id": pa.array(ids, pa.int64()),
            "component_id": pa.array(component_id, pa.int64()),
            "keep": pa.array(keep),
            "reason": pa.array(REASONS, pa.string()).take(pa.array(reason)),
            "duplicate_of": pa.array(duplicate_of, pa.int64(), mask=duplicate_of < 0),
        }
    )
    write_parquet_atomic(table, layout.part_path(out_dir, index), DEDUP)
    flipped = np.zeros(0, np.int64)
    if earlier is not None and index in earlier:
        old = pq.read_table(earlier[index], columns=["image_id", "keep"])
        old_ids = old["image_id"].to_numpy()
        at = np.searchsorted(old_ids, ids)  # both in image_id order
        found = at < old_ids.size
        found[found] = old_ids[at[found]] == ids[found]
        was = np.zeros(ids.size, dtype=bool)
        was[found] = old["keep"].to_numpy(zero_copy_only=False)[at[found]]
        flipped = ids[found & (was != keep)]
    return int(ids.size), int(keep.sum()), flipped, keep[np.isin(ids, flipped)]


# ---------------------------------------------------------------- pixel verification of near misses
#
# With `dedup.verify_from`, the copy search keeps edges down to verify_from; an edge at or below the
# threshold stays a copy edge only when `curation.copy_verifier` finds the same pixels in both images.
# The band's pairs are bounded like the thresholded edges (at most k per image); workers read the
# images of a batch of pairs themselves, so the driver holds only pair ids and their locations.

LOCATION_COLUMNS = ("image_id", "kind", "path", "member", "offset", "size")


def band_pairs(src: np.ndarray, dst: np.ndarray, sims: np.ndarray, threshold: float) -> np.ndarray:
    """(P, 2) sorted unordered image_id pairs of the edges with cosine <= threshold, each once."""
    band = np.asarray(sims) <= threshold
    a, b = np.asarray(src)[band], np.asarray(dst)[band]
    pairs = np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1).astype(np.int64)
    return np.unique(pairs, axis=0) if pairs.size else pairs.reshape(0, 2)


def image_locations(ingest_part: Path, *, ids: np.ndarray) -> pa.Table:
    """Where the bytes of an ingest part's images among `ids` (sorted) are (`LOCATION_COLUMNS`)."""
    rows = ds.dataset(ingest_part, format="parquet").to_table(columns=list(LOCATION_COLUMNS))
    return rows.filter(pa.array(in_sorted(rows["image_id"].to_numpy(), ids)))


def verify_pair_batch(pairs: np.ndarray, *, locations: pa.Table) -> tuple[np.ndarray, int]:
    """`copy_verifier.verify_pairs` of (image_id, image_id) pairs, reading each image's bytes from
    its location (`image_locations`, sorted by image_id). Returns (scores, images not readable)."""
    from lvd.curation.copy_verifier import verify_pairs
    from lvd.curation.image_io import read_image_bytes

    ids = locations["image_id"].to_numpy()
    columns = {c: locations[c].to_pylist() for c in LOCATION_COLUMNS[1:]}

    def read(image_id: int) -> bytes:
        r = int(np.searchsorted(ids, image_id))
        if r == ids.size or ids[r] != image_id:
            raise KeyError(f"image {image_id} has no location")
        return read_image_bytes(*(columns[c][r] for c in LOCATION_COLUMNS[1:]))

    return verify_pairs([(int(a), int(b)) for a, b in pairs], read)


def verified_edges(edges: pa.Table, threshold: float, pairs: np.ndarray, passed: np.ndarray) -> pa.Table:
    """The copy edges: those above the threshold, and those at or below it whose unordered pair is
    among `pairs` (sorted, from `band_pairs`) with `passed` true."""
    src, dst = edges["src"].to_numpy(), edges["dst"].to_numpy()
    above = edges["sim"].to_numpy() > threshold
    ok = np.asarray(pairs)[np.asarray(passed, dtype=bool)]
    if ok.size:
        lo, hi = np.minimum(src, dst), np.maximum(src, dst)
        # one int per pair for the lookup: the rank of lo among the ids, times the id count, plus hi's
        ids = np.unique(np.concatenate([lo, hi, ok.ravel()]))
        key = np.searchsorted(ids, lo) * ids.size + np.searchsorted(ids, hi)
        ok_key = np.sort(np.searchsorted(ids, ok[:, 0]) * ids.size + np.searchsorted(ids, ok[:, 1]))
        above |= in_sorted(key, ok_key)
    return edges.filter(pa.array(above))


# ---------------------------------------------------------------- incremental (a source added)
#
# A later run on a grown pool searches only what a full run of the union could find differently:
#   seen:  images the earlier run searched (not exact copies then) and this run searches too;
#   fresh: images this run searches that the earlier one did not (new parts, or no longer exact copies).
# Every fresh image is searched against the whole pool (its k + 1 nearest, as a full run does). A seen
# image keeps the earlier run's edges and gains the fresh images that have it above the threshold:
# the fresh lists turned around (`fresh_edges_reversed`), plus a search of the seen images against
# the few fresh ones whose lists are full. That is the union's list whenever both together hold
# fewer than k images: the earlier list then held every earlier image above the threshold, and all
# of them fit in the k + 1 slots with the image itself, whatever its own rank. Any other seen image
# (a full list) is searched again against the whole pool (`carried_copy_edges`). The edge set, and
# so every decision, equals a full run's with exact search.

SEEN, FRESH = "seen", "fresh"
IDS = pa.schema([pa.field("image_id", pa.int64(), nullable=False)])
# The earlier run's images whose keep flipped in a run on a grown pool (what retrieve's incremental
# path needs: the images no longer in the kept pool, and those newly in it), and in the file's
# metadata the `parts_fingerprint` of the earlier run's parts they are relative to.
KEEP_FLIPS = pa.schema(
    [pa.field("image_id", pa.int64(), nullable=False), pa.field("keep", pa.bool_(), nullable=False)]
)
FLIPS_AGAINST = b"lvd.against"


def parts_fingerprint(digests: Iterable[str]) -> str:
    """One digest of a set of images parts (their content digests, in any order)."""
    return hashlib.sha256("\n".join(sorted(set(digests))).encode()).hexdigest()[:16]


def split_seen(
    item: tuple[int, Path, Path, Path | None],
    *,
    out_dir: Path | None,
    excluded: np.ndarray,
    eval_datasets: Sequence[str],
    nodes: np.ndarray,
) -> tuple[int, int, int, np.ndarray, np.ndarray]:
    """Incremental dedup, one part: item = (part index, its rows file, its ingest part, the earlier
    run's DEDUP part of the same content or None). Writes the part's `seen` and `fresh` image_ids
    (of those not in `excluded`, the sorted exact copies) into `out_dir/seen|fresh` (None: a full
    run, which only counts). Returns (seen,
    fresh, ok eval images of the part, the `nodes` (sorted) that are seen here, the `nodes` that are
    pool rows of an unchanged part)."""
    index, rows_file, ingest_part, earlier = item
    ids = pq.read_table(rows_file, columns=["image_id"])["image_id"].to_numpy()
    searched = ids[~in_sorted(ids, excluded)]
    if earlier is not None:
        old = pq.read_table(earlier, columns=["image_id", "reason"])
        old_ids = old["image_id"].to_numpy()
        was_searched = np.sort(old_ids[pc.fill_null(pc.not_equal(old["reason"], EXACT), True).to_numpy()])
        seen_mask = in_sorted(searched, was_searched)
    else:
        seen_mask = np.zeros(searched.size, dtype=bool)
    seen, fresh = searched[seen_mask], searched[~seen_mask]
    for name, values in ((SEEN, seen), (FRESH, fresh)) if out_dir is not None else ():
        write_parquet_atomic(
            pa.table({"image_id": values}, schema=IDS), layout.part_path(out_dir / name, index), IDS
        )
    evals = 0
    if eval_datasets:
        flt = ds.field("dataset").isin(list(eval_datasets)) & (ds.field("status") == "ok")
        evals = ds.dataset(ingest_part, format="parquet").count_rows(filter=flt)
    present = ids[in_sorted(ids, nodes)] if earlier is not None else np.zeros(0, np.int64)
    return int(seen.size), int(fresh.size), int(evals), seen[in_sorted(seen, nodes)], present


def count_per(ids: np.ndarray, of: np.ndarray) -> np.ndarray:
    """How many times each of `of` occurs in `ids`."""
    values, counts = np.unique(np.asarray(ids, dtype=np.int64), return_counts=True)
    out = np.zeros(np.asarray(of).size, dtype=np.int64)
    if values.size:
        pos = np.minimum(np.searchsorted(values, of), values.size - 1)
        hit = values[pos] == of
        out[hit] = counts[pos[hit]]
    return out


def carried_copy_edges(
    earlier: pa.Table, alive: np.ndarray, seen_to_fresh: pa.Table, k: int
) -> tuple[pa.Table, np.ndarray]:
    """The copy edges of seen queries that a full run of the union finds too, without searching them
    against it: (edges (src, dst, sim), the seen queries to search against the whole union).

    earlier: the earlier run's copy edges (its k + 1 nearest, thresholded, without self pairs);
    alive: sorted ids among their endpoints that are seen now; seen_to_fresh: edges of seen queries
    to every fresh image above the threshold, or to their k + 1 nearest among some. A seen query
    whose two lists hold k images or more is searched again (its earlier list may have been cut at
    k); every other keeps both lists, less the earlier neighbours that are gone (removed, or now
    exact copies)."""
    src, dst = earlier["src"].to_numpy(), earlier["dst"].to_numpy()
    queries = np.unique(np.concatenate([src[in_sorted(src, alive)], seen_to_fresh["src"].to_numpy()]))
    full = count_per(src, queries) + count_per(seen_to_fresh["src"].to_numpy(), queries) >= k
    again = queries[full]
    keep_old = in_sorted(src, alive) & in_sorted(dst, alive) & ~in_sorted(src, again)
    keep_new = ~in_sorted(seen_to_fresh["src"].to_numpy(), again)
    edges = pa.concat_tables(
        [
            earlier.filter(pa.array(keep_old)),
            seen_to_fresh.select(earlier.column_names).filter(pa.array(keep_new)),
        ]
    )
    return edges, again


def fresh_edges_reversed(fresh_edges: pa.Table, k: int) -> tuple[pa.Table, np.ndarray]:
    """From the edges of the fresh images searched against the whole pool (their k + 1 nearest,
    thresholded): (each edge to an earlier image turned around, as that image's edge to the fresh one;
    the fresh images whose lists hold k images or more, sorted).

    A fresh image whose list holds fewer than k has every image above the threshold in it, so every
    earlier image that has it above the threshold gets it here, without searching the earlier images.
    Only the full lists' images need that search (`seen -> full`). A neighbour is an earlier image
    when it searched nothing: a fresh image above the threshold of another has an edge of its own."""
    src, dst = fresh_edges["src"].to_numpy(), fresh_edges["dst"].to_numpy()
    queries, counts = np.unique(src, return_counts=True)
    to_seen = ~in_sorted(dst, queries)
    turned = pa.table(
        {
            "src": pa.array(dst[to_seen], pa.int64()),
            "dst": pa.array(src[to_seen], pa.int64()),
            "sim": fresh_edges["sim"].filter(pa.array(to_seen)).combine_chunks().cast(pa.float32()),
        },
        schema=EDGES,
    )
    return turned, queries[counts >= k]


def unique_edges(edges: pa.Table) -> pa.Table:
    """One row per (src, dst), the first, in (src, dst) order."""
    if edges.num_rows == 0:
        return edges
    src, dst = edges["src"].to_numpy(), edges["dst"].to_numpy()
    order = np.lexsort((dst, src))
    first = np.r_[True, (src[order][1:] != src[order][:-1]) | (dst[order][1:] != dst[order][:-1])]
    return edges.take(pa.array(order[first]))
