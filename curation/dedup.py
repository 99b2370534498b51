"""Pool deduplication as in LVD-142M: exact (content hash), copy detection (kNN graph + union-find)
and eval-set overlap (drop the whole component of any pool image that matches an eval image).

Accounting is sequential, like the paper's funnel (1.2B -> self-dedup -> 1.1B -> eval dedup -> 744M):
an image's reason is the first filter that removed it. Exact copies of a kept image are "exact",
the other dropped members of a component are "copy", and a component that touches an eval image
loses its kept image too, as "eval-overlap" (so the whole component is gone).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lvd.curation.knn import build_index, recall_against_exact
from lvd.curation.knn_ray import search_auto, search_chunks_auto
from lvd.curation.union_find import connected_components
from lvd.schemas.job_spec import DedupSpec

# One source of truth for defaults: the job spec (these functions are also called directly).
DEDUP_DEFAULTS = DedupSpec()

log = logging.getLogger("lvd")

EXACT, COPY, EVAL_OVERLAP = "exact", "copy", "eval-overlap"
KEEP_RULES = ("largest_then_smallest_id", "smallest_id")


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
    k: int = 64,
    threshold: float = 0.6,
    index: str = DEDUP_DEFAULTS.index,
    nprobe: int = DEDUP_DEFAULTS.nprobe,
    exact_below: int = 1_000_000,
    chunk_size: int = 65_536,
    recall_sample: int = 1000,
    seed: int = 0,
    search_actors: int = 0,
    work_dir: Path | None = None,
) -> CopyEdges:
    """Edges (i, j) between each row and those of its k nearest neighbours with cosine > threshold.

    `vectors` are L2-normalised float32. Only thresholded edges are kept, chunk by chunk.
    `search_actors` > 0 searches the chunks on that many Ray actors when Ray is up.
    `work_dir`: each searched chunk's edges are saved there, and chunks found there are not searched
    again, so a killed run resumes where it stopped (the caller keeps the inputs and settings fixed).
    """
    n = vectors.shape[0]
    if n < 2:
        empty = np.zeros(0, np.int64)
        return CopyEdges(empty, empty, np.zeros(0, np.float32), True, None)
    idx, info = build_index(vectors, factory=index, exact_below=exact_below, nprobe=nprobe, seed=seed)
    done = load_edge_chunks(work_dir) if work_dir is not None else {}
    if done:
        log.info("dedup: %d of %d kNN chunks done by an earlier run", len(done), -(-n // chunk_size))
    edges = dict(done)
    chunks = search_chunks_auto(idx, vectors, k + 1, chunk_size, search_actors, nprobe, skip=done)
    for start, s, i in chunks:  # k + 1: a row finds itself
        rows = np.arange(start, start + s.shape[0], dtype=np.int64)[:, None]
        hit = (s > threshold) & (i >= 0) & (i != rows)
        r, c = np.nonzero(hit)
        edges[start] = (rows[r, 0], i[r, c].astype(np.int64), s[r, c])
        if work_dir is not None:
            save_edge_chunk(work_dir, start, *edges[start])
    src, dst, sims = (list(parts) for parts in zip(*(edges[start] for start in sorted(edges)), strict=True))
    recall = None
    if not info.exact:
        recall = recall_against_exact(
            idx, vectors, k + 1, threshold=threshold, sample_size=recall_sample, seed=seed
        )
        log.info("dedup: IVF %s nprobe %d, edge recall vs exact on a sample: %s", index, nprobe, recall)
    return CopyEdges(np.concatenate(src), np.concatenate(dst), np.concatenate(sims), info.exact, recall)


EDGE_CHUNK_GLOB = "edges-*.npz"


def save_edge_chunk(work_dir: Path, start: int, src: np.ndarray, dst: np.ndarray, sims: np.ndarray) -> None:
    """One searched chunk's edges, written to a temp name and renamed (never a half file)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    final = work_dir / f"edges-{start:012d}.npz"
    tmp = work_dir / f".tmp-{final.name}"
    with open(tmp, "wb") as f:
        np.savez(f, src=src, dst=dst, sims=sims)
    os.replace(tmp, final)


def load_edge_chunks(work_dir: Path) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Edges of the chunks an earlier run finished, by first query row."""
    out = {}
    for path in sorted(Path(work_dir).glob(EDGE_CHUNK_GLOB)):
        with np.load(path) as z:
            out[int(path.stem.split("-")[1])] = (z["src"], z["dst"], z["sims"])
    return out


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


def eval_overlap(
    pool_vectors: np.ndarray,
    eval_vectors: np.ndarray,
    *,
    threshold: float = 0.45,
    index: str = DEDUP_DEFAULTS.index,
    nprobe: int = DEDUP_DEFAULTS.nprobe,
    exact_below: int = 1_000_000,
    chunk_size: int = 65_536,
    search_actors: int = 0,
) -> np.ndarray:
    """Which pool rows have an eval image with cosine > threshold (nearest eval vector per pool row)."""
    matched = np.zeros(pool_vectors.shape[0], dtype=bool)
    if eval_vectors.shape[0] == 0 or pool_vectors.shape[0] == 0:
        return matched
    idx, _ = build_index(eval_vectors, factory=index, exact_below=exact_below, nprobe=nprobe)
    sims, ids = search_auto(idx, pool_vectors, 1, chunk_size, search_actors, nprobe)
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
    seed: int = 0,
    search_actors: int = 0,
    work_dir: Path | None = None,
) -> DedupResult:
    """Exact, copy-detection and eval-overlap dedup of a pool (rows of L2-normalised `vectors`).

    work_dir: where the copy-detection search saves its finished chunks (see copy_detection_edges)."""
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
        index=index,
        nprobe=nprobe,
        exact_below=exact_below,
        chunk_size=chunk_size,
        search_actors=search_actors,
    )
    # Exact copies have the same vector: search only one of each, join the rest by their hash edge.
    searched = vectors if unique_rows.size == n else vectors[unique_rows]  # no copy when all are distinct
    edges = copy_detection_edges(
        searched, k=k, threshold=threshold, seed=seed, work_dir=work_dir, **search_params
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
    kept_row = choose_kept(labels, image_ids, area, keep_rule)

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
