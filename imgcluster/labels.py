"""Label files: ``path,cluster,confidence,distance`` as CSV (or the same fields as JSON).

File names that are not valid UTF-8 are written byte for byte (surrogateescape),
so every name round-trips; names with commas, quotes or newlines are quoted.
In a run folder the paths are relative to the run's image root, recorded in its
``config.toml``; ``assign`` writes paths as they were named on the command line.
"""

from __future__ import annotations

import csv
import json
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

from .atomic import atomic_open, atomic_path
from .errors import UsageError
from .report import show_path
from .runs import unfinished

if TYPE_CHECKING:  # importing search loads torch and faiss; export and evaluate need neither
    from .search import Assignment

COLUMNS = ("path", "cluster", "confidence", "distance")


@dataclass
class Labels:
    """The rows of a label file, and the folder its relative paths start from."""

    paths: list[str]
    cluster: np.ndarray
    confidence: np.ndarray
    distance: np.ndarray
    root: Path
    sources: list[str] | None = None  # an export's labels: where each image came from

    def __len__(self) -> int:
        return len(self.paths)

    def resolve(self, path: str) -> Path:
        return Path(path) if Path(path).is_absolute() else self.root / path


def format_rows(paths: Iterable[str], a: Assignment) -> Iterator[tuple[str, int, str, str]]:
    for path, c, conf, dist in zip(paths, a.cluster, a.confidence, a.distance, strict=True):
        yield path, int(c), f"{conf:.6g}", f"{dist:.6g}"


def open_csv(fh: IO[str]) -> csv.writer:  # type: ignore[valid-type]
    """A CSV writer with the header written; rows come from ``format_rows``."""
    writer = csv.writer(fh, lineterminator="\n")
    writer.writerow(COLUMNS)
    return writer


class JsonLines:
    """A writer with csv.writer's ``writerows`` that writes one JSON object per row."""

    def __init__(self, fh: IO[str]) -> None:
        self.fh = fh

    def writerows(self, rows: Iterable[tuple[str, int, str, str]]) -> None:
        for path, c, conf, dist in rows:
            record = {
                "path": path,
                "cluster": c,
                "confidence": float(conf),
                "distance": float(dist),
            }
            self.fh.write(json.dumps(record) + "\n")


def write_parquet(path: Path, paths: list[str], a: Assignment) -> bool:
    """``labels.parquet`` with the CSV's columns, when pyarrow is installed; False otherwise."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return False
    table = pa.table(
        {
            "path": [
                p.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for p in paths
            ],
            "cluster": a.cluster,
            "confidence": a.confidence,
            "distance": a.distance,
        }
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, str(tmp))
    return True


def write_labels(path: Path, paths: list[str], a: Assignment, fmt: str = "csv") -> None:
    """Write a whole label file atomically, as CSV or JSON."""
    if fmt == "json":
        rows = [
            dict(zip(COLUMNS, (p, int(c), float(f), float(d)), strict=True))
            for p, c, f, d in zip(paths, a.cluster, a.confidence, a.distance, strict=True)
        ]
        with atomic_open(path, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1)
            fh.write("\n")
        return
    with atomic_open(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as fh:
        open_csv(fh).writerows(format_rows(paths, a))


def labels_path(path: Path) -> Path:
    """``path``, or the ``labels.csv`` in it when it is a run folder."""
    path = Path(path)
    if path.is_dir() and (path / "labels.csv").is_file():
        return path / "labels.csv"
    return path


def read_labels(path: Path, root: Path | None = None) -> Labels:
    """Read a CSV or JSON label file; UsageError for a missing file or wrong columns.

    ``path`` may be a run folder (its ``labels.csv`` is read). Relative paths resolve against
    ``root``, else the image root recorded in a ``config.toml`` beside the file (a run
    folder), else the file's own folder for an export's labels (a ``source`` column after
    the four), else the current folder.
    """
    path = labels_path(path)
    if path.is_dir():
        raise unfinished(path, "labels.csv")
    try:
        rows = _read_rows(path)
    except FileNotFoundError:
        raise UsageError(f"{show_path(path)}: labels file not found") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{show_path(path)}: cannot read labels ({exc})") from None
    sources = _sources(rows)
    root = root or run_root(path.parent) or (path.parent if sources else Path.cwd())
    return _to_labels(rows, path, root, sources)


def export_sources(folder: Path) -> list[str]:
    """The ``source`` column of the labels file ``export`` wrote into ``folder``
    (labels.csv, else labels.json); empty when there is none or it is not an export's."""
    for name in ("labels.csv", "labels.json"):
        path = Path(folder, name)
        if path.is_file():
            return list(export_placements(path))
    return []


