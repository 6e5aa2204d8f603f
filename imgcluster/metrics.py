"""Clustering scores: against ground truth (ACC, NMI, ARI) and without it.

ACC is the accuracy under the best one-to-one matching of clusters to classes
(Hungarian algorithm, as every paper this tool reproduces computes it); NMI uses
the arithmetic-mean normalisation; ARI is the adjusted Rand index.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn import metrics as skm


def contingency(
    y_true: Sequence[int], y_pred: Sequence[int], shape: tuple[int, int] | None = None
) -> np.ndarray:
    """Counts ``C[i, j]`` of images in cluster ``i`` and class ``j`` (ids are 0..n-1).

    ``shape`` (clusters, classes) keeps rows and columns for ids no image has.
    """
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.shape} vs {p.shape}")
    if t.size and (t.min() < 0 or p.min() < 0):
        raise ValueError("cluster and class ids must be >= 0")
    rows, cols = p.max(initial=-1) + 1, t.max(initial=-1) + 1
    if shape is not None:
        rows, cols = max(rows, shape[0]), max(cols, shape[1])
    table = np.zeros((rows, cols), dtype=np.int64)
    np.add.at(table, (p, t), 1)
    return table


def best_mapping(y_true: Sequence[int], y_pred: Sequence[int]) -> dict[int, int]:
    """The one-to-one cluster -> class map that maximises the matched count."""
    table = contingency(y_true, y_pred)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return {int(r): int(c) for r, c in zip(rows, cols, strict=True)}


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """ACC = max over one-to-one maps m of (1/N) Σ_i 1[y_i = m(c_i)]."""
    table = contingency(y_true, y_pred)
    if table.sum() == 0:
        return 0.0
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / table.sum())


def nmi(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """NMI(Y, C) = I(Y; C) / mean(H(Y), H(C))."""
    return float(skm.normalized_mutual_info_score(y_true, y_pred, average_method="arithmetic"))


def ari(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Adjusted Rand index: pair-counting agreement corrected for chance."""
    return float(skm.adjusted_rand_score(y_true, y_pred))


def size_balance(y_pred: Sequence[int], k: int | None = None) -> float:
    """Entropy of the cluster sizes over log K: 1 for equal sizes, 0 for one cluster."""
    counts = np.bincount(np.asarray(y_pred, dtype=np.int64), minlength=k or 0)
    if len(counts) < 2:
        return 1.0
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum() / np.log(len(counts)))


def silhouette(
    embeddings: np.ndarray, y_pred: Sequence[int], sample: int = 5000, seed: int = 0
) -> float | None:
    """Mean silhouette of the embeddings on a seeded sample of at most ``sample`` images.

    In [-1, 1], higher is better; None when it is undefined (one cluster, or as
    many clusters as images).
    """
    y = np.asarray(y_pred)
    rows = np.random.default_rng(seed).permutation(len(y))[:sample]
    n_labels = len(np.unique(y[rows]))
    if n_labels < 2 or n_labels >= len(rows):
        return None
    return float(skm.silhouette_score(np.asarray(embeddings)[rows], y[rows]))
