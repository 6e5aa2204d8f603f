"""Step 2: decode image files into small uint8 arrays, on all cores.

Every file becomes a ``C×S×S`` uint8 array: EXIF orientation applied, any Pillow
mode turned into grey (C = 1) or RGB (C = 3), transparency composited on white,
the shorter side resized to ``S`` and the centre square kept. Large JPEGs are
decoded at a reduced scale (Pillow's draft mode), which is several times faster
for phone photos. A file that cannot be read raises ``DecodeError`` with a short
reason; callers skip it and go on.

This module must not import torch: it runs in the worker processes.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
DEFAULT_MAX_SIZE = 64  # the automatic working size never exceeds this (see docs/cli.md)
_INLINE_BELOW = 64  # fewer files than this are decoded in-process: starting workers costs more


class DecodeError(Exception):
    """A file that cannot be turned into an image; the message is the reason."""


@dataclass(frozen=True)
class Probe:
    """What the file header says: whether the image is grey, and its size."""

    grey: bool
    width: int
    height: int


# -- one file -----------------------------------------------------------------------------


def probe(path: str) -> Probe:
    """Read only the header of ``path``. Raises DecodeError for files that are not images."""
    with _open(path) as im:
        return Probe(grey=im.mode in GREY_MODES, width=im.width, height=im.height)


def decode(path: str, size: int, channels: int) -> np.ndarray:
    """Decode ``path`` to a ``channels×size×size`` uint8 array. Raises DecodeError."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    with _open(path) as im:
        try:
            if im.format == "JPEG":
                # decode at 1/2, 1/4 or 1/8 scale when the result stays >= size
                im.draft("L" if channels == 1 else im.mode, (size, size))
            im = ImageOps.exif_transpose(im)
            im = _to_mode(im, "L" if channels == 1 else "RGB")
            im = _resize_centre(im, size)
        except DecodeError:
            raise
        except Exception as exc:  # Pillow raises many kinds on corrupt data
            raise DecodeError(_reason(exc)) from None
    arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


class _open:
    """``Image.open`` with every failure turned into a DecodeError with a clear reason."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.image: Image.Image | None = None

    def __enter__(self) -> Image.Image:
        try:
            if os.path.getsize(self.path) == 0:
                raise DecodeError("empty file (0 bytes)")
            with warnings.catch_warnings():
                # only Pillow's hard limit (2x MAX_IMAGE_PIXELS) skips a file
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                self.image = Image.open(self.path)
        except DecodeError:
            raise
        except Exception as exc:
            raise DecodeError(_reason(exc)) from None
        return self.image

    def __exit__(self, *exc: object) -> None:
        if self.image is not None:
            self.image.close()


def _reason(exc: BaseException) -> str:
    """A short, user-facing reason for a decoding failure."""
    if isinstance(exc, Image.DecompressionBombError):
        return "image too large (over Pillow's decompression-bomb limit)"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image, or a format Pillow cannot read"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "is a folder"
    if isinstance(exc, FileNotFoundError):
        return "file not found (deleted or a broken link)"
    if isinstance(exc, OSError) and "truncated" in str(exc):
        return "truncated image data"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"corrupt image data ({text})"


def _to_mode(im: Image.Image, mode: str) -> Image.Image:
    """Convert any Pillow mode to ``mode`` ("L" or "RGB") the way a viewer shows it."""
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        im = Image.fromarray(_to_8bit(np.asarray(im)), "L")
    if im.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in im.info:
        # transparent pixels show the white page a browser or viewer shows
        rgba = im.convert("RGBA")
        page = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(page, rgba)
    return im if im.mode == mode else im.convert(mode)


def _to_8bit(arr: np.ndarray) -> np.ndarray:
    """High-bit-depth grey (16-bit PNG/TIFF, float TIFF) scaled to 0..255."""
    if arr.dtype.kind == "f":
        top = 1.0 if np.nanmax(arr, initial=0.0) <= 1.0 else 255.0
        return np.clip(np.nan_to_num(arr) * (255.0 / top), 0, 255).astype(np.uint8)
    wide = np.clip(arr.astype(np.int64), 0, 65535)
    return (wide >> 8).astype(np.uint8) if wide.max(initial=0) > 255 else wide.astype(np.uint8)


def _resize_centre(im: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` and keep the centre square."""
    w, h = im.size
    if (w, h) == (size, size):
        return im
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    return im.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)


# -- many files -------------------------------------------------------------------------


def probe_chunk(paths: Sequence[str]) -> list[Probe | str]:
    """Probe each path: a Probe, or the reason it cannot be read."""
    out: list[Probe | str] = []
    for path in paths:
        try:
            out.append(probe(path))
        except DecodeError as exc:
            out.append(str(exc))
    return out


def decode_chunk(paths: Sequence[str], size: int, channels: int) -> tuple[np.ndarray, list[str]]:
    """Decode paths into one ``n×C×S×S`` array; ``reasons[i]`` is "" where decoding worked."""
    batch = np.zeros((len(paths), channels, size, size), dtype=np.uint8)
    reasons = [""] * len(paths)
    for i, path in enumerate(paths):
        try:
            batch[i] = decode(path, size, channels)
        except DecodeError as exc:
            reasons[i] = str(exc)
    return batch, reasons


T = TypeVar("T")
R = TypeVar("R")


class Workers:
    """A pool of decoding processes (or none, for small jobs); use as a context manager.

    ``map`` keeps at most a few chunks in flight so memory stays flat however many
    files there are, and yields results in input order.
    """

    def __init__(self, n_items: int, workers: int | None = None) -> None:
        self.workers = max(1, workers or os.cpu_count() or 1)
        self.inline = self.workers == 1 or n_items < _INLINE_BELOW
        self.chunk = max(8, min(256, n_items // (self.workers * 4) or 1))
        self._pool: Executor | None = None

    def __enter__(self) -> Workers:
        if not self.inline:
            # forkserver: children start from a clean process, not from one holding torch threads
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["imgcluster.decode"])
            self._pool = ProcessPoolExecutor(self.workers, mp_context=ctx)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def chunks(self, items: Sequence[T]) -> list[Sequence[T]]:
        return [items[i : i + self.chunk] for i in range(0, len(items), self.chunk)]

    def map(
        self, fn: Callable[..., R], chunks: Iterable[Sequence[T]], *args: object
    ) -> Iterator[R]:
        if self._pool is None:
            for chunk in chunks:
                yield fn(chunk, *args)
            return
        pending: deque[Future[R]] = deque()
        for chunk in chunks:
            with _main_script_hidden():  # a submit may start a worker
                pending.append(self._pool.submit(fn, chunk, *args))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@contextmanager
def _main_script_hidden() -> Iterator[None]:
    """Keep a worker started inside the block from running the parent's main script.

    multiprocessing starts each forkserver (or spawn) child by running the parent's
    ``__main__`` again, as ``__mp_main__``, in case it defines what the child will call. Ours
    call only this module, and a script that imports torch at the top made every worker
    import it too: 18 s before the first result with 16 workers on 2 cores (0.14 s without),
    and most likely the 7-9 s that reading 70,000 headers took on a 16-core GPU host. The
    child finds the script through ``__main__``'s ``__spec__`` and ``__file__``, so those are
    hidden while workers start."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {key: main.__dict__.pop(key) for key in ("__file__", "__spec__") if key in vars(main)}
    main.__spec__ = None
    try:
        yield
    finally:
        del main.__spec__
        main.__dict__.update(saved)
