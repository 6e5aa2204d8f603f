"""A trained clustering model: an embedding network, a centroid matrix and a metric.

Every method's read-out has this form (a softmax head argmax(Wz + b) is an
inner-product search of [z, 1] against [W, b]), so assigning an image is always
"embed, then one nearest-centroid search", and ``assign`` agrees exactly with the
method's own prediction.

On disk a model is ``model.safetensors`` (tensors only) + ``model.json`` (what
to build). Loading builds the embedder from a fixed registry of classes, never
from code found in the file, and checks every tensor's name, shape and dtype.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_path, atomic_write_text
from .errors import UsageError
from .report import show_path
from .runs import unfinished
from .search import METRICS, Assignment, nearest

MODEL_FORMAT = "imgcluster-model"
MODEL_FORMAT_VERSION = 1
_EMBEDDERS: dict[str, type[nn.Module]] = {}


def register_embedder(cls: type[nn.Module]) -> type[nn.Module]:
    """Make an embedder class loadable by name. It must define ``spec() -> dict``,
    the keyword arguments that rebuild it."""
    _EMBEDDERS[cls.__name__] = cls
    return cls


@dataclass(frozen=True)
class Preprocessing:
    """How files become the uint8 arrays the embedder takes (see ``decode.decode``)."""

    image_size: int
    channels: int
    resize: str = "shorter side to image_size, centre square"
    background: str = "transparency on white"


class ClusterModel:
    """Embedder (uint8 N×C×H×W -> float N×D) + K×D centroids + metric ("l2" or "ip")."""

    def __init__(
        self,
        embedder: nn.Module,
        centroids: torch.Tensor | np.ndarray,
        metric: str,
        preprocessing: Preprocessing,
        method: str,
        config: dict[str, Any] | None = None,
    ) -> None:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        self.embedder = embedder.eval()
        self.centroids = torch.as_tensor(centroids, dtype=torch.float32).detach().cpu()
        self.metric = metric
        self.preprocessing = preprocessing
        self.method = method
        self.config = dict(config or {})

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    def embed(
        self,
        images: np.ndarray | torch.Tensor,
        batch_size: int = 1024,
        device: str | torch.device = "cpu",
        on_batch: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Embeddings of uint8 images (N×C×H×W), float32 on ``device``."""
        return embed_images(self.embedder, images, batch_size, device, on_batch)

    def assign(
        self,
        images: np.ndarray | torch.Tensor,
        batch_size: int = 1024,
        device: str | torch.device = "cpu",
        backend: str = "auto",
        on_batch: Callable[[int], None] | None = None,
    ) -> Assignment:
        """Cluster, confidence and distance of each image: embed, then one search."""
        z = self.embed(images, batch_size, device, on_batch)
        return nearest(z, self.centroids, self.metric, backend=backend, device=device)

    def predict(
        self, images: np.ndarray | torch.Tensor, device: str | torch.device = "cpu"
    ) -> np.ndarray:
        return self.assign(images, device=device).cluster

    # -- files --------------------------------------------------------------------------

    def description(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "method": self.method,
            "k": self.k,
            "metric": self.metric,
            "preprocessing": asdict(self.preprocessing),
            "embedder": {"class": type(self.embedder).__name__, "args": self.embedder.spec()},
            "config": self.config,
            "versions": versions(),
            **(extra or {}),
        }

    def save(self, folder: Path, extra: dict[str, Any] | None = None) -> None:
        """Write ``model.safetensors`` then ``model.json``, each atomically."""
        tensors = {
            f"embedder.{k}": v.detach().cpu().contiguous()
            for k, v in self.embedder.state_dict().items()
        }
        tensors["centroids"] = self.centroids.contiguous()
        with atomic_path(Path(folder, "model.safetensors")) as tmp:
            save_file(tensors, str(tmp), metadata={"format": MODEL_FORMAT})
        atomic_write_text(Path(folder, "model.json"), json.dumps(self.description(extra), indent=2))

    @classmethod
    def load(cls, folder: Path) -> ClusterModel:
        """Load a model written by ``save``; a clear UsageError for anything else."""
        folder = Path(folder)
        desc = _read_description(folder / "model.json")
        tensors = _read_tensors(folder / "model.safetensors")
        embedder = _build_embedder(desc, folder)
        state = {k[len("embedder.") :]: v for k, v in tensors.items() if k.startswith("embedder.")}
        _check_state(embedder, state, folder)
        embedder.load_state_dict(state, strict=True)
        centroids = tensors.get("centroids")
        if centroids is None or centroids.ndim != 2 or centroids.shape[0] != desc["k"]:
            raise UsageError(f"{show_path(folder)}: model.safetensors has no valid K×D 'centroids'")
        prep = desc["preprocessing"]
        return cls(
            embedder,
            centroids.float(),
            desc["metric"],
            Preprocessing(int(prep["image_size"]), int(prep["channels"])),
            desc["method"],
            desc.get("config", {}),
        )


