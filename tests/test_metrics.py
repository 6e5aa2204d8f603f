from __future__ import annotations

import itertools

import numpy as np
import pytest

from imgcluster import metrics


def test_permuted_labelling_scores_perfectly() -> None:
    y = np.repeat(np.arange(5), 7)
    perm = np.array([3, 0, 4, 1, 2])
    assert metrics.accuracy(y, perm[y]) == 1.0
    assert metrics.nmi(y, perm[y]) == pytest.approx(1.0)
    assert metrics.ari(y, perm[y]) == pytest.approx(1.0)


def _brute_force_acc(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    k = max(y_true.max(), y_pred.max()) + 1
    best = 0
    for perm in itertools.permutations(range(k)):
        best = max(best, int((np.array(perm)[y_pred] == y_true).sum()))
    return best / len(y_true)


@pytest.mark.parametrize("seed", range(20))
def test_accuracy_agrees_with_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k_true, k_pred = rng.integers(2, 6, size=2)
    y_true = rng.integers(0, k_true, 30)
    y_pred = rng.integers(0, k_pred, 30)
    assert metrics.accuracy(y_true, y_pred) == pytest.approx(_brute_force_acc(y_true, y_pred))


def test_known_small_case() -> None:
    y_true = [0, 0, 0, 1, 1, 1]
    y_pred = [1, 1, 0, 0, 0, 0]  # best map: 1->0 (2 right), 0->1 (3 right)
    assert metrics.accuracy(y_true, y_pred) == pytest.approx(5 / 6)
    assert metrics.best_mapping(y_true, y_pred) == {0: 1, 1: 0}


def test_contingency_and_shape() -> None:
    table = metrics.contingency([0, 1, 1], [2, 0, 0], shape=(4, 3))
    assert table.shape == (4, 3)
    assert table[2, 0] == 1 and table[0, 1] == 2 and table.sum() == 3


def test_size_balance_and_silhouette() -> None:
    assert metrics.size_balance([0, 1, 2, 0, 1, 2]) == pytest.approx(1.0)
    assert metrics.size_balance([0, 0, 0, 0, 0, 1]) < 0.7
    z = np.concatenate([np.zeros((10, 2)), np.ones((10, 2)) * 10]) + np.random.default_rng(
        0
    ).normal(0, 0.1, (20, 2))
    good = np.repeat([0, 1], 10)
    assert metrics.silhouette(z, good) > 0.9
    assert metrics.silhouette(z, np.zeros(20, dtype=int)) is None
