"""``export``: sort images into ``DIR/cluster_NN/`` folders and write the labels there.

Nothing is ever overwritten: a name already taken gets a ``-1``, ``-2``... suffix,
unless it already holds this very image (the same bytes for ``copy``, a link to it for
``link``/``hardlink``, the file itself for ``move``): then the image counts as already there,
so an export re-run after a kill, or repeated into the same folder, places only what is
missing instead of doubling the folder. A ``move`` notes each source and its target in
``TO/.imgcluster-moves.jsonl`` before moving it (removed once the labels file is written), so a
re-run after a kill, or of a finished move export, finds the images it already moved instead
of reporting their sources as gone.
Files appear under their final name only whole (copies are written to a
temporary name first), and ``move`` renames each file in one atomic step on the
same file system, so a killed export leaves every image either in its source or
in its target, whole. Across file systems a move is copy + rename + delete of
the source; a kill between the last two leaves the image in both places.
"""

from __future__ import annotations

import ctypes
import errno
import filecmp
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import atomic_open
from .errors import UsageError
from .labels import COLUMNS, Labels, export_placements, read_labels
from .report import Reporter, show_path

MODES = ("copy", "link", "hardlink", "move")
FORMATS = ("csv", "json")


@dataclass
class ExportResult:
    to: Path
    labels_file: Path
    exported: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    already_there: int = 0  # of ``exported``: found in place, from an earlier export


def export(
    labels_file: Path,
    to: Path,
    *,
    mode: str = "copy",
    fmt: str = "csv",
    root: Path | None = None,
    sheets: bool = False,
    reporter: Reporter | None = None,
) -> ExportResult:
    """Put every labelled image into ``to/cluster_NN/`` by ``mode`` and write the labels there
    (and contact sheets in ``to/sheets/`` when ``sheets``)."""
    if mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if fmt not in FORMATS:
        raise UsageError(f"--format must be csv or json, got {fmt!r}")
    reporter = reporter or Reporter(quiet=True)
    labels = read_labels(Path(labels_file), root)
    to = Path(to)
    _make_dir(to)
    width = max(2, len(str(int(labels.cluster.max(initial=0)))))
    rows: list[tuple[str, int, float, float, str]] = []
    skipped: list[tuple[str, str]] = []
    taken: set[Path] = set()  # targets this export has filled: two sources never share one
    reused = 0
    moves = MoveLog(to) if mode == "move" else None
    with reporter.task(f"exporting ({mode})", total=len(labels)) as bar:
        for i, name in enumerate(labels.paths):
            src = labels.resolve(name)
            folder = to / f"cluster_{labels.cluster[i]:0{width}d}"
            try:
                placed, found = place(src, folder, mode, taken, moves)
            except OSError as exc:
                reason = exc.strerror or str(exc)
                skipped.append((str(src), reason))
                reporter.warn(f"skipped {show_path(src)}: {reason}")
            else:
                reused += found
                rows.append(
                    (
                        placed.relative_to(to).as_posix(),
                        int(labels.cluster[i]),
                        float(labels.confidence[i]),
                        float(labels.distance[i]),
                        str(src.absolute()),
                    )
                )
            bar.advance()
    out = _write_export_labels(to, rows, fmt)
    if moves is not None:
        moves.close()
    if sheets:  # drawn from the exported copies: a move's sources are gone
        from .sheets import write_sheets

        write_sheets(_placed_labels(to, rows), to / "sheets", reporter=reporter)
    return ExportResult(to, out, len(rows), skipped, reused)


def place(
    src: Path,
    folder: Path,
    mode: str,
    taken: set[Path] | None = None,
    moves: MoveLog | None = None,
) -> tuple[Path, bool]:
    """Put ``src`` into ``folder`` under its own name or the first free suffixed one; return
    the target and whether ``src`` was already there (a name in ``taken`` is never reused,
    and the target is added to it). ``moves`` records a move before it happens and knows
    where earlier runs moved their sources."""
    taken = set() if taken is None else taken
    earlier = moves.earlier(src, taken) if moves is not None else None
    if earlier is not None:
        taken.add(earlier)
        return earlier, True
    if not src.is_file():
        raise OSError(errno.ENOENT, "not found" if not src.exists() else "not a regular file")
    folder.mkdir(parents=True, exist_ok=True)
    for target in _candidates(folder, src.name):
        if not os.path.lexists(target):
            break
        if target not in taken and _holds(target, src, mode):
            taken.add(target)
            return target, True
    tmp = _staged_copy(src, folder) if mode == "copy" else None
    try:
        for target in _candidates(folder, src.name):
            if moves is not None:
                moves.note(src, target)
            try:
                _put(src, tmp, target, mode)
                taken.add(target)
                return target, False
            except FileExistsError:
                continue
        raise OSError(errno.EEXIST, "no free name")  # pragma: no cover - 10^6 collisions
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


