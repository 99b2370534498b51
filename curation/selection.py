"""The `count` smallest rows of each group, chosen across parts without gathering the rows.

Rows have a group (a cluster), a key (a distance, a keyed uniform draw) and an image id; they are
ordered by (key, image_id), so every choice is exact and ties go to the smaller id. The answer is a
cutoff per group: the (key, image_id) of its count-th smallest row. A worker then decides alone
which of its rows are in: those at or below their group's cutoff (`Cutoffs.members`).

How the cutoffs are found, by passes over the parts (each worker returning per-group results only):
  1. histogram: for each undecided group, the rows inside its current key interval are counted in
     `nbins` bins (with each bin's smallest and largest key); the driver keeps, per group, the bin
     that holds the count-th row. Repeated while the kept bins still hold many rows.
  2. collect: the rows inside each group's final interval (few: a bin's worth) come back whole,
     and the driver sorts them to read off the exact cutoff.
When all rows of the undecided groups are few to begin with, step 1 is skipped.

`Selection` is the driver's side (plain numpy: requests in, per-group results out); the per-part
functions `group_histogram` and `boundary_rows` are the workers'. `smallest_per_group` is the
whole-table reference that the distributed result equals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Rows the collect pass may bring back to the driver: a floor, and per undecided group.
COLLECT_MIN = 65_536
COLLECT_PER_GROUP = 64
# Histogram cells (groups x bins) per pass, so a worker's result stays a few tens of MB.
HISTOGRAM_CELLS = 1 << 20
MIN_BINS, MAX_BINS = 16, 1024
MAX_HISTOGRAM_PASSES = 8
_NO_ID = np.iinfo(np.int64).min
_ALL_IDS = np.iinfo(np.int64).max


@dataclass
class Cutoffs:
    """Per group, the (key, image_id) of the last row in: a row is in when (key, id) <= that."""

    key: np.ndarray  # (G,) float64; -inf: no row of the group is in, +inf: every row is
    image_id: np.ndarray  # (G,) int64

    def members(self, groups: np.ndarray, keys: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Which of these rows are among the chosen ones of their group."""
        ck, ci = self.key[groups], self.image_id[groups]
        keys = np.asarray(keys, dtype=np.float64)
        return (keys < ck) | ((keys == ck) & (np.asarray(ids, dtype=np.int64) <= ci))


