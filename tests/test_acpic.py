"""AC-PIC, DEPICT's initial clustering: recovers well-separated groups, any shape of input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imgcluster.methods import acpic as acpic_module
from imgcluster.methods.acpic import _Graph, _transition_matrix, acpic, compile_ahead
from imgcluster.metrics import accuracy


def _blobs(n_per: int, centres: list[list[float]], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(c, 0.3, size=(n_per, len(c))) for c in centres])
    return x.astype(np.float32), np.repeat(np.arange(len(centres)), n_per)


def test_recovers_separated_blobs() -> None:
    x, y = _blobs(60, [[0, 0, 0], [5, 0, 0], [0, 5, 0], [0, 0, 5]])
    labels = acpic(x, 4)
    assert sorted(np.unique(labels)) == [0, 1, 2, 3]
    assert accuracy(y, labels) == 1.0


def test_follows_a_manifold_where_kmeans_cuts_it() -> None:
    # two long parallel lines: k-means splits each across the middle, the path integral does not
    t = np.linspace(0, 20, 200)
    x = np.concatenate([np.stack([t, np.zeros_like(t)], 1), np.stack([t, np.full_like(t, 2)], 1)])
    y = np.repeat([0, 1], 200)
    assert accuracy(y, acpic(x.astype(np.float32), 2, k=5)) == 1.0


def test_disconnected_graph_and_small_inputs() -> None:
    x, _ = _blobs(5, [[0, 0], [100, 100], [200, 0], [0, 200]])
    labels = acpic(x, 2, k=3)  # four islands no edge joins, merged down to two
    assert len(np.unique(labels)) == 2
    assert acpic(x[:3], 3).tolist() == [0, 1, 2]
    assert len(np.unique(acpic(np.zeros((10, 2), np.float32), 3))) == 3  # all duplicates
    with pytest.raises(ValueError, match="cannot make"):
        acpic(x, 0)


def test_an_outlier_pair_does_not_become_a_cluster() -> None:
    rng = np.random.default_rng(0)
    blobs = [rng.normal([0, 0], 0.3, (100, 2)), rng.normal([2, 0], 0.3, (100, 2))]
    outliers = [[1, 5], [1.05, 5]]  # far from both blobs, each other's nearest neighbour
    x = np.concatenate([*blobs, outliers]).astype(np.float32)
    y = np.repeat([0, 1], 100)
    labels = acpic(x, 2)
    assert accuracy(y, labels[:200]) == 1.0 and min(np.bincount(labels)) >= 100
    unguarded = acpic(x, 2, min_size=1)  # what the guard prevents: the two blobs merged
    assert sorted(np.bincount(unguarded)) == [2, 200]


def test_merge_gains_match_the_dense_inverse() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 3)).astype(np.float32)
    p, _ = _transition_matrix(x, 6, 1.0)
    labels = rng.integers(0, 6, 80)
    graph = _Graph(p, labels, 0.01)
    graph.merge(0, 1)  # the sums must follow a merge too
    labels[labels == 1] = 0
    dense = p.toarray()

    def integral(c: int, clusters: list[int]) -> float:  # S(C_c | union of the clusters)
        s = np.flatnonzero(np.isin(labels, clusters))
        inverse = np.linalg.inv(np.eye(len(s)) - 0.01 * dense[np.ix_(s, s)])
        inside = labels[s] == c
        return inverse[np.ix_(inside, inside)].sum() / inside.sum() ** 2

    for i in (0, 2, 3):
        others = graph.neighbours(i)
        assert len(others) > 0 and 1 not in others
        gains = graph.gains(np.full(len(others), i), others)
        expected = [
            integral(i, [i, j]) - integral(i, [i]) + integral(j, [i, j]) - integral(j, [j])
            for j in others.tolist()
        ]
        assert np.allclose(gains, expected, rtol=1e-8, atol=0)


def test_merges_follow_the_biggest_gain_of_the_dense_inverse() -> None:
    """The compiled merge loop against the definition: from the nearest-neighbour pairs, merge
    the two edge-joined clusters whose union raises the path integral most, until K are left."""
    from scipy.sparse.csgraph import connected_components

    x = np.random.default_rng(1).normal(size=(70, 2)).astype(np.float32)
    p, nearest = _transition_matrix(x, 5, 1.0)
    dense, n = p.toarray(), len(x)
    edges = (dense + dense.T) > 0
    _, labels = connected_components(edges & (np.eye(n)[nearest] + np.eye(n)[nearest].T > 0))

    def integral(inside: np.ndarray, s: np.ndarray) -> float:
        inverse = np.linalg.inv(np.eye(s.sum()) - 0.01 * dense[np.ix_(s, s)])
        return inverse[np.ix_(inside[s], inside[s])].sum() / inside.sum() ** 2

    while len(np.unique(labels)) > 4:
        best, pair = -np.inf, None
        for i in np.unique(labels):
            for j in np.unique(labels[edges[labels == i].any(0)]):
                if j <= i:
                    continue
                a, b = labels == i, labels == j
                gain = integral(a, a | b) + integral(b, a | b) - integral(a, a) - integral(b, b)
                if gain > best:
                    best, pair = gain, (i, j)
        labels[labels == pair[1]] = pair[0]
    expected = np.unique(labels, return_inverse=True)[1]
    timings: dict[str, object] = {}
    got = acpic(x, 4, k=5, min_size=1, timings=timings)
    assert accuracy(expected, got) == 1.0
    assert set(timings) == {"graph_seconds", "merge_seconds", "threads", "compile_wait_seconds"}


def test_compiling_ahead_in_a_child_process(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _blobs(30, [[0, 0], [6, 0], [0, 6]])
    monkeypatch.setattr(acpic_module, "_cached", lambda: False)  # as on a fresh machine
    with compile_ahead():
        child = acpic_module._ahead
        assert child is not None
        timings: dict[str, object] = {}
        labels = acpic(x, 3, timings=timings)  # waits for the child, then runs
        assert child.poll() == 0  # it ran AC-PIC's every compiled function and exited cleanly
        assert timings["compile_wait_seconds"] >= 0
    assert accuracy(y, labels) == 1.0 and acpic_module._ahead is None


def test_a_child_still_compiling_is_stopped_with_the_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    acpic(_blobs(10, [[0, 0], [6, 0]])[0], 2)
    assert acpic_module._cached()  # compiled by now: nothing to do ahead
    with compile_ahead():
        assert acpic_module._ahead is None
    monkeypatch.setattr(acpic_module, "_cached", lambda: False)
    with compile_ahead():
        child = acpic_module._ahead
        with compile_ahead():  # a nested block neither starts a second child nor stops this one
            assert acpic_module._ahead is child
        assert acpic_module._ahead is child
    assert child is not None and child.poll() is not None and acpic_module._ahead is None
    with compile_ahead(enabled=False):
        assert acpic_module._ahead is None


def test_knn_with_torch_finds_what_faiss_finds() -> None:
    """The K-NN search used for codes on a GPU (run here on the CPU, in blocks of 7 rows):
    the same neighbours in the same order as FAISS, the same squared distances."""
    x = np.random.default_rng(0).normal(size=(300, 10)).astype(np.float32)
    dist, idx = acpic_module._knn_torch(torch.from_numpy(x), 21, block_items=7 * 300)
    want_dist, want_idx = acpic_module._knn_faiss(x, 21)
    assert np.array_equal(idx, want_idx)
    np.testing.assert_allclose(dist, want_dist, rtol=1e-4, atol=1e-4)
    p, nearest = _transition_matrix(torch.from_numpy(x), 20, 1.0)  # a CPU tensor: FAISS
    want_p, want_nearest = _transition_matrix(x, 20, 1.0)
    assert np.array_equal(nearest, want_nearest) and (p != want_p).nnz == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_codes_on_a_gpu_give_the_same_clusters() -> None:
    x, y = _blobs(200, [[0, 0, 0], [5, 0, 0], [0, 5, 0], [0, 0, 5]])
    on_gpu = acpic(torch.from_numpy(x).cuda(), 4)
    assert np.array_equal(on_gpu, acpic(x, 4)) and accuracy(y, on_gpu) == 1.0
