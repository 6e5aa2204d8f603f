"""A counter-based random number generator made of tensor ops: same numbers on every device.

torch's CPU and CUDA generators give different streams for the same seed, so a
training run on the GPU could not be checked against one on the CPU, and
drawing random numbers on the host every step would add a host-to-device copy
to every step. Here a random number is a hash of (key, element index): the key
is a few Python integers (seed, epoch, step, purpose), the index is an
``arange`` on the device, and the hash is the "lowbias32" integer mixer
(Wellons) applied twice. Nothing is copied between host and device and
nothing waits, and the CPU and the GPU produce the same values.

A key may also be a 0-d int64 tensor on the device (``key`` and the draws take either):
the same numbers come out, and a step replayed as a CUDA graph (``engine.GraphedStep``)
gets fresh numbers each time by having the key tensor refilled before each replay, where a
Python int would have been frozen into the recorded kernels.
"""

from __future__ import annotations

import math

import torch

_M32 = 0xFFFFFFFF

Key = int | torch.Tensor  # a Python int, or a 0-d int64 tensor holding one (see above)


def _mix_int(x: int) -> int:
    """lowbias32 on a Python int."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    x ^= x >> 16
    return x


def _mix_any(x: Key) -> Key:
    """lowbias32 on a Python int or on an int64 tensor of values in [0, 2**32)."""
    return _mix_int(x) if isinstance(x, int) else _mix(x & _M32)


def key(*parts: Key) -> Key:
    """A 32-bit key from any number of integers (seed, epoch, step, purpose...); a tensor
    when any part is one (the same value, kept on the device)."""
    h: Key = 0x9E3779B9
    for part in parts:
        part = part if isinstance(part, torch.Tensor) else int(part)
        h = _mix_any(h ^ _mix_any(part & _M32) ^ _mix_any((part >> 32) & _M32))
    return h


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 0 <= x < 2**32 without int64 overflow: c split in 16-bit halves."""
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (hi + x * (c & 0xFFFF)) & _M32


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def bits(n: int, k: Key, device: torch.device | str) -> torch.Tensor:
    """``n`` random 32-bit integers (in int64) for key ``k``."""
    idx = torch.arange(n, device=device, dtype=torch.int64)
    return _mix(_mix(idx ^ (k & _M32)) ^ _mix_any(k ^ 0x5BD1E995))


def uniform(shape: tuple[int, ...], k: Key, device: torch.device | str) -> torch.Tensor:
    """Float32 numbers uniform in [0, 1), 24 random bits each."""
    n = math.prod(shape)
    return ((bits(n, k, device) >> 8).float() * (1.0 / (1 << 24))).reshape(shape)


def normal(shape: tuple[int, ...], k: Key, device: torch.device | str) -> torch.Tensor:
    """Standard normal numbers (Box-Muller on two uniform streams)."""
    u1 = uniform(shape, key(k, 1), device).clamp_min_(1.0 / (1 << 24))
    u2 = uniform(shape, key(k, 2), device)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


def integers(shape: tuple[int, ...], high: int, k: Key, device: torch.device | str) -> torch.Tensor:
    """Integers uniform in [0, high) (int64)."""
    return (uniform(shape, k, device) * high).long().clamp_max_(high - 1)


def permutation(n: int, k: Key, device: torch.device | str) -> torch.Tensor:
    """A random permutation of 0..n-1: the order of n random keys."""
    return torch.argsort(
        bits(n, k, device), stable=True
    )  # stable: ties resolve the same everywhere
