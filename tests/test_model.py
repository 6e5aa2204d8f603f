from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from imgcluster.cache import load_images
from imgcluster.errors import UsageError
from imgcluster.files import find_images
from imgcluster.methods import FitContext, get_method
from imgcluster.model import ClusterModel


@pytest.fixture
def fitted(toy: Path) -> tuple[ClusterModel, np.ndarray]:
    images = load_images(find_images([toy])).images
    cls = get_method("kmeans")
    model = cls(3, cls.make_config({"pca_dim": "16"})).fit(images, FitContext())
    return model, np.asarray(images)


def test_save_and_load_give_the_same_predictions(fitted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, images = fitted
    folder = tmp_path / "model"
    folder.mkdir()
    model.save(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.safetensors"]
    loaded = ClusterModel.load(folder)
    assert loaded.k == 3 and loaded.metric == "l2"
    assert loaded.preprocessing == model.preprocessing
    assert np.array_equal(loaded.predict(images), model.predict(images))


def test_predict_is_embed_plus_nearest_centroid(fitted) -> None:  # type: ignore[no-untyped-def]
    model, images = fitted
    z = model.embed(images).numpy()
    brute = ((z[:, None] - model.centroids.numpy()[None]) ** 2).sum(-1).argmin(1)
    assert np.array_equal(model.predict(images), brute)


def test_loading_rejects_tampered_files(fitted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, _ = fitted
    model.save(tmp_path)
    desc = json.loads((tmp_path / "model.json").read_text())
    bad = dict(desc, embedder={"class": "os.system", "args": {}})
    (tmp_path / "model.json").write_text(json.dumps(bad))
    with pytest.raises(UsageError, match="unknown embedder"):
        ClusterModel.load(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps(desc))
    (tmp_path / "model.safetensors").write_bytes(b"\x80\x04K\x01.")  # a pickle, not safetensors
    with pytest.raises(UsageError, match="not a valid safetensors"):
        ClusterModel.load(tmp_path)


def test_loading_checks_tensor_shapes(fitted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import save_file

    model, _ = fitted
    model.save(tmp_path)
    tensors = {f"embedder.{k}": v for k, v in model.embedder.state_dict().items()}
    tensors["embedder.components"] = torch.zeros(5, 5)
    tensors["centroids"] = model.centroids
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(UsageError, match="components"):
        ClusterModel.load(tmp_path)


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="nothing: no such run folder"):
        ClusterModel.load(tmp_path / "nothing")
    with pytest.raises(UsageError, match=r"not a finished run folder \(no model\.json\)$"):
        ClusterModel.load(tmp_path)


def test_method_config_validation() -> None:
    cls = get_method("kmeans")
    with pytest.raises(UsageError, match="no parameter 'nope'"):
        cls.make_config({"nope": 1})
    with pytest.raises(UsageError, match="must be a int"):
        cls.make_config({"epochs": "many"})
    with pytest.raises(UsageError, match="one of"):
        cls.make_config({"init": "magic"})
    with pytest.raises(UsageError, match=">= 1"):
        cls(3, cls.make_config({"epochs": 0}))
    with pytest.raises(UsageError, match="k must be"):
        cls(0)
    with pytest.raises(UsageError, match="unknown method"):
        get_method("nope")


@pytest.mark.parametrize("n", [20, 132])
def test_kmeans_trains_on_fewer_images_than_pca_axes(n: int) -> None:
    """20 images cannot give 128 principal axes (no projection then: the pixels keep their
    distances); 132 give them, with fewer than the 10 extra axes the randomised SVD asks for."""
    from imgcluster.methods.kmeans import fit_pixel_pca

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 3, 40, 40), dtype=np.uint8)  # 4,800 pixels: the SVD path
    pca = fit_pixel_pca(images, 128)
    if n <= 128:
        assert pca.out_dim == 0
    else:
        c = pca.components
        assert c.shape == (128, 4800)
        assert torch.allclose(c @ c.T, torch.eye(128), atol=1e-4)
    cls = get_method("kmeans")
    labels = cls(3, cls.make_config({})).fit(images, FitContext()).predict(images)
    assert set(labels) <= {0, 1, 2} and len(labels) == n
