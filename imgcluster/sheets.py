"""Contact sheets: one PNG per cluster, and an overview with a row per cluster.

A cluster's sheet shows its images nearest the centroid first (the most typical), a strip of
its least typical ones (farthest from the centroid), and its size in the title. The order
comes from the ``distance`` column of the labels, so the sheets need no model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .atomic import atomic_path
from .decode import DecodeError, decode
from .labels import Labels
from .report import Reporter, counted

THUMB = 64
_PAD = 4
_TITLE = 22
_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)


def cluster_members(labels: Labels) -> dict[int, np.ndarray]:
    """Row indices of each cluster, nearest the centroid first."""
    out = {}
    for c in np.unique(labels.cluster):
        rows = np.flatnonzero(labels.cluster == c)
        out[int(c)] = rows[np.argsort(labels.distance[rows], kind="stable")]
    return out


def thumbnail(path: Path, size: int = THUMB) -> Image.Image:
    """The image as a square RGB thumbnail; a grey square when it cannot be read any more."""
    try:
        return Image.fromarray(decode(str(path), size, 3).transpose(1, 2, 0))
    except (DecodeError, OSError):
        return Image.new("RGB", (size, size), (200, 200, 200))


def write_sheets(
    labels: Labels,
    folder: Path,
    columns: int = 8,
    rows: int = 6,
    strip: int = 8,
    reporter: Reporter | None = None,
) -> list[Path]:
    """cluster_NN.png for every cluster and overview.png in ``folder``; returns their paths."""
    reporter = reporter or Reporter(quiet=True)
    folder.mkdir(parents=True, exist_ok=True)
    members = cluster_members(labels)
    width = max(2, len(str(max(members, default=0))))
    thumbs = _ThumbCache(labels)
    written = []
    with reporter.task("contact sheets", total=len(members) + 1) as bar:
        for c, idx in members.items():
            typical = list(idx[: columns * rows])
            odd = [i for i in idx[::-1][:strip] if i not in set(typical)][::-1]
            title = f"cluster {c}: {counted(len(idx), 'image')}"
            sheet = _sheet(title, typical, odd, columns, thumbs.get)
            written.append(_save(sheet, folder / f"cluster_{c:0{width}d}.png"))
            bar.advance()
        written.append(_save(_overview(members, columns, thumbs.get), folder / "overview.png"))
        bar.advance()
    return written


class _ThumbCache:
    def __init__(self, labels: Labels) -> None:
        self.labels = labels
        self.cache: dict[int, Image.Image] = {}

    def get(self, row: int) -> Image.Image:
        if row not in self.cache:
            self.cache[row] = thumbnail(self.labels.resolve(self.labels.paths[row]))
        return self.cache[row]


def _grid(rows: list[int], columns: int, thumb: Callable[[int], Image.Image]) -> Image.Image:
    n_rows = max(1, -(-len(rows) // columns))
    cell = THUMB + _PAD
    out = Image.new("RGB", (columns * cell + _PAD, n_rows * cell + _PAD), _BACKGROUND)
    for i, row in enumerate(rows):
        out.paste(thumb(row), (_PAD + (i % columns) * cell, _PAD + (i // columns) * cell))
    return out


def _sheet(
    title: str,
    typical: list[int],
    odd: list[int],
    columns: int,
    thumb: Callable[[int], Image.Image],
) -> Image.Image:
    top = _grid(typical, columns, thumb)
    parts = [(title, top)]
    if odd:
        parts.append(("least typical (farthest from the centre)", _grid(odd, columns, thumb)))
    height = sum(_TITLE + p.height for _, p in parts)
    out = Image.new("RGB", (top.width, height), _BACKGROUND)
    draw = ImageDraw.Draw(out)
    y = 0
    for text, part in parts:
        draw.text((_PAD, y + 5), text, fill=_TEXT)
        out.paste(part, (0, y + _TITLE))
        y += _TITLE + part.height
    return out


def _overview(
    members: dict[int, np.ndarray], columns: int, thumb: Callable[[int], Image.Image]
) -> Image.Image:
    """A row per cluster: its label and size, then its most typical images."""
    label_width = 120
    cell = THUMB + _PAD
    out = Image.new(
        "RGB",
        (label_width + columns * cell + _PAD, max(1, len(members)) * cell + _PAD),
        _BACKGROUND,
    )
    draw = ImageDraw.Draw(out)
    for r, (c, idx) in enumerate(members.items()):
        y = _PAD + r * cell
        draw.text((_PAD, y + THUMB // 2 - 6), f"cluster {c} ({len(idx)})", fill=_TEXT)
        for j, row in enumerate(idx[:columns]):
            out.paste(thumb(int(row)), (label_width + _PAD + j * cell, y))
    return out


def _save(image: Image.Image, path: Path) -> Path:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", optimize=True)
    return path
