"""Nearest-centroid search, the read-out every method shares.

``nearest`` hides the backend: a FAISS GPU index when FAISS sees a GPU; on a GPU
with a CPU-only FAISS, a batched torch matmul + top-2 on the GPU; FAISS on the
CPU otherwise. All backends compute exact (flat) search in float32 and agree.

Per image it returns the cluster, a ``distance`` (Euclidean for the ``l2``
metric; the negated score for ``ip``, so smaller is always closer) and a
``confidence`` in [0, 1]: for ``l2`` it is 1 - d1/d2 (d1, d2 the distances to
the nearest and second-nearest centroid), for ``ip`` the two-way softmax
1 / (1 + exp(-(s1 - s2))) of the best two scores. With one centroid it is 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import faiss
import numpy as np
import torch

METRICS = ("l2", "ip")
BACKENDS = ("auto", "faiss-cpu", "faiss-gpu", "torch-cpu", "torch-cuda")


@dataclass
class Assignment:
    cluster: np.ndarray  # int64 [n]
    confidence: np.ndarray  # float32 [n]
    distance: np.ndarray  # float32 [n]

    def __len__(self) -> int:
        return len(self.cluster)


@cache
def faiss_gpus() -> int:
    """Number of GPUs FAISS can use (0 with the faiss-cpu build)."""
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def available_backends() -> list[str]:
    """The concrete backends this machine can run."""
    out = ["faiss-cpu", "torch-cpu"]
    if torch.cuda.is_available():
        out.append("torch-cuda")
    if faiss_gpus() > 0:
        out.append("faiss-gpu")
    return out


def choose_backend(device: torch.device | str = "cpu") -> str:
    """faiss-gpu if FAISS has a GPU, else torch on a CUDA device, else faiss-cpu."""
    if torch.device(device).type == "cuda":
        return "faiss-gpu" if faiss_gpus() > 0 else "torch-cuda"
    return "faiss-cpu"


def nearest(
    x: np.ndarray | torch.Tensor,
    centroids: np.ndarray | torch.Tensor,
    metric: str = "l2",
    backend: str = "auto",
    device: torch.device | str = "cpu",
) -> Assignment:
    """Nearest centroid of each row of ``x`` under ``metric`` ("l2" or "ip")."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = choose_backend(device)
    top = min(2, len(centroids))
    if backend.startswith("faiss"):
        scores, idx = _faiss_top(_numpy(x), _numpy(centroids), metric, top, backend == "faiss-gpu")
    else:
        dev = "cuda" if backend == "torch-cuda" else "cpu"
        scores, idx = _torch_top(x, centroids, metric, top, torch.device(dev))
    return _assignment(scores, idx, metric)


def _numpy(a: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().float().cpu().numpy()
    return np.ascontiguousarray(a, dtype=np.float32)


def _faiss_top(
    x: np.ndarray, c: np.ndarray, metric: str, top: int, gpu: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the ``top`` best centroids; scores are squared L2 or inner products."""
    index = faiss.IndexFlatL2(c.shape[1]) if metric == "l2" else faiss.IndexFlatIP(c.shape[1])
    if gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(c)
    scores, idx = index.search(x, top)
    return scores, idx.astype(np.int64)


def _torch_top(
    x: np.ndarray | torch.Tensor,
    c: np.ndarray | torch.Tensor,
    metric: str,
    top: int,
    device: torch.device,
    chunk: int = 65536,
) -> tuple[np.ndarray, np.ndarray]:
    """The same answer as FAISS's flat index, as batched matmuls on ``device`` (full fp32:
    neither TF32 nor an enclosing autocast, which would change which row wins)."""
    xt = torch.as_tensor(x, device=device).float()
    ct = torch.as_tensor(c, device=device).float()
    c_sq = (ct * ct).sum(1)
    scores, ids = [], []
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # TF32 would change which centroid wins
    try:
        with torch.autocast(device.type, enabled=False):
            for part in xt.split(chunk):
                dot = part @ ct.T
                if metric == "l2":
                    d2 = ((part * part).sum(1, keepdim=True) - 2 * dot + c_sq).clamp_min_(0)
                    s, i = d2.topk(top, dim=1, largest=False)
                else:
                    s, i = dot.topk(top, dim=1, largest=True)
                scores.append(s)
                ids.append(i)
    finally:
        torch.set_float32_matmul_precision(previous)
    return torch.cat(scores).cpu().numpy(), torch.cat(ids).cpu().numpy().astype(np.int64)


def _assignment(scores: np.ndarray, idx: np.ndarray, metric: str) -> Assignment:
    """Turn top-2 scores into (cluster, confidence, distance) as the module docstring says."""
    cluster = idx[:, 0]
    if metric == "l2":
        d = np.sqrt(np.maximum(scores, 0.0))
        distance = d[:, 0]
        if d.shape[1] > 1:
            with np.errstate(divide="ignore", invalid="ignore"):
                conf = np.where(d[:, 1] > 0, 1.0 - d[:, 0] / d[:, 1], 0.0)
        else:
            conf = np.ones(len(d))
    else:
        distance = -scores[:, 0]
        conf = (
            1.0 / (1.0 + np.exp(-(scores[:, 0] - scores[:, 1])))
            if scores.shape[1] > 1
            else np.ones(len(scores))
        )
    return Assignment(
        cluster.astype(np.int64), conf.astype(np.float32), distance.astype(np.float32)
    )
