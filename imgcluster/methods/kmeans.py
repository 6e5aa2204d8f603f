"""The baseline: FAISS k-means on pixels scaled to [0, 1], after PCA when they are many.

Not a paper method; it is the fast reference every deep method must beat (on
MNIST pixels k-means gives ACC ~0.53).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np
import torch
from torch import nn

from ..errors import UsageError
from ..model import ClusterModel, Preprocessing, embed_images, register_embedder
from ..search import faiss_gpus
from . import register
from .base import FeatureFit, FitContext, Method

_PCA_FLOATS = 50_000_000  # PCA is fitted on at most this many pixel values (200 MB)


@register_embedder
class PixelPCA(nn.Module):
    """uint8 images -> pixels / 255, flattened, centred and projected on principal axes.

    With ``out_dim == 0`` the flattened pixels are returned as they are.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        if in_dim < 1 or not 0 <= out_dim <= in_dim:
            raise ValueError(
                f"need 1 <= in_dim and 0 <= out_dim <= in_dim, got {in_dim}, {out_dim}"
            )
        self.in_dim, self.out_dim = in_dim, out_dim
        self.register_buffer("mean", torch.zeros(in_dim if out_dim else 0))
        self.register_buffer("components", torch.zeros(out_dim, in_dim if out_dim else 0))

    def spec(self) -> dict[str, int]:
        return {"in_dim": self.in_dim, "out_dim": self.out_dim}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1).float().div_(255.0)
        if self.out_dim == 0:
            return z
        return (z - self.mean) @ self.components.T


@dataclass
class KMeansConfig:
    """Hyper-parameters of the pixel k-means baseline."""

    epochs: int = 25  # Lloyd iterations; each is one pass over the data
    restarts: int = 3  # independent runs, the lowest k-means objective is kept (no labels)
    pca_dim: int = 128  # principal components kept when there are more pixel values; 0: no PCA
    init: Literal["kmeans++", "random"] = "kmeans++"
    batch_size: int = 4096  # images per embedding batch
    max_points: int = 1_000_000  # k-means is fitted on a random subset of at most this many
    normalize: bool = True  # with --backbone: L2-normalise the features (cosine geometry)

    def validate(self) -> None:
        for name in ("epochs", "restarts", "batch_size", "max_points"):
            if getattr(self, name) < 1:
                raise UsageError(f"parameter {name} must be >= 1, got {getattr(self, name)}")
        if self.pca_dim < 0:
            raise UsageError(f"parameter pca_dim must be >= 0, got {self.pca_dim}")


@register
class KMeans(Method):
    name = "kmeans"
    summary = "FAISS k-means on pixels (PCA first when large) or on a backbone's features"
    Config = KMeansConfig
    features = True
    trains = False

    def fit(self, images: np.ndarray, ctx: FitContext) -> ClusterModel:
        cfg: KMeansConfig = self.config
        n, c, h, _ = images.shape
        self.check_count(n)
        embedder = self._fit_pca(images, ctx)
        with ctx.reporter.task("embedding", total=n) as bar:
            z = embed_images(embedder, images, cfg.batch_size, ctx.device, bar.advance)
        centroids = self._kmeans(z.cpu().numpy(), ctx)
        prep = Preprocessing(image_size=h, channels=c)
        return ClusterModel(embedder, centroids, "l2", prep, self.name, vars(cfg))

    def fit_features(self, features: np.ndarray, ctx: FitContext) -> FeatureFit:
        """k-means on the (L2-normalised) features; PCA is not needed at backbone sizes."""
        z = torch.from_numpy(features)
        if self.config.normalize:
            z = torch.nn.functional.normalize(z, dim=1)
        centroids = self._kmeans(z.numpy(), ctx)
        return FeatureFit(torch.from_numpy(centroids), "l2", normalize=self.config.normalize)

    def _fit_pca(self, images: np.ndarray, ctx: FitContext) -> PixelPCA:
        return fit_pixel_pca(images, self.config.pca_dim, ctx.seed)

    def _kmeans(self, z: np.ndarray, ctx: FitContext) -> np.ndarray:
        cfg: KMeansConfig = self.config
        start = time.perf_counter()
        with ctx.reporter.task("k-means", total=1) as bar:
            result = faiss_kmeans(
                z,
                self.k,
                seed=ctx.seed,
                epochs=cfg.epochs,
                restarts=cfg.restarts,
                plusplus=cfg.init == "kmeans++",
                max_points=cfg.max_points,
                gpu=ctx.device.type == "cuda",
            )
            bar.advance()
        for i, stats in enumerate(result.stats):  # those of the kept (lowest-objective) run
            ctx.log(
                {"epoch": i + 1, "objective": stats["obj"], "imbalance": stats["imbalance_factor"]}
            )
        ctx.log({"phase": "kmeans", "seconds": round(time.perf_counter() - start, 3)})
        return result.centroids


