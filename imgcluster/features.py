"""Pretrained-feature mode: decoded images -> a frozen backbone's pooled features, cached.

Features are computed once per (images, backbone, weights) and kept as a .npy next to the
decode cache, so a second ``train`` on the same folder (another method, K or seed) skips the
network. ``BackboneEmbedder`` is the same computation as a model part, so ``assign`` embeds new
images exactly as training did.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import backbones
from .atomic import atomic_path
from .cache import Decoded
from .methods.base import FeatureFit
from .model import register_embedder
from .report import Reporter

FEATURES_VERSION = 2  # bump when the computation changes: old cache files are ignored


@register_embedder
class BackboneEmbedder(nn.Module):
    """uint8 images -> grey to RGB, resize to the backbone's input, its normalisation -> pooled
    features (averaged with the mirror image's when ``mirror``, and over six crops of the last
    block's input maps when ``crops``: ``map_crops``) -> signed square root when
    ``signed_sqrt`` -> minus a stored mean when ``centred`` -> L2-normalised when
    ``normalize`` -> with a trailing 1 when ``append_one`` (a linear head's bias becomes a
    centroid coordinate, so argmax(Wf + b) is one inner-product search). ``folded``: the
    backbone's batch norms are folded into its convolutions (``backbones.fold_batch_norms``;
    the saved weights are then the folded ones)."""

    def __init__(
        self,
        backbone: str,
        normalize: bool = True,
        append_one: bool = False,
        folded: bool = False,
        mirror: bool = False,
        signed_sqrt: bool = False,
        centred: bool = False,
        crops: bool = False,
    ) -> None:
        super().__init__()
        self.backbone, self.normalize, self.append_one = backbone, normalize, append_one
        self.mirror, self.signed_sqrt = mirror, signed_sqrt
        self.net, spec = backbones.build(backbone)
        if crops and backbones.split(self.net) is None:
            raise ValueError(f"backbone {backbone}: its last block is not known, so no crops")
        self.crops = crops
        self.folded = folded and backbones.fold_batch_norms(self.net)
        self.input_size = spec.input_size
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        # a buffer once set (saved with the weights); zeros here are filled by load_state_dict
        self.register_buffer("centre", torch.zeros(spec.dim) if centred else None)

    @property
    def centred(self) -> bool:
        return self.centre is not None

    def spec(self) -> dict[str, object]:
        return {
            "backbone": self.backbone,
            "normalize": self.normalize,
            "append_one": self.append_one,
            "folded": self.folded,
            "mirror": self.mirror,
            "signed_sqrt": self.signed_sqrt,
            "centred": self.centred,
            "crops": self.crops,
        }

    def set_transform(self, fit: FeatureFit) -> None:
        """Apply a fitted method's feature transform from now on (``finish``)."""
        self.normalize, self.append_one = fit.normalize, fit.append_one
        self.signed_sqrt = fit.signed_sqrt
        if fit.centre is not None:
            centre = fit.centre.to(self.mean.device, torch.float32)
            self.register_buffer("centre", centre)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # chunks keep the activations of a 1,024-image batch at 224 px within memory
        chunk = 256 if images.device.type == "cuda" else 32
        return torch.cat([self.finish(self.pooled(part)) for part in images.split(chunk)])

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's raw pooled features (no normalisation), averaged over the image and
        its mirror image when ``mirror``, and over ``map_crops`` when ``crops``."""
        views = (images, images.flip(-1)) if self.mirror else (images,)
        return torch.stack([self._view(v) for v in views]).mean(0)

    def _view(self, images: torch.Tensor) -> torch.Tensor:
        if not self.crops:
            return self.through(self.net, images)
        parts = backbones.split(self.net)
        assert parts is not None  # checked in __init__
        trunk, tail = parts
        maps = self.through(trunk, images)
        windows = map_crops(maps.shape[-1])
        crops = [maps[..., t : t + s, left : left + s] for t, left, s in windows]
        return torch.stack([_run(tail, crop) for crop in crops]).mean(0)

    def through(
        self, part: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor
    ) -> torch.Tensor:
        """``part`` of the network on uint8 ``images`` (the backbone's input transform first),
        in float32."""
        return _run(part, self.network_input(images))

    def network_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N×C×H×W -> the backbone's input: RGB, its size, its normalisation."""
        x = images.float().div_(255.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        # the whole (square) image, bilinear: on 32 px CIFAR-10 images (a development split
        # of the train set) the ImageNet evaluation transform -- centre crop 0.875, bicubic --
        # made EfficientNet-Lite0's neighbours worse (20-NN purity 0.60 -> 0.54; bicubic
        # without the crop 0.56): the images fill their frame and are upsampled 7×
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(
                x,
                size=self.input_size,
                mode="bilinear",
                align_corners=False,
                antialias=x.shape[-1] > self.input_size,  # only shrinking needs it
            )
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def finish(self, f: torch.Tensor) -> torch.Tensor:
        """Pooled features -> what the centroids are compared with."""
        if self.signed_sqrt:
            f = f.sign() * f.abs().sqrt()
        if self.centre is not None:
            f = f - self.centre
        if self.normalize:
            f = F.normalize(f, dim=1)
        if self.append_one:
            f = torch.cat([f, torch.ones_like(f[:, :1])], dim=1)
        return f


def _run(part: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``part`` on ``x`` in float32 out, bfloat16 inside on a GPU."""
    if x.device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return part(x).float()
    return part(x).float()


def map_crops(side: int) -> list[tuple[int, int, int]]:
    """(top, left, size) of the windows of a ``side``×``side`` map whose pooled features are
    averaged with ``crops``: the whole map, its four (side−1)-corners and its (side−2)-centre.
    Each window goes through the last block and the pool; on a development split of CIFAR-10
    train images, with the mirror, EfficientNet-Lite0's 20-NN purity rose 0.629 -> 0.643 and
    SCAN's ACC 0.594 -> 0.634 (docs/methods.md), for about 25% more extraction time."""
    corners = [(t, left, side - 1) for t in (0, 1) for left in (0, 1)] if side > 1 else []
    centre = [(1, 1, side - 2)] if side > 2 else []
    return [(0, 0, side), *corners, *centre]


def load_embedder(backbone: str, weights: Path | None, device: torch.device) -> BackboneEmbedder:
    """A ``BackboneEmbedder`` holding the backbone's pretrained weights, on ``device``, with its
    batch norms folded where the backbone allows (the network stays frozen)."""
    embedder = BackboneEmbedder(backbone)
    net, _ = backbones.load(backbone, weights)
    embedder.net.load_state_dict(net.state_dict())
    embedder.folded = backbones.fold_batch_norms(embedder.net)
    return embedder.to(device, memory_format=torch.channels_last).eval()


@torch.no_grad()
def extract(
    embedder: BackboneEmbedder,
    images: np.ndarray,
    device: torch.device,
    batch_size: int = 0,
    reporter: Reporter | None = None,
) -> np.ndarray:
    """The raw pooled features of uint8 N×C×H×W ``images``: float32 N×D."""
    reporter = reporter or Reporter(quiet=True)
    batch = batch_size or (256 if device.type == "cuda" else 32)
    out: list[np.ndarray] = []
    with reporter.task(f"features ({embedder.backbone})", total=len(images)) as bar:
        for start in range(0, len(images), batch):
            part = torch.from_numpy(np.array(images[start : start + batch])).to(device)
            out.append(embedder.pooled(part).cpu().numpy())
            bar.advance(len(part))
    return np.concatenate(out).astype(np.float32, copy=False)


@torch.no_grad()
def extract_maps(
    embedder: BackboneEmbedder,
    trunk: Callable[[torch.Tensor], torch.Tensor],
    images: np.ndarray,
    device: torch.device,
    reporter: Reporter | None = None,
) -> np.ndarray:
    """The ``trunk``'s output maps of uint8 N×C×H×W ``images`` and of their mirror images:
    float16 N×2×C'×h×w (view 0 the image, view 1 its mirror; the mirror is the one
    augmentation that needs the whole network, so it is computed here once)."""
    reporter = reporter or Reporter(quiet=True)
    batch = 256 if device.type == "cuda" else 32
    out: np.ndarray | None = None
    with reporter.task(f"feature maps ({embedder.backbone})", total=len(images)) as bar:
        for start in range(0, len(images), batch):
            part = torch.from_numpy(np.array(images[start : start + batch])).to(device)
            views = [embedder.through(trunk, v) for v in (part, part.flip(-1))]
            maps = torch.stack(views, 1).half().cpu().numpy()
            if out is None:
                out = np.empty((len(images), *maps.shape[1:]), dtype=np.float16)
            out[start : start + len(part)] = maps
            bar.advance(len(part))
    assert out is not None
    return out


def cached_features(
    embedder: BackboneEmbedder,
    weights_id: str,
    decoded: Decoded,
    device: torch.device,
    cache_dir: Path | None,
    reporter: Reporter | None = None,
) -> np.ndarray:
    """``extract`` through a cache file keyed by the backbone, its weights, the working size
    and the images' root, names, sizes and times; ``cache_dir`` None: no cache."""
    suffix = ("-mirror" if embedder.mirror else "") + ("-crops" if embedder.crops else "")
    key = _key(embedder.backbone, weights_id, decoded, suffix)
    return _cached(
        lambda: extract(embedder, decoded.images, device, reporter=reporter),
        np.float32,
        cache_dir,
        key,
        len(decoded.files),
    )


def cached_maps(
    embedder: BackboneEmbedder,
    trunk: Callable[[torch.Tensor], torch.Tensor],
    weights_id: str,
    decoded: Decoded,
    device: torch.device,
    cache_dir: Path | None,
    reporter: Reporter | None = None,
) -> np.ndarray:
    """``extract_maps`` through a cache file (as ``cached_features``)."""
    key = _key(embedder.backbone, weights_id, decoded, "-maps")
    return _cached(
        lambda: extract_maps(embedder, trunk, decoded.images, device, reporter),
        np.float16,
        cache_dir,
        key,
        len(decoded.files),
    )


def _cached(
    compute: Callable[[], np.ndarray],
    dtype: type,
    cache_dir: Path | None,
    name: str,
    n: int,
) -> np.ndarray:
    if cache_dir is None:
        return compute()
    path = Path(cache_dir, "features", name)
    if path.is_file():
        try:
            cached = np.load(path)
            if cached.shape[0] == n and cached.dtype == dtype:
                return cached
        except (OSError, ValueError):
            pass  # a damaged file is recomputed and replaced
    values = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, values)
    return values


def weights_id(weights: Path | None) -> str:
    """What identifies the pretrained weights: the file's digest, or "default"."""
    if weights is None:
        return "default"
    digest = hashlib.sha256()
    with open(weights, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _key(backbone: str, weights: str, decoded: Decoded, suffix: str = "") -> str:
    digest = hashlib.sha256()
    head = {
        "v": FEATURES_VERSION,
        "backbone": backbone,
        "weights": weights,
        "size": decoded.image_size,
        "channels": decoded.channels,
        "root": str(Path(decoded.root).absolute()),
    }
    digest.update(json.dumps(head, sort_keys=True).encode())
    for f in decoded.files:
        digest.update(f"{f.rel}\0{f.size}\0{f.mtime_ns}\n".encode())
    name = backbone.replace(":", "-").replace("/", "-")
    return f"{name}-{digest.hexdigest()[:24]}{suffix}.npy"
