"""Choosing the torch device from ``--device auto|cpu|cuda[:N]``."""

from __future__ import annotations

import torch

from .errors import UsageError


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` is the current CUDA GPU when there is one, else the CPU. A GPU always comes
    back with its index (``cuda:0``, not ``cuda``), so devices compare equal to the ones
    tensors report."""
    name = str(name).strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {name}: no CUDA GPU is available here; use --device cpu or auto"
            )
        dev = torch.device(name)
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise UsageError(f"--device {name}: only {n} GPU{'' if n == 1 else 's'} here")
        # every network here sees batches of one shape, the case cuDNN's autotuner is for:
        # each convolution's fastest algorithm is timed once, at its first call
        torch.backends.cudnn.benchmark = True
        return dev
    raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