class MoveLog:
    """Where ``move`` exports into ``to`` put their sources: the labels files of finished
    ones, and ``to/.imgcluster-moves.jsonl``, a line per move written before the move (so a
    kill at any point leaves the last line of a source naming where it is, or was going)."""

    NAME = ".imgcluster-moves.jsonl"

    def __init__(self, to: Path) -> None:
        self.to = to
        self.path = to / self.NAME
        self.known: dict[str, Path] = {}
        found = [*to.glob("labels*.csv"), *to.glob("labels*.json")]
        for labels in sorted(found, key=lambda f: f.stat().st_mtime):  # the newest says last
            for src, placed in export_placements(labels).items():
                self.known[src] = to / placed
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                    self.known[entry["source"]] = to / entry["target"]
                except (ValueError, KeyError, TypeError):  # a line cut short by a kill
                    continue
        self.fh = None

    def earlier(self, src: Path, taken: set[Path]) -> Path | None:
        """Where an earlier export put ``src``, if its image is there and ``src`` is gone,
        or still there as the same file or bytes (a move across file systems killed before
        deleting it, or an earlier copy or hardlink export): then ``src`` is deleted, as the
        move would have."""
        target = self.known.get(str(src.absolute()))
        if target is None or target in taken or target.is_symlink() or not target.is_file():
            return None
        if os.path.lexists(src):
            if src.is_symlink() or not src.is_file() or src.resolve() == target.resolve():
                return None
            if not (os.path.samefile(src, target) or _same_bytes(src, target)):
                return None
            src.unlink()  # the image is whole at its target: finish the move
        return target

    def note(self, src: Path, target: Path) -> None:
        if self.fh is None:
            self.fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
        rel = target.relative_to(self.to).as_posix()
        self.fh.write(json.dumps({"source": str(src.absolute()), "target": rel}) + "\n")
        self.fh.flush()  # in the OS's hands: a killed process cannot lose it

    def close(self) -> None:
        """The labels file is written: it now says where everything went."""
        if self.fh is not None:
            self.fh.close()
        self.path.unlink(missing_ok=True)


def _same_bytes(a: Path, b: Path) -> bool:
    try:
        return filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def _placed_labels(to: Path, rows: list[tuple[str, int, float, float, str]]) -> Labels:
    return Labels(
        [r[0] for r in rows],
        np.array([r[1] for r in rows], dtype=np.int64),
        np.array([r[2] for r in rows], dtype=np.float32),
        np.array([r[3] for r in rows], dtype=np.float32),
        to,
    )


def _holds(target: Path, src: Path, mode: str) -> bool:
    """Whether the existing ``target`` already is what ``mode`` would make of ``src``."""
    try:
        if mode == "link":
            return target.is_symlink() and os.readlink(target) == str(src.absolute())
        if target.is_symlink():
            return False
        if mode == "move":  # the source itself, already sorted
            return target.parent.resolve() / target.name == src.parent.resolve() / src.name
        if mode == "hardlink":
            return os.path.samefile(target, src)
        return _same_bytes(target, src)
    except OSError:  # unreadable: treat the name as taken by something else
        return False


def _put(src: Path, tmp: Path | None, target: Path, mode: str) -> None:
    """One attempt at ``target``; FileExistsError if it is taken."""
    if mode == "copy":
        rename_noreplace(tmp, target)  # type: ignore[arg-type]
    elif mode == "link":
        os.symlink(src.absolute(), target)
    elif mode == "hardlink":
        os.link(src, target)
    else:
        _move(src, target)


def _move(src: Path, target: Path) -> None:
    try:
        rename_noreplace(src, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        tmp = _staged_copy(src, target.parent)  # another file system: copy, then delete
        try:
            rename_noreplace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        src.unlink()


def _staged_copy(src: Path, folder: Path) -> Path:
    """A full, synced copy of ``src`` under a hidden temporary name in ``folder``."""
    fd, name = tempfile.mkstemp(prefix=".imgcluster-", suffix=".part", dir=folder)
    os.close(fd)
    try:
        shutil.copy2(src, name)
        with open(name, "rb") as fh:
            os.fsync(fh.fileno())
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


def _candidates(folder: Path, name: str) -> Iterator[Path]:
    stem, ext = os.path.splitext(name)
    yield folder / name
    for n in range(1, 1_000_000):
        yield folder / f"{stem}-{n}{ext}"


_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
_AT_FDCWD, _RENAME_NOREPLACE = -100, 1


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` atomically, failing with FileExistsError if ``dst`` exists.

    Uses Linux's renameat2(RENAME_NOREPLACE); elsewhere (or on file systems
    without it) checks first, which leaves a tiny race with other writers.
    """
    if _renameat2 is not None:
        rc = _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _make_dir(to: Path) -> None:
    try:
        to.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"{show_path(to)}: cannot create the export folder ({exc.strerror})"
        ) from None
    if not os.access(to, os.W_OK):
        raise UsageError(f"{show_path(to)}: the export folder is not writable")


def _write_export_labels(
    to: Path, rows: list[tuple[str, int, float, float, str]], fmt: str
) -> Path:
    """``to/labels.csv`` (or .json; a free suffixed name if taken, unless a taken one already
    holds these very labels) with a ``source`` column."""
    import csv
    import io
    import json

    columns = (*COLUMNS, "source")
    text = io.StringIO(newline="")
    if fmt == "json":
        json.dump([dict(zip(columns, r, strict=True)) for r in rows], text, indent=1)
        text.write("\n")
    else:
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows((p, c, f"{f:.6g}", f"{d:.6g}", s) for p, c, f, d, s in rows)
    data = text.getvalue().encode("utf-8", errors="surrogateescape")
    for target in _candidates(to, f"labels.{fmt}"):
        if not target.exists():
            break
        if target.is_file() and target.stat().st_size == len(data) and target.read_bytes() == data:
            return target
    with atomic_open(target, "wb") as fh:
        fh.write(data)
    return target
