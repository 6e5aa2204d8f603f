from __future__ import annotations

import numpy as np
import pytest
import torch

from imgcluster import search


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_all_available_backends_agree(metric: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 32)).astype(np.float32)
    c = rng.normal(size=(50, 32)).astype(np.float32)
    results = {b: search.nearest(x, c, metric, backend=b) for b in search.available_backends()}
    assert len(results) >= 2
    ref = results["faiss-cpu"]
    brute = (
        ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1) if metric == "l2" else (x @ c.T).argmax(1)
    )
    assert np.array_equal(ref.cluster, brute)
    for name, r in results.items():
        assert np.array_equal(r.cluster, ref.cluster), name
        np.testing.assert_allclose(r.distance, ref.distance, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(r.confidence, ref.confidence, rtol=1e-3, atol=1e-4)


def test_l2_confidence_and_distance_meaning() -> None:
    c = np.array([[0.0, 0.0], [10.0, 0.0]], dtype=np.float32)
    x = np.array([[1.0, 0.0], [5.0, 0.0]], dtype=np.float32)
    a = search.nearest(x, c, "l2")
    assert a.cluster[0] == 0
    assert a.distance[0] == pytest.approx(1.0)
    assert a.confidence[0] == pytest.approx(1 - 1 / 9)
    assert a.confidence[1] == pytest.approx(0.0)  # exactly between the two


def test_ip_confidence_is_two_way_softmax() -> None:
    c = np.eye(2, dtype=np.float32)
    a = search.nearest(np.array([[2.0, 0.0]], dtype=np.float32), c, "ip")
    assert a.cluster[0] == 0 and a.distance[0] == pytest.approx(-2.0)
    assert a.confidence[0] == pytest.approx(1 / (1 + np.exp(-2.0)))


def test_single_centroid_is_fully_confident() -> None:
    a = search.nearest(np.ones((4, 3), dtype=np.float32), np.zeros((1, 3), dtype=np.float32))
    assert (a.cluster == 0).all() and (a.confidence == 1).all()


def test_accepts_torch_tensors_and_rejects_bad_arguments() -> None:
    x = torch.randn(10, 4)
    c = torch.randn(3, 4)
    assert len(search.nearest(x, c)) == 10
    with pytest.raises(ValueError):
        search.nearest(x, c, metric="cosine")
    with pytest.raises(ValueError):
        search.nearest(x, c, backend="annoy")
