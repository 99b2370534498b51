import numpy as np
import pytest

from lvd.curation.union_find import component_sizes, connected_components


def _bfs_components(n: int, edges: list[tuple[int, int]]) -> np.ndarray:
    """Reference: breadth-first search, label = smallest node of the component."""
    adj = [[] for _ in range(n)]
    for a, b in edges:
        adj[a].append(b)
        adj[b].append(a)
    label = [-1] * n
    for start in range(n):
        if label[start] >= 0:
            continue
        label[start] = start
        frontier = [start]
        while frontier:
            nxt = []
            for u in frontier:
                for v in adj[u]:
                    if label[v] < 0:
                        label[v] = start
                        nxt.append(v)
            frontier = nxt
    return np.array(label)


def test_hand_made_graph():
    # {0,3,7} {1,2,8,9} {4} {5 (self-loop)} {6}
    src = np.array([0, 3, 1, 5, 8, 9])
    dst = np.array([3, 7, 2, 5, 9, 1])
    labels = connected_components(10, src, dst)
    assert labels.tolist() == [0, 1, 1, 0, 4, 5, 6, 0, 1, 1]
    assert component_sizes(labels).tolist() == [3, 4, 4, 3, 1, 1, 1, 3, 4, 4]


def test_long_chain_in_worst_order():
    # A path whose edges point from high to low ids, listed from the far end: many hooks needed.
    n = 2000
    perm = np.random.default_rng(1).permutation(n)
    src, dst = perm[:-1], perm[1:]
    assert (connected_components(n, src[::-1], dst[::-1]) == 0).all()


def test_random_graphs_match_bfs():
    rng = np.random.default_rng(0)
    for n, m in [(50, 30), (300, 280), (1000, 600)]:
        src, dst = rng.integers(0, n, m), rng.integers(0, n, m)
        expected = _bfs_components(n, list(zip(src.tolist(), dst.tolist(), strict=True)))
        assert np.array_equal(connected_components(n, src, dst), expected)


def test_no_edges_and_bad_edges():
    assert connected_components(4, np.array([], int), np.array([], int)).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="endpoints"):
        connected_components(3, np.array([0]), np.array([3]))
