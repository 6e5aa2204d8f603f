"""AC-PIC: agglomerative clustering via maximum incremental path integral (Zhang, Zhao, Wang,
Pattern Recognition 2013), the initial clustering DEPICT's authors used for USPS and MNIST-test
(their ``predict_ac_mpi``: K = 20 neighbours, a = 1, z = 0.01).

A directed K-nearest-neighbour graph with weights w_ij = exp(−d_ij² / σ²) (plus self-loops) is
row-normalised into P. Each point starts in a cluster with its nearest neighbour; clusters are
then merged greedily, the pair whose merge most increases the path integral

    S(C) = (1/|C|²) 1ᵀ (I − zP_C)⁻¹ 1

first, until K clusters remain. Two changes make it scale (both exact to rounding): affinities
are computed only for clusters joined by an edge (for any other pair the increase is exactly 0),
and (I − zP)⁻¹ is summed as its Neumann series Σ_t (zP)^t, 6 terms (z = 0.01: error < 1e-12),
so memory is O(N·K) instead of the authors' dense N×N matrices.
"""

from __future__ import annotations

import heapq

import faiss
import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

NEUMANN_TERMS = 6


def acpic(
    features: np.ndarray,
    n_clusters: int,
    k: int = 20,
    a: float = 1.0,
    z: float = 0.01,
    min_size: int | None = None,
) -> np.ndarray:
    """Labels 0..n_clusters-1 for the rows of ``features`` (N × D).

    A cluster smaller than ``min_size`` (default a tenth of the average size N / n_clusters)
    is an outlier group: once only ``n_clusters`` clusters are at least that big, two of them
    are no longer merged with each other, and the small ones are merged into them instead.
    Without this guard a couple of mutual-neighbour outliers, whose path integral with the
    rest is tiny, survive as clusters of their own while two real clusters merge."""
    feats = np.ascontiguousarray(features, dtype=np.float32)
    n = len(feats)
    if not 1 <= n_clusters <= n:
        raise ValueError(f"cannot make {n_clusters} clusters of {n} points")
    k = max(1, min(k, n - 1))
    if n_clusters == n:  # (n_clusters <= n, so this also covers a single point)
        return np.arange(n, dtype=np.int64)
    p, nearest = _transition_matrix(feats, k, a)
    parts, first = connected_components(
        sp.csr_matrix((np.ones(n), (np.arange(n), nearest)), shape=(n, n)), directed=False
    )
    if parts < n_clusters:  # e.g. many duplicates: start from single points instead
        first = np.arange(n)
    if min_size is None:
        min_size = max(1, n // (10 * n_clusters))
    return _merge(p, first, n_clusters, z, min_size)


def _transition_matrix(feats: np.ndarray, k: int, a: float) -> tuple[sp.csr_matrix, np.ndarray]:
    """Row-normalised K-NN graph with Gaussian weights and self-loops; also each point's NN."""
    index = faiss.IndexFlatL2(feats.shape[1])
    index.add(feats)
    dist, idx = index.search(feats, k + 1)
    dist = np.maximum(dist.astype(np.float64), 0.0)  # squared distances; column 0 is the point
    self_first = idx[:, 0] == np.arange(len(feats))
    # duplicates can put another point first: drop whichever column holds the point itself
    drop = np.where(self_first, 0, np.argmax(idx == np.arange(len(feats))[:, None], axis=1))
    keep = np.ones_like(idx, dtype=bool)
    keep[np.arange(len(feats)), drop] = False
    dist, idx = dist[keep].reshape(len(feats), k), idx[keep].reshape(len(feats), k)
    sig2 = float(np.mean(dist[:, : max(k, 3)])) * a or 1.0
    while np.any(np.exp(-dist[:, 0] / sig2) < 1e-5):  # as the authors: widen a too-small σ
        sig2 *= 2
    n = len(feats)
    w = sp.csr_matrix(
        (np.exp(-dist / sig2).ravel(), (np.repeat(np.arange(n), k), idx.ravel())), shape=(n, n)
    ) + sp.identity(n, format="csr")
    p = sp.csr_matrix(w.multiply(1.0 / np.asarray(w.sum(axis=1))))
    return p, idx[:, 0]


class _Graph:
    """P's CSR arrays, and the blocks P_S of sets S of points as (row, column, value) triplets
    in positions 0..|S|-1, gathered straight from the arrays: scipy's ``p[s][:, s]`` cost three
    times the sums themselves on the many small sets of the first merges."""

    def __init__(self, p: sp.csr_matrix) -> None:
        self.indptr, self.indices, self.data = p.indptr, p.indices, p.data
        self.pos = np.full(p.shape[0], -1, dtype=np.int64)  # point -> position in S, or -1

    def block(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        starts = self.indptr[s]
        counts = self.indptr[s + 1] - starts
        # positions of the rows' entries in indices/data, row after row
        at = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        self.pos[s] = np.arange(len(s))
        cols = self.pos[self.indices[at]]
        self.pos[s] = -1
        keep = cols >= 0
        return np.repeat(np.arange(len(s)), counts)[keep], cols[keep], self.data[at][keep]


def _path_sum(
    block: tuple[np.ndarray, np.ndarray, np.ndarray], y: np.ndarray, z: float
) -> np.ndarray:
    """(I − z·P_S)⁻¹ y by its Neumann series, P_S given as (row, column, value) triplets."""
    rows, cols, vals = block
    v, total = y, y.copy()
    for _ in range(NEUMANN_TERMS):
        v = z * np.bincount(rows, weights=vals * v[cols], minlength=len(y))
        total += v
    return total


def _merge(
    p: sp.csr_matrix, labels: np.ndarray, n_clusters: int, z: float, min_size: int
) -> np.ndarray:
    members = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
    owner = labels.astype(np.int64)
    linked = sp.csr_matrix(p + p.T)

    graph = _Graph(p)

    def complexity(s: np.ndarray) -> float:
        return float(_path_sum(graph.block(s), np.ones(len(s)), z).sum()) / len(s) ** 2

    def gain(i: int, j: int) -> float:
        si, sj = members[i], members[j]
        s = np.concatenate([si, sj])
        p_s, ni = graph.block(s), len(si)
        yi = np.zeros(len(s))
        yi[:ni] = 1.0
        within_i = _path_sum(p_s, yi, z)[:ni].sum() / ni**2
        within_j = _path_sum(p_s, 1.0 - yi, z)[ni:].sum() / len(sj) ** 2
        return float(within_i + within_j) - own[i] - own[j]

    def neighbours(c: int) -> set[int]:
        return {int(d) for d in owner[linked[members[c]].indices]} - {c}

    own = {c: complexity(s) for c, s in members.items()}
    version = dict.fromkeys(members, 0)
    heap: list[tuple[float, int, int, int, int]] = []

    def push(i: int, j: int) -> None:
        i, j = min(i, j), max(i, j)
        heapq.heappush(heap, (-gain(i, j), i, j, version[i], version[j]))

    for c in list(members):
        for d in neighbours(c):
            if c < d:
                push(c, d)
    big = sum(len(s) >= min_size for s in members.values())
    deferred: list[tuple[float, int, int, int, int]] = []  # big pairs held back
    while len(members) > n_clusters:
        if not heap:  # parts of the graph that no edge joins: merge the two smallest
            i, j = sorted(members, key=lambda c: (len(members[c]), c))[:2]
        else:
            entry = heapq.heappop(heap)
            _, i, j, vi, vj = entry
            if version.get(i) != vi or version.get(j) != vj:
                continue  # stale: one of them has merged since
            if big <= n_clusters and min(len(members[i]), len(members[j])) >= min_size:
                deferred.append(entry)
                continue
        big -= (len(members[i]) >= min_size) + (len(members[j]) >= min_size)
        members[i] = np.concatenate([members[i], members.pop(j)])
        big += len(members[i]) >= min_size
        if big > n_clusters and deferred:  # a small cluster grew big: big pairs may merge again
            for entry in deferred:
                heapq.heappush(heap, entry)
            deferred.clear()
        owner[members[i]] = i
        version[i] += 1
        del version[j], own[j]
        own[i] = complexity(members[i])
        for d in neighbours(i):
            push(i, d)
    out = np.empty(len(labels), dtype=np.int64)
    for new, c in enumerate(sorted(members)):
        out[members[c]] = new
    return out
