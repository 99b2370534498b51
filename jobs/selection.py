"""The distributed "count smallest rows per group" (`lvd.curation.selection`) over parts: the driver
runs the passes that `Selection` asks for; each pass is one task per part that loads the part's
(group, key, image_id) rows and returns per-group results.

Used for the leaf pick of balanced sampling (key: a keyed uniform draw), the members nearest each
centroid in k-means resampling and in cluster-based retrieval (key: the distance).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

from lvd.curation.selection import Cutoffs, Histogram, Request, Selection, boundary_rows, group_histogram
from lvd.jobs.workers import Fanout, RayFanout

T = TypeVar("T")
# load(item) -> (groups int64, keys float, image_ids int64) of the item's rows
RowLoader = Callable[[T], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _histogram_task(item, *, load: RowLoader, request: Request) -> Histogram:
    groups, keys, _ = load(item)
    return group_histogram(groups, keys, request)


def _boundary_task(item, *, load: RowLoader, request: Request) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    groups, keys, ids = load(item)
    return boundary_rows(groups, keys, ids, request)


def _merge(a: Histogram, b: Histogram) -> Histogram:
    return Histogram.merge([a, b])


def select_smallest(
    items: Sequence[T],
    load: RowLoader,
    sizes: np.ndarray,
    counts: np.ndarray,
    lo: np.ndarray | float,
    hi: np.ndarray | float,
    *,
    name: str,
    fanout: Fanout | None = None,
) -> Cutoffs:
    """Cutoffs of the counts[g] smallest (key, image_id) rows of each group g over all items' rows.

    items: parts (or groups of parts) that `load` reads on a worker; `load` must be picklable (a
    module-level function or a functools.partial of one). sizes[g]: rows of group g over all items
    (from an earlier pass); lo/hi: a key range holding every row of each group (per group or one for
    all, e.g. 0 and 1 for keyed uniforms, or each cluster's distance range). fanout: RayFanout
    (default) or LocalFanout. A row is in when `cutoffs.members(groups, keys, ids)`.
    """
    fanout = fanout or RayFanout()
    sel = Selection(sizes, counts, lo, hi)
    while (request := sel.next_request()) is not None:
        if request.kind == "histogram":
            hist = fanout.fold(
                _histogram_task, items, _merge, name=f"{name} (histogram)", load=load, request=request
            )
            sel.add_histograms([hist])
        else:
            rows = fanout.map(_boundary_task, items, name=f"{name} (boundary)", load=load, request=request)
            sel.add_boundary(rows)
    return sel.cutoffs