def export_placements(path: Path) -> dict[str, str]:
    """Source → placed path (relative to the file's folder) from the labels file ``export``
    wrote at ``path``; empty when it cannot be read or is not an export's."""
    try:
        rows = _read_rows(path)
    except (OSError, ValueError):  # unreadable or not a labels file
        return {}
    sources = _sources(rows) or []
    return {src: str(row[0]) for src, (_, row) in zip(sources, rows, strict=False)}


def _read_rows(path: Path) -> list[tuple[int, list[str]]]:
    return _read_json_rows(path) if path.suffix.lower() == ".json" else _read_csv_rows(path)


def _sources(rows: list[tuple[int, list[str]]]) -> list[str] | None:
    """Each row's ``source`` (the fifth field) when every row has one: an export's labels."""
    if rows and all(len(row) > len(COLUMNS) for _, row in rows):
        return [str(row[len(COLUMNS)]) for _, row in rows]
    return None


def run_root(folder: Path) -> Path | None:
    """The image root recorded in ``folder/config.toml``, if there is one."""
    try:
        with open(Path(folder, "config.toml"), "rb") as fh:
            root = tomllib.load(fh).get("data", {}).get("root")
    except (OSError, tomllib.TOMLDecodeError):
        return None
    return Path(root) if isinstance(root, str) else None


def _read_csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """The rows after the header, each with the file line it ends on (blank lines and
    quoted line breaks make the two counts differ); a ``source`` column after the four
    (an export's) is kept as a fifth field, any other extra column dropped."""
    # utf-8-sig: a labels file saved again by a spreadsheet starts with a byte-order mark
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header[:4]) != COLUMNS:
            raise ValueError(
                f"expected the columns {','.join(COLUMNS)}, found {','.join(header or [])!r}"
            )
        width = 5 if len(header) > 4 and header[4].strip() == "source" else 4
        return [(reader.line_num, row[:width]) for row in reader if row]


def _read_json_rows(path: Path) -> list[tuple[int, list[str]]]:
    """The objects as rows, numbered from 1 (with ``source`` as a fifth field when every
    object has one: an export's)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list) or not all(
        isinstance(r, dict) and set(COLUMNS) <= set(r) for r in data
    ):
        raise ValueError(f"expected a list of objects with the keys {', '.join(COLUMNS)}")
    keys = (*COLUMNS, "source") if all("source" in r for r in data) else COLUMNS
    return [(i, [r[c] for c in keys]) for i, r in enumerate(data, start=1)]


def _to_labels(
    rows: list[tuple[int, list[str]]], path: Path, root: Path, sources: list[str] | None
) -> Labels:
    paths, cluster, conf, dist = [], [], [], []
    for line, row in rows:
        try:
            paths.append(str(row[0]))
            cluster.append(int(row[1]))
            conf.append(float(row[2]))
            dist.append(float(row[3]))
        except (IndexError, ValueError, TypeError):
            raise UsageError(
                f"{show_path(path)}: row {line} is not path,cluster,confidence,distance"
            ) from None
        if cluster[-1] < 0:
            raise UsageError(f"{show_path(path)}: row {line} has a negative cluster id")
    return Labels(
        paths,
        np.array(cluster, dtype=np.int64),
        np.array(conf, dtype=np.float32),
        np.array(dist, dtype=np.float32),
        root,
        sources,
    )
