"""AC-PIC: agglomerative clustering via maximum incremental path integral (Zhang, Zhao, Wang,
Pattern Recognition 2013), the initial clustering DEPICT's authors used for USPS and MNIST-test
(their ``predict_ac_mpi``: K = 20 neighbours, a = 1, z = 0.01).

A directed K-nearest-neighbour graph with weights w_ij = exp(−d_ij² / σ²) (plus self-loops) is
row-normalised into P. Each point starts in a cluster with its nearest neighbour; clusters are
then merged greedily, the pair whose merge most increases the path integral

    S(C) = (1/|C|²) 1ᵀ (I − zP_C)⁻¹ 1

first, until K clusters remain. Two changes make it scale, neither changing the result beyond
rounding: increases are computed only for clusters joined by an edge (for any other pair the
increase is exactly 0), and (I − zP)⁻¹ is summed as its Neumann series Σ_t (zP)^t over the
paths of up to 6 steps (z = 0.01: error < 1e-12), so memory is O(N·K) instead of the authors'
dense N×N matrices. The loops are compiled with numba, and the increases of the pairs a merge
creates are computed in parallel: on MNIST's 70,000 codes a merge has some 50 neighbours.
"""

from __future__ import annotations

import heapq

import faiss
import numba
import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

PATH_STEPS = 6  # the longest path summed: the next term is z⁷ = 1e-14


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
    """P's CSR arrays and the clusters, as arrays numba can use: ``owner`` (point -> cluster),
    each cluster's points as a linked list (``head``, ``tail``, ``after``: cluster -> first and
    last point, point -> next point or -1), ``place`` (point -> its position in that list),
    ``size`` and ``own`` (cluster -> |C| and S(C))."""

    def __init__(self, p: sp.csr_matrix, labels: np.ndarray, z: float) -> None:
        n = p.shape[0]
        pt = sp.csr_matrix(p.T)
        self.p = (p.indptr.astype(np.int64), p.indices.astype(np.int64), p.data)
        self.pt = (pt.indptr.astype(np.int64), pt.indices.astype(np.int64))
        self.z = z
        self.owner = labels.astype(np.int64)
        order = np.argsort(self.owner, kind="stable")
        sorted_owner = self.owner[order]
        starts = np.r_[True, sorted_owner[1:] != sorted_owner[:-1]]
        ends = np.r_[starts[1:], True]
        self.head, self.tail = np.full(n, -1), np.full(n, -1)
        self.head[sorted_owner[starts]], self.tail[sorted_owner[ends]] = order[starts], order[ends]
        self.after = np.full(n, -1)
        self.after[order[~ends]] = order[1:][~ends[:-1]]
        self.size = np.bincount(self.owner, minlength=n)
        first = np.flatnonzero(starts)
        self.place = np.empty(n, dtype=np.int64)
        self.place[order] = np.arange(n) - np.repeat(first, np.diff(np.r_[first, n]))
        self.clusters = sorted_owner[starts]
        self.own = np.zeros(n)
        self.own[self.clusters] = (
            _integrals(self.clusters, np.full(len(self.clusters), -1), *self._state(), z)[:, 0]
            / self.size[self.clusters] ** 2
        )

    def _state(self) -> tuple[np.ndarray, ...]:
        return (*self.p, self.owner, self.head, self.after, self.place, self.size)

    def merge(self, i: int, j: int) -> None:
        """C_i ← C_i ∪ C_j, and S(C_i) anew."""
        _link(i, j, self.owner, self.head, self.tail, self.after, self.place, self.size)
        one = np.array([i])
        self.own[i] = (
            _integrals(one, np.array([-1]), *self._state(), self.z)[0, 0] / self.size[i] ** 2
        )

    def neighbours(self, c: int, above: int = -1) -> np.ndarray:
        """The clusters d > ``above`` joined to C_c by an edge either way."""
        return _neighbours(
            c, above, self.p[0], self.p[1], *self.pt, self.owner, self.head, self.after
        )

    def gains(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """The path integral's increase from merging each pair (a[g], b[g]):

            S(C_a | C_a ∪ C_b) − S(C_a) + S(C_b | C_a ∪ C_b) − S(C_b),

        S(C_a | S) = (1/|C_a|²) 1_aᵀ (I − zP_S)⁻¹ 1_a counting the paths from C_a back to
        C_a that may pass through the rest of S."""
        within = _integrals(a, b, *self._state(), self.z)
        return (
            within[:, 0] / self.size[a] ** 2 + within[:, 1] / self.size[b] ** 2
            - self.own[a] - self.own[b]
        )  # fmt: skip

    def labels(self) -> np.ndarray:
        """Each point's cluster, numbered 0, 1, ... in the order of the cluster ids."""
        return np.unique(self.owner, return_inverse=True)[1].astype(np.int64)


@numba.njit(cache=True)
def _link(i, j, owner, head, tail, after, place, size) -> None:  # pragma: no cover (compiled)
    """C_i ← C_i ∪ C_j: C_j's list appended to C_i's."""
    p = head[j]
    while p >= 0:
        owner[p] = i
        place[p] += size[i]
        p = after[p]
    after[tail[i]] = head[j]
    tail[i] = tail[j]
    head[j] = tail[j] = -1
    size[i] += size[j]
    size[j] = 0


@numba.njit(cache=True)
def _neighbours(
    c, above, indptr, indices, t_indptr, t_indices, owner, head, after
) -> np.ndarray:  # pragma: no cover (compiled)
    """The clusters d > ``above``, d ≠ c, that an edge of P joins to C_c either way, sorted."""
    found = set()
    p = head[c]
    while p >= 0:
        for e in range(indptr[p], indptr[p + 1]):
            found.add(owner[indices[e]])
        for e in range(t_indptr[p], t_indptr[p + 1]):
            found.add(owner[t_indices[e]])
        p = after[p]
    out = np.array([d for d in found if d != c and d > above], dtype=np.int64)
    return np.sort(out)


def _integrals_py(
    a, b, indptr, indices, data, owner, head, after, place, size, z
) -> np.ndarray:  # pragma: no cover (compiled)
    """For each set S = C_a[g] ∪ C_b[g] (b[g] = -1: C_a[g] alone), 1_aᵀ(I − zP_S)⁻¹1_a and
    1_bᵀ(I − zP_S)⁻¹1_b (columns 0 and 1), by the Neumann series Σ_t (zP_S)^t over
    PATH_STEPS terms after the first; the sets in parallel."""
    out = np.zeros((len(a), 2))
    for g in numba.prange(len(a)):
        c_a, c_b = a[g], b[g]
        n_a = size[c_a]
        n = n_a + (size[c_b] if c_b >= 0 else 0)
        points = np.empty(n, dtype=np.int64)
        r = 0
        for c in (c_a, c_b):
            p = head[c] if c >= 0 else -1
            while p >= 0:
                points[r] = p
                r += 1
                p = after[p]
        # P_S in CSR with positions in S: a point's place in C_a, or after C_a in C_b
        room = 0
        for p in points:
            room += indptr[p + 1] - indptr[p]
        row_ptr = np.empty(n + 1, dtype=np.int64)
        cols = np.empty(room, dtype=np.int64)
        vals = np.empty(room)
        m = 0
        for r in range(n):
            row_ptr[r] = m
            p = points[r]
            for e in range(indptr[p], indptr[p + 1]):
                q = indices[e]
                if owner[q] == c_a:
                    cols[m] = place[q]
                elif owner[q] == c_b:
                    cols[m] = n_a + place[q]
                else:
                    continue
                vals[m] = data[e]
                m += 1
        row_ptr[n] = m
        for side in range(1 if c_b < 0 else 2):
            lo, hi = (0, n_a) if side == 0 else (n_a, n)
            v = np.zeros(n)
            v[lo:hi] = 1.0
            total = v.copy()
            step = np.empty(n)
            for _ in range(PATH_STEPS):
                for r in range(n):
                    s = 0.0
                    for e in range(row_ptr[r], row_ptr[r + 1]):
                        s += vals[e] * v[cols[e]]
                    step[r] = z * s
                v, step = step, v
                total += v
            out[g, side] = total[lo:hi].sum()
    return out


# one set at a time for the few sets of a cluster's own integral: starting threads costs more
_integrals_serial = numba.njit(cache=True)(_integrals_py)
_integrals_parallel = numba.njit(cache=True, parallel=True)(_integrals_py)


def _integrals(a: np.ndarray, b: np.ndarray, *state: np.ndarray | float) -> np.ndarray:
    """``_integrals_py`` compiled, in parallel when there are sets enough. The first call on
    a machine compiles both versions (about 12 s on 2 cores); numba caches them after that."""
    return (_integrals_parallel if len(a) >= 8 else _integrals_serial)(a, b, *state)


def _merge(
    p: sp.csr_matrix, labels: np.ndarray, n_clusters: int, z: float, min_size: int
) -> np.ndarray:
    graph = _Graph(p, labels, z)
    size = graph.size  # kept by graph.merge

    def is_big(c: int) -> int:  # an int: numpy bools add as "or"
        return int(size[c] >= min_size)

    alive = set(graph.clusters.tolist())
    version = dict.fromkeys(alive, 0)
    # every pair an edge joins, i < j (for any other pair the increase is exactly 0)
    pairs = [(i, j) for i in sorted(alive) for j in graph.neighbours(i, above=i).tolist()]
    a, b = np.array(pairs, dtype=np.int64).reshape(-1, 2).T
    heap = [
        (-g, i, j, 0, 0)
        for g, i, j in zip(graph.gains(a, b).tolist(), a.tolist(), b.tolist(), strict=True)
    ]
    heapq.heapify(heap)
    big = sum(is_big(c) for c in alive)
    deferred: list[tuple[float, int, int, int, int]] = []  # big pairs held back
    while len(alive) > n_clusters:
        if not heap:  # parts of the graph that no edge joins: merge the two smallest
            i, j = sorted(alive, key=lambda c: (size[c], c))[:2]
        else:
            entry = heapq.heappop(heap)
            _, i, j, vi, vj = entry
            if version.get(i) != vi or version.get(j) != vj:
                continue  # stale: one of them has merged since
            if big <= n_clusters and is_big(i) and is_big(j):
                deferred.append(entry)
                continue
        big -= is_big(i) + is_big(j)
        graph.merge(i, j)
        alive.discard(j)
        big += is_big(i)
        if big > n_clusters and deferred:  # a small cluster grew big: big pairs may merge again
            for entry in deferred:
                heapq.heappush(heap, entry)
            deferred.clear()
        version[i] += 1
        del version[j]
        others = graph.neighbours(i)
        gains = graph.gains(np.full(len(others), i), others)
        for d, g in zip(others.tolist(), gains.tolist(), strict=True):
            lo, hi = min(i, d), max(i, d)
            heapq.heappush(heap, (-g, lo, hi, version[lo], version[hi]))
    return graph.labels()