def fit_pixel_pca(images: np.ndarray, dim: int, seed: int = 0) -> PixelPCA:
    """PixelPCA fitted on a seeded sample of ``images``: ``dim`` principal axes of the pixels
    scaled to [0, 1]. No projection when ``dim`` is 0, not smaller than the pixel count, or
    not smaller than the number of images: n images span at most n − 1 axes, and their
    distances (all k-means sees) are the same in that span as in the pixels."""
    d = int(np.prod(images.shape[1:]))
    out = dim if 0 < dim < min(d, len(images)) else 0
    embedder = PixelPCA(d, out)
    if out == 0:
        return embedder
    rng = np.random.default_rng(seed)
    n_fit = min(len(images), max(4 * out, _PCA_FLOATS // d))
    rows = np.sort(rng.choice(len(images), n_fit, replace=False))
    x = torch.from_numpy(np.asarray(images[rows])).flatten(1).float().div_(255.0)
    mean = x.mean(0)
    x -= mean
    if d <= 4096:  # exact: eigenvectors of the d×d covariance
        _, vecs = torch.linalg.eigh(x.T @ x)
        components = vecs[:, -out:].flip(1).T
    else:  # randomised SVD, seeded
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        # oversampled by 10 axes, as many as the sample and the pixels allow
        _, _, v = torch.svd_lowrank(x, q=min(out + 10, n_fit, d), niter=4)
        torch.random.set_rng_state(gen_state)
        components = v[:, :out].T
    embedder.mean.copy_(mean)
    embedder.components.copy_(components.contiguous())
    return embedder


@dataclass
class KMeansResult:
    centroids: np.ndarray  # K×D float32
    labels: np.ndarray  # N int64: the nearest centroid of each point
    objective: float  # sum of squared distances to the nearest centroid
    stats: list[dict[str, float]]


def faiss_kmeans(
    z: np.ndarray,
    k: int,
    *,
    seed: int = 0,
    epochs: int = 25,
    restarts: int = 1,
    plusplus: bool = True,
    max_points: int = 1_000_000,
    gpu: bool = False,
) -> KMeansResult:
    """FAISS k-means on the rows of ``z``; of ``restarts`` runs the lowest objective is kept
    (no labels involved). k-means++ seeding when this FAISS has it; on the GPU when FAISS can."""
    z = np.ascontiguousarray(z, dtype=np.float32)
    params = {
        "niter": epochs,
        "nredo": restarts,
        "seed": seed,
        "max_points_per_centroid": max(1, max_points // k),
        "min_points_per_centroid": 1,
        "verbose": False,
    }
    init = getattr(faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS", None)
    if plusplus and init is not None:  # older FAISS: random init only
        params["init_method"] = init
    if gpu and faiss_gpus() > 0:
        params["gpu"] = True
    km = faiss.Kmeans(z.shape[1], k, **params)
    km.train(z)
    distances, labels = km.index.search(z, 1)
    return KMeansResult(
        km.centroids.astype(np.float32),
        labels[:, 0].astype(np.int64),
        float(distances.sum()),
        list(km.iteration_stats),
    )