@torch.no_grad()
def embed_images(
    embedder: nn.Module,
    images: np.ndarray | torch.Tensor,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Run ``embedder`` over uint8 images in batches; float32 N×D on ``device``.

    ``on_batch(n)`` is called after each batch of n images (progress bars).
    """
    embedder.eval().to(device)
    out = []
    for start in range(0, len(images), batch_size):
        part = torch.from_numpy(np.array(images[start : start + batch_size])).to(device)
        out.append(embedder(part).float())
        if on_batch is not None:
            on_batch(len(part))
    if not out:
        raise ValueError("no images to embed")
    return torch.cat(out)


def versions() -> dict[str, str]:
    import faiss
    import PIL

    from . import __version__

    return {
        "imgcluster": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "faiss": getattr(faiss, "__version__", "unknown"),
        "pillow": PIL.__version__,
    }


def _read_description(path: Path) -> dict[str, Any]:
    try:
        desc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _not_found(path) from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{show_path(path)}: not a readable model description ({exc})") from None
    checks: list[tuple[str, Callable[[Any], bool]]] = [
        ("format", lambda v: v == MODEL_FORMAT),
        ("format_version", lambda v: v == MODEL_FORMAT_VERSION),
        ("method", lambda v: isinstance(v, str)),
        ("k", lambda v: isinstance(v, int) and v >= 1),
        ("metric", lambda v: v in METRICS),
        ("preprocessing", lambda v: isinstance(v, dict) and _valid_prep(v)),
        (
            "embedder",
            lambda v: (
                isinstance(v, dict)
                and isinstance(v.get("class"), str)
                and isinstance(v.get("args"), dict)
            ),
        ),
    ]
    if not isinstance(desc, dict):
        raise UsageError(f"{show_path(path)}: not a model description (expected a JSON object)")
    for key, ok in checks:
        if key not in desc or not ok(desc[key]):
            raise UsageError(f"{show_path(path)}: invalid or missing field {key!r}")
    return desc


def _not_found(path: Path) -> UsageError:
    if path.parent.is_dir():
        return unfinished(path.parent, path.name)
    return UsageError(f"{show_path(path.parent)}: no such run folder")


def _valid_prep(p: dict[str, Any]) -> bool:
    return (
        isinstance(p.get("image_size"), int)
        and 1 <= p["image_size"] <= 4096
        and p.get("channels") in (1, 3)
    )


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise _not_found(path) from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UsageError(f"{show_path(path)}: not a valid safetensors file ({exc})") from None


def _build_embedder(desc: dict[str, Any], folder: Path) -> nn.Module:
    name = desc["embedder"]["class"]
    cls = _EMBEDDERS.get(name)
    if cls is None:
        # the methods and the pretrained-feature mode register their embedders when imported
        from . import features, methods  # noqa: F401

        cls = _EMBEDDERS.get(name)
    if cls is None:
        raise UsageError(
            f"{show_path(folder)}: unknown embedder {name!r} (made by a newer imgcluster?)"
        )
    try:
        return cls(**desc["embedder"]["args"])
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{show_path(folder)}: invalid embedder arguments ({exc})") from None


def _check_state(embedder: nn.Module, state: dict[str, torch.Tensor], folder: Path) -> None:
    expected = embedder.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UsageError(
            f"{show_path(folder)}: model tensors do not match the embedder "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for key, want in expected.items():
        got = state[key]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise UsageError(
                f"{show_path(folder)}: tensor {key!r} is {got.dtype} {tuple(got.shape)}, "
                f"expected {want.dtype} {tuple(want.shape)}"
            )
