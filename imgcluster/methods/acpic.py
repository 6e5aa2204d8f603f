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
dense N×N matrices. The whole merge loop (heap included) is compiled with numba, and the
increases of the pairs a merge creates are computed in parallel when there are enough points
in them: on MNIST's 70,000 codes a merge has some 50 neighbours.
"""

from __future__ import annotations

import heapq
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import faiss
import numba
import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components

from ..search import _torch_top

PATH_STEPS = 6  # the longest path summed: the next term is z⁷ = 1e-14
PARALLEL_WORK = 1024  # points summed over a merge's sets before threads pay for themselves

_ahead: subprocess.Popen[bytes] | None = None  # the process compiling ahead, if any


@contextmanager
def compile_ahead(enabled: bool = True) -> Iterator[None]:
    """Compile AC-PIC's numba functions in a child process while the caller does something
    else (DEPICT and AE-CM: pretraining), so ``acpic`` finds them in numba's on-disk cache.

    The first call on a machine otherwise compiles them in the caller, some 15-25 s of one
    core that no GPU can share. ``acpic`` waits for the child (which finishes sooner than a
    compilation of its own would); a child still running when the block ends is stopped.
    Nothing happens if the child cannot start, and a failed child just leaves the work to
    ``acpic``. Nothing starts when numba's cache already holds them."""
    global _ahead
    started = enabled and _ahead is None and not _cached()
    if started:
        code = "from imgcluster.methods.acpic import _compile; _compile()"
        try:
            _ahead = subprocess.Popen(
                [sys.executable, "-c", code],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except OSError:
            _ahead = None
    try:
        yield
    finally:
        if started and _ahead is not None:  # an outer block's child is the outer block's
            _ahead.kill()
            _ahead.wait()
            _ahead = None


def _compile() -> None:
    """What the child of ``compile_ahead`` runs: every compiled function, with the argument
    types a real call passes, on ten tight blobs (the clustering itself is instant)."""
    g = np.random.default_rng(0)
    acpic((np.eye(10)[g.integers(0, 10, 500)] + 0.01 * g.normal(size=(500, 10))), 10)


def _cached() -> bool:
    """Whether numba's on-disk cache already holds the functions ``acpic`` calls from Python,
    for this source file (through numba's private cache API: any surprise counts as no)."""
    try:
        return all(
            f._cache._cache_file._load_index()
            for f in (_integrals_parallel, _neighbours, _gains, _merge_loop)
        )
    except Exception:  # numba internals moved: compile ahead anyway
        return False


def _wait_for_ahead() -> float:
    """Seconds spent waiting for a ``compile_ahead`` child to finish."""
    if _ahead is None or _ahead.poll() is not None:
        return 0.0
    start = time.perf_counter()
    _ahead.wait()
    return time.perf_counter() - start


def acpic(
    features: np.ndarray | torch.Tensor,
    n_clusters: int,
    k: int = 20,
    a: float = 1.0,
    z: float = 0.01,
    min_size: int | None = None,
    timings: dict[str, object] | None = None,
) -> np.ndarray:
    """Labels 0..n_clusters-1 for the rows of ``features`` (N × D).

    ``features`` on a GPU (a CUDA tensor) has its K-NN search made there, in blocks (with
    FAISS on the CPU, the K-NN graph of 70,000 codes took 4.2 s on a 16-core GPU host); the
    merges run on the CPU either way.

    ``timings``, when given, receives where the time went: ``graph_seconds`` (the K-NN graph),
    ``merge_seconds`` (the merges), ``threads`` (numba's) and ``compile_wait_seconds`` (the
    wait for a ``compile_ahead`` child).

    A cluster smaller than ``min_size`` (default a tenth of the average size N / n_clusters)
    is an outlier group: once only ``n_clusters`` clusters are at least that big, two of them
    are no longer merged with each other, and the small ones are merged into them instead.
    Without this guard a couple of mutual-neighbour outliers, whose path integral with the
    rest is tiny, survive as clusters of their own while two real clusters merge."""
    n = len(features)
    if not 1 <= n_clusters <= n:
        raise ValueError(f"cannot make {n_clusters} clusters of {n} points")
    k = max(1, min(k, n - 1))
    if n_clusters == n:  # (n_clusters <= n, so this also covers a single point)
        return np.arange(n, dtype=np.int64)
    waited = _wait_for_ahead()
    start = time.perf_counter()
    p, nearest = _transition_matrix(features, k, a)
    graph_seconds = time.perf_counter() - start
    parts, first = connected_components(
        sp.csr_matrix((np.ones(n), (np.arange(n), nearest)), shape=(n, n)), directed=False
    )
    if parts < n_clusters:  # e.g. many duplicates: start from single points instead
        first = np.arange(n)
    if min_size is None:
        min_size = max(1, n // (10 * n_clusters))
    labels = _merge(p, first, n_clusters, z, min_size)
    if timings is not None:
        timings["graph_seconds"] = round(graph_seconds, 3)
        timings["merge_seconds"] = round(time.perf_counter() - start - graph_seconds, 3)
        timings["threads"] = numba.get_num_threads()
        timings["compile_wait_seconds"] = round(waited, 3)
    return labels


def _transition_matrix(
    feats: np.ndarray | torch.Tensor, k: int, a: float
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Row-normalised K-NN graph with Gaussian weights and self-loops; also each point's NN."""
    if isinstance(feats, torch.Tensor) and feats.is_cuda:
        dist, idx = _knn_torch(feats, k + 1)
    else:
        dist, idx = _knn_faiss(_numpy(feats), k + 1)
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


def _numpy(feats: np.ndarray | torch.Tensor) -> np.ndarray:
    """``feats`` as a C-contiguous float32 array, as FAISS takes it."""
    if isinstance(feats, torch.Tensor):
        feats = feats.detach().cpu().numpy()
    return np.ascontiguousarray(feats, dtype=np.float32)


def _knn_faiss(feats: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest rows of each row (itself included): squared distances, indices."""
    index = faiss.IndexFlatL2(feats.shape[1])
    index.add(feats)
    return index.search(feats, k)


def _knn_torch(
    feats: torch.Tensor, k: int, block_items: int = 2**26
) -> tuple[np.ndarray, np.ndarray]:
    """``_knn_faiss`` on the device ``feats`` is on (a GPU): the search module's FAISS-equal
    flat search, a block of queries at a time (at most ``block_items`` distances, 256 MiB)."""
    rows = max(1, block_items // len(feats))
    return _torch_top(feats, feats, "l2", k, feats.device, chunk=rows)


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
        alone = np.full(len(self.clusters), -1)
        self.own[self.clusters] = (
            _integrals_parallel(self.clusters, alone, *self._state(), z)[:, 0]
            / self.size[self.clusters] ** 2
        )

    def _state(self) -> tuple[np.ndarray, ...]:
        return (*self.p, self.owner, self.head, self.after, self.place, self.size)

    def arrays(self) -> tuple[np.ndarray, ...]:
        """The edges and cluster lists ``_merge_pair`` and ``_merge_loop`` take as one tuple:
        (indptr, indices, data, t_indptr, t_indices, owner, head, tail, after, place)."""
        return (*self.p, *self.pt, self.owner, self.head, self.tail, self.after, self.place)

    def merge(self, i: int, j: int) -> None:
        """C_i ← C_i ∪ C_j, and S(C_i) anew."""
        _merge_pair(i, j, self.arrays(), self.size, self.own, self.z)

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
        return _gains(a, b, *self._state(), self.own, self.z)

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


@numba.njit(cache=True)
def _set_integrals(
    c_a, c_b, indptr, indices, data, owner, head, after, place, size, z, out
) -> None:  # pragma: no cover (compiled)
    """For S = C_a ∪ C_b (c_b = -1: C_a alone), 1_aᵀ(I − zP_S)⁻¹1_a into out[0] and
    1_bᵀ(I − zP_S)⁻¹1_b into out[1], by the Neumann series Σ_t (zP_S)^t over PATH_STEPS
    terms after the first."""
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
    if c_b < 0:
        out[0] = _series(row_ptr, cols, vals, z, 0, n_a)
    else:
        out[0], out[1] = _series_pair(row_ptr, cols, vals, z, n_a)


@numba.njit(cache=True)
def _series(row_ptr, cols, vals, z, lo, hi) -> float:  # pragma: no cover (compiled)
    """1ᵀ Σ_t (zP)^t 1 over the rows and columns lo:hi of the CSR matrix P, t ≤ PATH_STEPS."""
    n = len(row_ptr) - 1
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
    return total[lo:hi].sum()


@numba.njit(cache=True)
def _series_pair(row_ptr, cols, vals, z, n_a) -> tuple[float, float]:  # pragma: no cover
    """``_series`` for the blocks 0:n_a and n_a:n at once: one pass over P a step serves both
    (each sum is added up in the same order as alone, so the results are the same bits)."""
    n = len(row_ptr) - 1
    va, vb = np.zeros(n), np.zeros(n)
    va[:n_a] = 1.0
    vb[n_a:] = 1.0
    total_a, total_b = va.copy(), vb.copy()
    step_a, step_b = np.empty(n), np.empty(n)
    for _ in range(PATH_STEPS):
        for r in range(n):
            sa = 0.0
            sb = 0.0
            for e in range(row_ptr[r], row_ptr[r + 1]):
                w = vals[e]
                c = cols[e]
                sa += w * va[c]
                sb += w * vb[c]
            step_a[r] = z * sa
            step_b[r] = z * sb
        va, step_a = step_a, va
        vb, step_b = step_b, vb
        total_a += va
        total_b += vb
    return total_a[:n_a].sum(), total_b[n_a:].sum()


@numba.njit(cache=True)
def _integrals_serial(
    a, b, indptr, indices, data, owner, head, after, place, size, z
) -> np.ndarray:  # pragma: no cover (compiled)
    """``_set_integrals`` of each set C_a[g] ∪ C_b[g] (columns 0 and 1), one after another."""
    out = np.zeros((len(a), 2))
    for g in range(len(a)):
        _set_integrals(
            a[g], b[g], indptr, indices, data, owner, head, after, place, size, z, out[g]
        )
    return out


@numba.njit(cache=True, parallel=True)
def _integrals_parallel(
    a, b, indptr, indices, data, owner, head, after, place, size, z
) -> np.ndarray:  # pragma: no cover (compiled)
    """``_integrals_serial``, the sets in parallel."""
    out = np.zeros((len(a), 2))
    for g in numba.prange(len(a)):
        _set_integrals(
            a[g], b[g], indptr, indices, data, owner, head, after, place, size, z, out[g]
        )
    return out


@numba.njit(cache=True)
def _gains(
    a, b, indptr, indices, data, owner, head, after, place, size, own, z
) -> np.ndarray:  # pragma: no cover (compiled)
    """The path integral's increase from merging each pair (a[g], b[g]) (see ``_Graph.gains``);
    the sets in parallel only when there is work enough to pay for waking the threads."""
    work = 0
    for g in range(len(a)):
        work += size[a[g]] + size[b[g]]
    state = (indptr, indices, data, owner, head, after, place, size, z)
    if work >= PARALLEL_WORK:
        within = _integrals_parallel(a, b, *state)
    else:
        within = _integrals_serial(a, b, *state)
    out = np.empty(len(a))
    for g in range(len(a)):
        i, j = a[g], b[g]
        out[g] = within[g, 0] / size[i] ** 2 + within[g, 1] / size[j] ** 2 - own[i] - own[j]
    return out


@numba.njit(cache=True)
def _merge_pair(i, j, graph, size, own, z) -> None:  # pragma: no cover (compiled)
    """C_i ← C_i ∪ C_j, and S(C_i) anew (``graph``: ``_Graph.arrays``)."""
    indptr, indices, data, _, _, owner, head, tail, after, place = graph
    _link(i, j, owner, head, tail, after, place, size)
    out = np.zeros(2)
    _set_integrals(i, -1, indptr, indices, data, owner, head, after, place, size, z, out)
    own[i] = out[0] / size[i] ** 2


def _merge(
    p: sp.csr_matrix, labels: np.ndarray, n_clusters: int, z: float, min_size: int
) -> np.ndarray:
    graph = _Graph(p, labels, z)
    # every pair an edge joins, i < j (for any other pair the increase is exactly 0)
    pairs = [(i, j) for i in graph.clusters.tolist() for j in graph.neighbours(i, above=i)]
    a, b = np.array(pairs, dtype=np.int64).reshape(-1, 2).T
    alive = np.zeros(len(labels), dtype=np.bool_)
    alive[graph.clusters] = True
    gains, arrays = graph.gains(a, b), graph.arrays()
    _merge_loop(a, b, gains, n_clusters, min_size, alive, arrays, graph.size, graph.own, z)
    return graph.labels()


@numba.njit(cache=True)
def _merge_loop(
    a, b, gains, n_clusters, min_size, alive, graph, size, own, z
) -> None:  # pragma: no cover (compiled)
    """Greedy merges, the biggest gain first, until ``n_clusters`` are ``alive``. A heap entry
    (−gain, i, j, version of i, version of j) is stale once either cluster has merged since.
    While only ``n_clusters`` clusters have ``min_size`` points, entries joining two of them
    are held back (``deferred``) until a small cluster grows big."""
    heap = [(-gains[g], a[g], b[g], 0, 0) for g in range(len(a))]
    heapq.heapify(heap)
    deferred = [(0.0, 0, 0, 0, 0) for _ in range(0)]
    version = np.zeros(len(alive), dtype=np.int64)
    left = alive.sum()
    big = 0
    for c in np.flatnonzero(alive):
        big += size[c] >= min_size
    indptr, indices, data, t_indptr, t_indices, owner, head, _, after, place = graph
    state = (indptr, indices, data, owner, head, after, place, size)
    while left > n_clusters:
        if len(heap) == 0:  # parts of the graph that no edge joins: merge the two smallest
            i, j = _two_smallest(alive, size)
        else:
            entry = heapq.heappop(heap)
            _, i, j, vi, vj = entry
            if not (alive[i] and alive[j]) or version[i] != vi or version[j] != vj:
                continue  # stale: one of them has merged since
            if big <= n_clusters and size[i] >= min_size and size[j] >= min_size:
                deferred.append(entry)
                continue
        big -= (size[i] >= min_size) + (size[j] >= min_size)
        _merge_pair(i, j, graph, size, own, z)
        alive[j] = False
        left -= 1
        big += size[i] >= min_size
        if big > n_clusters and len(deferred) > 0:  # a small cluster grew big: release them
            for held in deferred:
                heapq.heappush(heap, held)
            deferred.clear()
        version[i] += 1
        others = _neighbours(i, -1, indptr, indices, t_indptr, t_indices, owner, head, after)
        mine = np.full(len(others), i)
        found = _gains(mine, others, *state, own, z)
        for g in range(len(others)):
            lo, hi = min(i, others[g]), max(i, others[g])
            heapq.heappush(heap, (-found[g], lo, hi, version[lo], version[hi]))


@numba.njit(cache=True)
def _two_smallest(alive, size):  # pragma: no cover (compiled)
    """The two alive clusters with the fewest points (ties: the lower id first)."""
    best = (-1, -1)
    for c in np.flatnonzero(alive):
        if best[0] < 0 or (size[c], c) < (size[best[0]], best[0]):
            best = (c, best[0])
        elif best[1] < 0 or (size[c], c) < (size[best[1]], best[1]):
            best = (best[0], c)
    return best
