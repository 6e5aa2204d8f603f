"""``evaluate``: score a label file against ground truth, or without it.

Ground truth is each image's parent folder name (``folders``), or a CSV with
the columns ``path,label`` whose relative paths start from the same root as the
label file's. ``auto`` uses the folder names when the images sit in at least
two folders, and scores without truth otherwise. For an export's labels file
(with its ``source`` column) the images' original places count, not the
``cluster_NN`` folders export put them in: those would score the labels
against themselves.
"""

from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from . import metrics
from .errors import UsageError
from .labels import Labels, labels_path, read_labels
from .report import Reporter, counted, show_path


@dataclass
class Evaluation:
    images: int
    clusters: int
    sizes: dict[int, int]
    balance: float
    mean_confidence: float
    silhouette: float | None
    truth: str | None = None
    classes: list[str] | None = None
    acc: float | None = None
    nmi: float | None = None
    ari: float | None = None
    confusion: list[list[int]] | None = None  # rows: clusters (sorted ids), columns: classes
    mapping: dict[int, str] | None = None  # cluster -> class under the ACC matching
    scored: int | None = None  # images that had ground truth

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sizes"] = {str(c): n for c, n in self.sizes.items()}
        if self.mapping is not None:
            d["mapping"] = {str(c): cls for c, cls in self.mapping.items()}
        return d


def evaluate(
    labels_file: Path,
    truth: str = "auto",
    root: Path | None = None,
    reporter: Reporter | None = None,
) -> Evaluation:
    """Score ``labels_file``; ``truth`` is "auto", "folders", "none" or a CSV path."""
    reporter = reporter or Reporter(quiet=True)
    labels_file = labels_path(labels_file)  # a run folder means its labels.csv
    labels = read_labels(labels_file, root)
    if len(labels) == 0:
        raise UsageError(f"{show_path(labels_file)}: the labels file has no rows")
    result = _label_free(labels, Path(labels_file))
    classes = _truth(labels, truth, reporter)
    if classes is not None:
        _score(result, labels, classes, truth)
    return result


def _label_free(labels: Labels, path: Path) -> Evaluation:
    ids, counts = np.unique(labels.cluster, return_counts=True)
    sizes = {int(c): int(n) for c, n in zip(ids, counts, strict=True)}
    sil = None
    emb_file = path.parent / "embeddings.npy"
    if emb_file.is_file():
        z = np.load(emb_file, mmap_mode="r", allow_pickle=False)
        if len(z) == len(labels):
            sil = metrics.silhouette(np.asarray(z), labels.cluster)
    return Evaluation(
        len(labels),
        len(ids),
        sizes,
        metrics.size_balance(labels.cluster),
        float(labels.confidence.mean()),
        sil,
    )


def _truth(labels: Labels, truth: str, reporter: Reporter) -> list[str | None] | None:
    """One class name per label row (None where unknown), or None for no ground truth."""
    if truth == "none":
        return None
    if truth in ("auto", "folders"):
        names = [_folder_class(p, labels.root) for p in labels.sources or labels.paths]
        if truth == "auto" and len(set(names)) < 2:
            return None
        return names
    return _truth_from_csv(labels, Path(truth), reporter)


def _folder_class(path: str, root: Path) -> str:
    parent = PurePath(path).parent
    return parent.name if parent.name else root.name


def _truth_from_csv(labels: Labels, path: Path, reporter: Reporter) -> list[str | None]:
    rows = _read_truth(path)
    key_of = {_key(labels.root, p): i for i, p in enumerate(labels.paths)}
    for i, p in enumerate(labels.sources or []):  # an export's: the originals' paths count too
        key_of.setdefault(_key(labels.root, p), i)
    unknown = [p for _, p, _ in rows if _key(labels.root, p) not in key_of]
    if unknown:
        raise UsageError(
            f"{show_path(path)}: {_are(len(unknown), 'path')} not in the labels, "
            f"e.g. {show_path(unknown[0])}"
        )
    out: list[str | None] = [None] * len(labels)
    first: dict[int, int] = {}  # image -> the line that gave its class
    for line, p, label in rows:
        i = key_of[_key(labels.root, p)]
        if out[i] is not None and out[i] != label:
            raise UsageError(
                f"{show_path(path)}: line {line} gives {p} the class {label!r}, "
                f"line {first[i]} gave it {out[i]!r}"
            )
        out[i] = label
        first.setdefault(i, line)
    missing = out.count(None)
    if missing:
        reporter.warn(
            f"{counted(missing, 'labelled image')} {'has' if missing == 1 else 'have'} "
            f"no ground truth in {show_path(path)}; "
            "scoring the others"
        )
    return out


def _are(n: int, noun: str) -> str:
    """'1 path is', '2 paths are'."""
    return f"{counted(n, noun)} {'is' if n == 1 else 'are'}"


def _key(root: Path, p: str) -> str:
    return os.path.normpath(p if os.path.isabs(p) else os.path.join(root, p))


def _read_truth(path: Path) -> list[tuple[int, str, str]]:
    """(line, path, class) of each row; a byte-order mark (spreadsheets write one) is
    skipped, blank lines too, and a row without both a path and a class is an error."""
    try:
        with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
            reader = csv.reader(fh)
            header = [h.strip() for h in next(reader, [])]
            if header[:2] != ["path", "label"]:
                raise UsageError(
                    f"{show_path(path)}: ground truth needs the columns path,label; "
                    f"found {','.join(header)!r}"
                )
            rows = []
            for row in reader:
                if not any(f.strip() for f in row):
                    continue
                if len(row) < 2 or not row[0] or not row[1]:
                    raise UsageError(f"{show_path(path)}: line {reader.line_num} is not path,label")
                rows.append((reader.line_num, row[0], row[1]))
            if not rows:
                raise UsageError(f"{show_path(path)}: no rows (path,label) after the header")
            return rows
    except FileNotFoundError:
        raise UsageError(
            f"{show_path(path)}: ground-truth file not found "
            "(use --truth folders, none, or a CSV path)"
        ) from None
    except OSError as exc:
        raise UsageError(f"{show_path(path)}: cannot read ground truth ({exc.strerror})") from None


def _score(result: Evaluation, labels: Labels, classes: list[str | None], truth: str) -> None:
    # never empty: a truth CSV has rows (_read_truth), each naming a labelled image
    rows = [i for i, c in enumerate(classes) if c is not None]
    names = sorted({classes[i] for i in rows})  # type: ignore[type-var]
    column = {name: j for j, name in enumerate(names)}
    y_true = np.array([column[classes[i]] for i in rows])  # type: ignore[index]
    ids = sorted(result.sizes)
    y_pred = np.searchsorted(ids, labels.cluster[rows])
    table = metrics.contingency(y_true, y_pred, shape=(len(ids), len(names)))
    mapping = metrics.best_mapping(y_true, y_pred)
    result.truth = truth if truth in ("auto", "folders") else str(truth)
    result.classes = list(names)  # type: ignore[arg-type]
    result.acc = metrics.accuracy(y_true, y_pred)
    result.nmi = metrics.nmi(y_true, y_pred)
    result.ari = metrics.ari(y_true, y_pred)
    result.confusion = table.tolist()
    result.mapping = {ids[r]: names[c] for r, c in mapping.items()}  # type: ignore[misc]
    result.scored = len(rows)