def smallest_per_group(groups: np.ndarray, keys: np.ndarray, ids: np.ndarray, counts: np.ndarray) -> Cutoffs:
    """Whole-table reference: the cutoffs of the counts[g] smallest (key, id) rows of each group g."""
    groups = np.asarray(groups, dtype=np.int64)
    keys = np.asarray(keys, dtype=np.float64)
    ids = np.asarray(ids, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    g = counts.size
    cut_key, cut_id = np.full(g, -np.inf), np.full(g, _NO_ID, dtype=np.int64)
    order = np.lexsort((ids, keys, groups))
    sorted_groups = groups[order]
    rank = np.arange(order.size) - np.searchsorted(sorted_groups, sorted_groups, side="left")
    size = np.bincount(groups, minlength=g)
    last = rank == counts[sorted_groups] - 1
    cut_key[sorted_groups[last]] = keys[order[last]]
    cut_id[sorted_groups[last]] = ids[order[last]]
    every = counts >= size
    cut_key[every], cut_id[every] = np.inf, _ALL_IDS
    cut_key[counts <= 0], cut_id[counts <= 0] = -np.inf, _NO_ID
    return Cutoffs(cut_key, cut_id)


@dataclass
class Request:
    """What a pass asks each worker: for the listed groups, their rows with lo <= key <= hi."""

    kind: str  # "histogram" or "collect"
    groups: np.ndarray  # (A,) int64 group ids
    lo: np.ndarray  # (A,) float64
    hi: np.ndarray  # (A,) float64
    nbins: int
    num_groups: int  # G: groups are 0 .. G-1

    def _rows(self, groups: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row indices, their position in self.groups, their keys) of the rows inside the intervals."""
        pos = np.full(self.num_groups, -1, dtype=np.int64)
        pos[self.groups] = np.arange(self.groups.size)
        at = pos[np.asarray(groups, dtype=np.int64)]
        keys = np.asarray(keys, dtype=np.float64)
        inside = at >= 0
        rows = np.flatnonzero(inside)
        at, keys = at[rows], keys[rows]
        keep = (keys >= self.lo[at]) & (keys <= self.hi[at])
        return rows[keep], at[keep], keys[keep]


@dataclass
class Histogram:
    """Per requested group and bin: rows, smallest key, largest key."""

    counts: np.ndarray  # (A, nbins) int64
    min_key: np.ndarray  # (A, nbins) float64, inf where empty
    max_key: np.ndarray  # (A, nbins) float64, -inf where empty

    @staticmethod
    def merge(parts: list[Histogram]) -> Histogram:
        return Histogram(
            np.sum([p.counts for p in parts], axis=0),
            np.min([p.min_key for p in parts], axis=0),
            np.max([p.max_key for p in parts], axis=0),
        )


def _bins(keys: np.ndarray, lo: np.ndarray, hi: np.ndarray, nbins: int) -> np.ndarray:
    """Bin of each key in [lo, hi] split in nbins equal widths: monotone in the key, so every bin
    holds a contiguous run of keys (the same formula on every worker)."""
    width = hi - lo
    with np.errstate(invalid="ignore", divide="ignore"):
        b = np.floor((keys - lo) / width * nbins)
    b = np.where(width > 0, b, 0)
    return np.clip(b, 0, nbins - 1).astype(np.int64)


def group_histogram(groups: np.ndarray, keys: np.ndarray, request: Request) -> Histogram:
    """A worker's histogram pass over one part (or several parts' rows)."""
    _, at, keys = request._rows(groups, keys)
    a, nb = request.groups.size, request.nbins
    cell = at * nb + _bins(keys, request.lo[at], request.hi[at], nb)
    counts = np.bincount(cell, minlength=a * nb).astype(np.int64)
    min_key, max_key = np.full(a * nb, np.inf), np.full(a * nb, -np.inf)
    np.minimum.at(min_key, cell, keys)
    np.maximum.at(max_key, cell, keys)
    return Histogram(counts.reshape(a, nb), min_key.reshape(a, nb), max_key.reshape(a, nb))


def boundary_rows(
    groups: np.ndarray, keys: np.ndarray, ids: np.ndarray, request: Request
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A worker's collect pass over one part: (group, key, image_id) of its rows inside the intervals."""
    rows, at, keys = request._rows(groups, keys)
    return request.groups[at], keys, np.asarray(ids, dtype=np.int64)[rows]


