"""``assign``: label new images with a trained run, streaming so memory stays flat."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from . import decode as dec
from . import files
from .atomic import atomic_open
from .device import resolve_device
from .errors import ImgclusterError, UsageError
from .labels import JsonLines, format_rows, open_csv
from .model import ClusterModel
from .report import Reporter, show_path


@dataclass
class AssignResult:
    images: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)


def assign(
    run: Path,
    inputs: Sequence[str | Path],
    *,
    out: Path | None = None,
    stream: IO[str] | None = None,
    device: str = "auto",
    workers: int | None = None,
    strict: bool = False,
    fmt: str = "csv",
    reporter: Reporter | None = None,
) -> AssignResult:
    """Label the images in ``inputs`` with the model in ``run``.

    Rows (path as named, cluster, confidence, distance) go to ``out`` (written
    atomically) or to ``stream`` (default stdout) as they are computed, as CSV or, with
    ``fmt="jsonl"``, one JSON object per line.
    """
    if fmt not in ("csv", "jsonl"):
        raise UsageError(f"format must be csv or jsonl, got {fmt!r}")
    reporter = reporter or Reporter(quiet=True)
    model = ClusterModel.load(Path(run))
    dev = resolve_device(device)
    found = files.find_images(list(inputs))
    if note := found.left_out_note():
        reporter.note(note)
    result = AssignResult(0, sizes=[0] * model.k)
    _skip(result, found.skipped, strict, reporter)
    prep = model.preprocessing
    with (
        _output(out, stream) as fh,
        dec.Workers(len(found), workers) as pool,
        reporter.task("assigning", total=len(found)) as bar,
    ):
        writer = open_csv(fh) if fmt == "csv" else JsonLines(fh)
        chunks = pool.chunks(found.files)
        paths = ([str(f.path) for f in chunk] for chunk in chunks)
        for chunk, (batch, reasons) in zip(
            chunks, pool.map(dec.decode_chunk, paths, prep.image_size, prep.channels), strict=True
        ):
            good = [i for i, r in enumerate(reasons) if not r]
            _skip(
                result,
                [(str(chunk[i].path), r) for i, r in enumerate(reasons) if r],
                strict,
                reporter,
            )
            if good:
                a = model.assign(batch[good], device=dev)
                writer.writerows(format_rows([str(chunk[i].path) for i in good], a))
                result.images += len(good)
                result.sizes = (
                    np.asarray(result.sizes) + np.bincount(a.cluster, minlength=model.k)
                ).tolist()
            bar.advance(len(chunk))
    return result


def _skip(
    result: AssignResult, bad: list[tuple[str, str]], strict: bool, reporter: Reporter
) -> None:
    for path, reason in bad:
        if strict:
            raise ImgclusterError(f"{show_path(path)}: {reason}; stopped because of --strict")
        reporter.warn(f"skipped {show_path(path)}: {reason}")
        result.skipped.append((path, reason))


@contextmanager
def _output(out: Path | None, stream: IO[str] | None) -> Iterator[IO[str]]:
    if out is None:
        yield stream or sys.stdout
        return
    with atomic_open(Path(out), "w", encoding="utf-8", errors="surrogateescape", newline="") as fh:
        yield fh
