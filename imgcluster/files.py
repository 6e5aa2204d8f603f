"""Step 1: find the image files named by files, folders and glob patterns.

Folders are walked recursively, hidden files and folders are skipped, and so are
folders imgcluster wrote met inside an input: run folders (their contact sheets
are not photos: ``train .`` run twice in a photo folder would otherwise learn
from the first run's ``runs/``) and exports whose every source image still
exists (copies or links of images found elsewhere; a ``move`` export holds the
only copies and is walked); symbolic links are followed without looping, the same
file (device and inode) reached twice is listed once, and the result is sorted by
the path relative to one common root so every run sees the same order. One
``stat`` per file: its size and mtime are kept for the decode cache.
"""

from __future__ import annotations

import glob
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError
from .report import counted, show_path
from .runs import CHECKPOINT

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class ImageFile:
    """One image: ``path`` as the user named it (opens from the current folder),
    ``rel``, its name relative to the root (posix), and its size and mtime."""

    path: str
    rel: str
    size: int
    mtime_ns: int


@dataclass
class ImageList:
    """The images found under ``root``, in order, and the paths skipped while looking."""

    root: Path
    files: list[ImageFile]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # folders imgcluster wrote (run, export)

    def __len__(self) -> int:
        return len(self.files)

    def left_out_note(self) -> str | None:
        """One line saying which folders the walk left out, if any."""
        if not self.left_out:
            return None
        n = len(self.left_out)
        first = show_path(os.path.normpath(self.left_out[0]))
        return (
            f"left out {counted(n, 'folder')} imgcluster wrote inside the input (runs, exports of "
            f"images still in place; e.g. {first}); name one to use its images"
        )


def is_run_folder(path: str) -> bool:
    """A folder ``train`` wrote (or is writing): its config.toml beside a model or checkpoint."""
    return os.path.isfile(os.path.join(path, "config.toml")) and any(
        os.path.isfile(os.path.join(path, name)) for name in ("model.json", CHECKPOINT)
    )


def is_copied_export(path: str) -> bool:
    """A folder ``export`` wrote (its labels.csv or labels.json with a ``source`` column)
    whose every source image still exists: it only holds copies or links of them."""
    from .labels import export_sources  # only for folders met in a walk

    sources = export_sources(Path(path))
    return bool(sources) and all(os.path.exists(s) for s in sources)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def find_images(inputs: Sequence[str | Path]) -> ImageList:
    """Find the images named by ``inputs`` (files, folders, globs).

    Paths that look like images but are not usable (broken links, special
    files, unknown extensions named explicitly, unreadable folders) are listed
    in ``skipped`` for the caller to report. Raises UsageError when an input
    does not exist or a glob matches nothing.
    """
    if not inputs:
        raise UsageError("no images given: name a folder, files or a glob pattern")
    starts = [p for item in map(str, inputs) for p in _expand(item)]
    root = _common_root(starts)
    walk = _Walk()
    for start in starts:
        rel = os.path.relpath(os.path.abspath(start), root)
        walk.start(start, "" if rel == "." else rel.replace(os.sep, "/"))
    files = sorted(walk.found.values(), key=lambda f: f.rel)
    return ImageList(root=root, files=files, skipped=walk.skipped, left_out=walk.left_out)


def _expand(item: str) -> list[str]:
    """One command-line input as paths: the glob's matches, or the path itself."""
    if _GLOB_CHARS & set(item) and not os.path.lexists(item):
        matches = sorted(glob.glob(item, recursive=True))
        if not matches:
            raise UsageError(f"{show_path(item)}: the pattern matches no file")
        return [os.path.normpath(m) for m in matches]
    if not os.path.lexists(item):
        raise UsageError(f"{show_path(item)}: no such file or folder")
    return [os.path.normpath(item)]


def _common_root(starts: list[str]) -> Path:
    """The folder the relative paths are taken from: one input folder, else the common parent."""
    absolute = [os.path.abspath(p) for p in starts]
    if len(absolute) == 1 and os.path.isdir(absolute[0]):
        return Path(absolute[0])
    folders = [p if os.path.isdir(p) else os.path.dirname(p) for p in absolute]
    return Path(os.path.commonpath(folders))


class _Walk:
    """Collects image files, remembering visited folders and files by (device, inode)."""

    def __init__(self) -> None:
        self.found: dict[tuple[int, int], ImageFile] = {}
        self.skipped: list[tuple[str, str]] = []
        self.left_out: list[str] = []
        self._dirs: set[tuple[int, int]] = set()

    def start(self, path: str, rel: str) -> None:
        try:
            st = os.stat(path)
        except OSError:
            self.skipped.append((path, "broken symbolic link"))
            return
        if stat.S_ISDIR(st.st_mode):
            self._walk(path, f"{rel}/" if rel else "", st)
        elif is_image_name(path):
            self._add(path, rel, st)
        else:
            self.skipped.append((path, "not an image file name (unknown extension)"))

    def _add(self, path: str, rel: str, st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device named *.jpg would block a reader
            self.skipped.append((path, "not a regular file"))
            return
        key = (st.st_dev, st.st_ino)
        if key not in self.found:
            self.found[key] = ImageFile(path, rel, st.st_size, st.st_mtime_ns)

    def _walk(self, top: str, rel: str, st: os.stat_result) -> None:
        stack = [(top, rel, st)]
        while stack:
            folder, prefix, fst = stack.pop()
            if (fst.st_dev, fst.st_ino) in self._dirs:  # a link back to a folder already walked
                continue
            self._dirs.add((fst.st_dev, fst.st_ino))
            subdirs = [(p, f"{prefix}{name}/", s) for name, p, s in self._list(folder, prefix)]
            stack.extend(reversed(subdirs))

    def _list(self, folder: str, prefix: str) -> Iterator[tuple[str, str, os.stat_result]]:
        """Add the images in ``folder``; yield its visible sub-folders (name, path, stat)."""
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            self.skipped.append((folder, f"cannot list folder ({exc.strerror})"))
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            is_image = is_image_name(entry.name)
            try:
                # other files are never stat-ed: is_dir() reads the folder listing's file type
                if not is_image and not entry.is_dir():
                    continue
                st = entry.stat()  # follows symbolic links
            except OSError:
                if is_image:
                    self.skipped.append((entry.path, "broken symbolic link"))
                continue
            if stat.S_ISDIR(st.st_mode):
                # a named input folder is never left out
                if is_run_folder(entry.path) or is_copied_export(entry.path):
                    self.left_out.append(entry.path)
                else:
                    yield entry.name, entry.path, st
            else:
                self._add(entry.path, prefix + entry.name, st)