class Selection:
    """The driver's side of a distributed `smallest_per_group`: which pass to run next and what the
    workers' results say. Holds per-group arrays only (and at most a bounded collect).

        sel = Selection(sizes, counts, lo, hi)
        while (req := sel.next_request()) is not None:
            results = [per-part group_histogram / boundary_rows for every part]
            sel.add_histograms(results) / sel.add_boundary(results)
        sel.cutoffs
    """

    def __init__(self, sizes: np.ndarray, counts: np.ndarray, lo, hi):
        """sizes[g]: rows of group g; counts[g]: rows to choose; lo/hi: a key range holding every
        row of each group (arrays or scalars)."""
        self.sizes = np.asarray(sizes, dtype=np.int64)
        g = self.sizes.size
        self.counts = np.minimum(np.maximum(np.asarray(counts, dtype=np.int64), 0), self.sizes)
        if self.counts.shape != (g,):
            raise ValueError(f"counts must have one entry per group ({g}), got {self.counts.shape}")
        self.lo = np.broadcast_to(np.asarray(lo, dtype=np.float64), (g,)).copy()
        self.hi = np.broadcast_to(np.asarray(hi, dtype=np.float64), (g,)).copy()
        self.below = np.zeros(g, dtype=np.int64)  # rows under lo
        self.inside = self.sizes.copy()  # rows in [lo, hi]
        self.key = np.full(g, -np.inf)
        self.image_id = np.full(g, _NO_ID, dtype=np.int64)
        every = (self.counts == self.sizes) & (self.sizes > 0)
        self.key[every], self.image_id[every] = np.inf, _ALL_IDS
        self.pending = np.flatnonzero((self.counts > 0) & (self.counts < self.sizes))
        self.histogram_passes = 0
        self._request: Request | None = None

    @property
    def cutoffs(self) -> Cutoffs:
        if self.pending.size:
            raise RuntimeError("selection not finished: run the passes next_request() asks for")
        return Cutoffs(self.key, self.image_id)

    def next_request(self) -> Request | None:
        """The next pass to run over every part, or None when the cutoffs are known."""
        p = self.pending
        if p.size == 0:
            self._request = None
            return None
        limit = max(COLLECT_MIN, COLLECT_PER_GROUP * p.size)
        splittable = p[(self.hi[p] > self.lo[p]) & (self.inside[p] > COLLECT_PER_GROUP)]
        if (
            self.inside[p].sum() <= limit
            or splittable.size == 0
            or self.histogram_passes >= MAX_HISTOGRAM_PASSES
        ):
            self._request = Request("collect", p, self.lo[p], self.hi[p], 1, self.sizes.size)
        else:
            nbins = int(np.clip(HISTOGRAM_CELLS // splittable.size, MIN_BINS, MAX_BINS))
            lo, hi = self.lo[splittable], self.hi[splittable]
            self._request = Request("histogram", splittable, lo, hi, nbins, self.sizes.size)
        return self._request

    def add_histograms(self, parts: list[Histogram]) -> None:
        """Narrow each histogrammed group to the bin that holds its count-th row."""
        req = self._request
        if req is None or req.kind != "histogram":
            raise RuntimeError("add_histograms answers a histogram request")
        h = Histogram.merge(parts)
        g = req.groups
        if not np.array_equal(h.counts.sum(1), self.inside[g]):
            raise RuntimeError("selection: the parts changed between passes (row counts differ)")
        cum = self.below[g][:, None] + np.cumsum(h.counts, axis=1)
        j = np.argmax(cum >= self.counts[g][:, None], axis=1)
        rows = np.arange(g.size)
        self.below[g] = cum[rows, j] - h.counts[rows, j]
        self.inside[g] = h.counts[rows, j]
        self.lo[g], self.hi[g] = h.min_key[rows, j], h.max_key[rows, j]
        self.histogram_passes += 1

    def add_boundary(self, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
        """Read the exact cutoffs off the collected rows."""
        req = self._request
        if req is None or req.kind != "collect":
            raise RuntimeError("add_boundary answers a collect request")
        groups = np.concatenate([np.zeros(0, np.int64)] + [np.asarray(p[0], np.int64) for p in parts])
        keys = np.concatenate([np.zeros(0)] + [np.asarray(p[1], np.float64) for p in parts])
        ids = np.concatenate([np.zeros(0, np.int64)] + [np.asarray(p[2], np.int64) for p in parts])
        g = req.groups
        if not np.array_equal(np.bincount(groups, minlength=self.sizes.size)[g], self.inside[g]):
            raise RuntimeError("selection: the parts changed between passes (row counts differ)")
        order = np.lexsort((ids, keys, groups))
        sorted_groups = groups[order]
        start = np.searchsorted(sorted_groups, g, side="left")
        at = order[start + self.counts[g] - self.below[g] - 1]
        self.key[g], self.image_id[g] = keys[at], ids[at]
        self.pending = np.zeros(0, dtype=np.int64)
        self._request = None
