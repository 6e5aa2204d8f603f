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
    """P's CSR arrays and the clusters: ``owner`` (point -> cluster), ``members`` (cluster ->
    its points) and ``place`` (point -> its position in its cluster's member array).
    ``blocks`` gathers the blocks P_S of many sets S at once, laid out one after another as a
    block-diagonal matrix in (row, column, value) triplets: most sets are a few dozen points,
    where numpy's per-call cost, not the arithmetic, is the price, so one batch for all the
    pairs of a merge costs about what one pair did."""

    def __init__(self, p: sp.csr_matrix, labels: np.ndarray) -> None:
        self.indptr, self.indices, self.data = p.indptr, p.indices, p.data
        linked = sp.csr_matrix(p + p.T)  # the edges either way, for the neighbours
        self.linked_indptr, self.linked_indices = linked.indptr, linked.indices
        self.owner = labels.astype(np.int64)
        order = np.argsort(self.owner, kind="stable")
        ids, counts = np.unique(self.owner[order], return_counts=True)
        self.members = dict(zip(ids.tolist(), np.split(order, np.cumsum(counts)[:-1]), strict=True))
        self.place = np.empty(len(labels), dtype=np.int64)
        for s in self.members.values():
            self.place[s] = np.arange(len(s))

    def merge(self, i: int, j: int) -> None:
        """C_i ← C_i ∪ C_j."""
        moved = self.members.pop(j)
        self.place[moved] += len(self.members[i])
        self.owner[moved] = i
        self.members[i] = np.concatenate([self.members[i], moved])

    def rows(
        self, points: np.ndarray, indptr: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Positions in indices/data (of P, or of the CSR matrix with ``indptr``) of the stored
        entries of ``points``' rows, and for each the index in ``points`` of its row."""
        indptr = self.indptr if indptr is None else indptr
        start = indptr[points]
        counts = indptr[points + 1] - start
        at = np.repeat(start - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        return at, np.repeat(np.arange(len(points)), counts)

    def blocks(
        self, firsts: np.ndarray, seconds: np.ndarray
    ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray, np.ndarray]:
        """Triplets of the block-diagonal matrix of the sets C_first ∪ C_second (second = -1:
        C_first alone), and for each position its set's index and whether it is in C_first."""
        firsts, seconds = np.asarray(firsts, np.int64), np.asarray(seconds, np.int64)
        none = np.empty(0, dtype=np.int64)
        parts = [
            (self.members[f], self.members[s] if s >= 0 else none)
            for f, s in zip(firsts.tolist(), seconds.tolist(), strict=True)
        ]
        n_first = np.array([len(a) for a, _ in parts], dtype=np.int64)
        n_all = n_first + np.array([len(b) for _, b in parts], dtype=np.int64)
        points = np.concatenate([x for part in parts for x in part])
        group = np.repeat(np.arange(len(parts)), n_all)
        starts = np.cumsum(n_all) - n_all
        in_first = np.arange(len(points)) - starts[group] < n_first[group]
        at, rows = self.rows(points)
        cols, g = self.indices[at], group[rows]
        who = self.owner[cols]
        # a column's position in its row's set: its place in C_first, or after C_first in
        # C_second; columns outside the set are dropped
        offset = np.where(who == firsts[g], 0, np.where(who == seconds[g], n_first[g], -1))
        keep = offset >= 0
        cols = starts[g] + offset + self.place[cols]
        return (rows[keep], cols[keep], self.data[at][keep]), group, in_first

    def neighbours(self, c: int) -> np.ndarray:
        """The clusters joined to C_c by an edge either way."""
        at, _ = self.rows(self.members[c], self.linked_indptr)
        found = np.unique(self.owner[self.linked_indices[at]])
        return found[found != c]

    def linked_pairs(self) -> np.ndarray:
        """Every pair of clusters (i, j), i < j, that an edge joins, as rows."""
        a = self.owner[np.repeat(np.arange(len(self.owner)), np.diff(self.linked_indptr))]
        b = self.owner[self.linked_indices]
        pairs = np.stack([np.minimum(a, b), np.maximum(a, b)], 1)[a != b]
        return np.unique(pairs, axis=0)


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


def _complexities(graph: _Graph, clusters: np.ndarray, z: float) -> np.ndarray:
    """S(C) = (1/|C|²) 1ᵀ(I − zP_C)⁻¹1 for each cluster C in ``clusters``."""
    out = np.empty(len(clusters))
    for chunk in _chunks(graph, clusters[:, None]):
        block, group, _ = graph.blocks(clusters[chunk], np.full(len(chunk), -1))
        sums = _path_sum(block, np.ones(len(group)), z)
        out[chunk] = np.bincount(group, sums, len(chunk)) / np.bincount(group) ** 2
    return out


def _gains(graph: _Graph, pairs: np.ndarray, own: dict[int, float], z: float) -> np.ndarray:
    """The path integral's increase from merging each pair (i, j) of ``pairs`` (rows):

        S(C_i | C_i ∪ C_j) − S(C_i) + S(C_j | C_i ∪ C_j) − S(C_j),

    S(C_i | S) = (1/|C_i|²) 1_iᵀ (I − zP_S)⁻¹ 1_i counting the paths from C_i back to C_i
    that may pass through the rest of S."""
    out = np.empty(len(pairs))
    for chunk in _chunks(graph, pairs):
        block, group, in_first = graph.blocks(pairs[chunk, 0], pairs[chunk, 1])
        y = in_first.astype(np.float64)
        n = len(chunk)
        within_i = np.bincount(group, _path_sum(block, y, z) * y, n)
        within_j = np.bincount(group, _path_sum(block, 1.0 - y, z) * (1.0 - y), n)
        n_i = np.bincount(group, y, n)
        n_j = np.bincount(group, minlength=n) - n_i
        own_ij = np.array([own[i] + own[j] for i, j in pairs[chunk].tolist()])
        out[chunk] = within_i / n_i**2 + within_j / n_j**2 - own_ij
    return out


def _chunks(graph: _Graph, sets: np.ndarray, points: int = 200_000) -> list[np.ndarray]:
    """Row indices of ``sets`` (cluster ids, -1 for none) in batches of about ``points``
    points: big enough to amortise numpy's per-call cost, small enough for memory."""
    if len(sets) == 0:
        return []
    sizes = np.array([sum(len(graph.members[c]) for c in s if c >= 0) for s in sets.tolist()])
    batch = np.cumsum(sizes) // points
    return np.split(np.arange(len(sets)), np.flatnonzero(np.diff(batch)) + 1)


def _merge(
    p: sp.csr_matrix, labels: np.ndarray, n_clusters: int, z: float, min_size: int
) -> np.ndarray:
    graph = _Graph(p, labels)
    members = graph.members

    ids = np.array(sorted(members))
    own = dict(zip(ids.tolist(), _complexities(graph, ids, z).tolist(), strict=True))
    version = dict.fromkeys(members, 0)
    pairs = graph.linked_pairs()  # for any other pair the gain is exactly 0
    heap = [
        (-g, i, j, 0, 0)
        for g, (i, j) in zip(_gains(graph, pairs, own, z), pairs.tolist(), strict=True)
    ]
    heapq.heapify(heap)
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
        graph.merge(i, j)
        big += len(members[i]) >= min_size
        if big > n_clusters and deferred:  # a small cluster grew big: big pairs may merge again
            for entry in deferred:
                heapq.heappush(heap, entry)
            deferred.clear()
        version[i] += 1
        del version[j], own[j]
        own[i] = float(_complexities(graph, np.array([i]), z)[0])
        others = graph.neighbours(i)
        pairs = np.stack([np.minimum(others, i), np.maximum(others, i)], 1)
        for g, (a_, b_) in zip(_gains(graph, pairs, own, z), pairs.tolist(), strict=True):
            heapq.heappush(heap, (-g, a_, b_, version[a_], version[b_]))
    out = np.empty(len(labels), dtype=np.int64)
    for new, c in enumerate(sorted(members)):
        out[members[c]] = new
    return out
