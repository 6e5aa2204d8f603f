"""Step 2b: the decode cache, one uint8 array N×C×S×S per folder and working size.

The array is a memory-mapped ``.npy`` file next to a JSON index of (path, size,
mtime) per file. Training the same folder again reuses it; files that changed,
appeared or vanished are the only ones decoded again. Files that failed are
remembered too, so a broken file is reported again without being re-read.

Writes never leave a torn cache: the array gets a fresh name, the index that
points at it is replaced atomically, and only then is the old array deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import decode as dec
from .atomic import atomic_write_text
from .errors import ImgclusterError, UsageError
from .files import ImageFile, ImageList
from .report import Reporter, show_path

INDEX_VERSION = 1
_ORPHAN_AGE_S = 24 * 3600  # arrays left by killed runs are deleted after a day


@dataclass
class Decoded:
    """The decoded images in ``files`` order (bad files left out) and what was skipped."""

    images: np.ndarray  # N×C×S×S uint8, usually a read-only memory map
    files: list[ImageFile]
    skipped: list[tuple[str, str]]  # (path, reason), in path order
    root: Path
    image_size: int
    channels: int
    reused: int = 0  # rows taken from the cache instead of decoded


def default_cache_dir() -> Path:
    """``$IMGCLUSTER_CACHE``, else ``$XDG_CACHE_HOME/imgcluster``, else ``~/.cache/imgcluster``."""
    if os.environ.get("IMGCLUSTER_CACHE"):
        return Path(os.environ["IMGCLUSTER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base, "imgcluster")


def load_images(
    found: ImageList,
    *,
    image_size: int | None = None,
    max_image_size: int = dec.DEFAULT_MAX_SIZE,
    channels: int | None = None,
    cache_dir: Path | None = None,
    use_cache: bool = True,
    workers: int | None = None,
    strict: bool = False,
    reporter: Reporter | None = None,
) -> Decoded:
    """Decode ``found`` into one array, through the cache unless ``use_cache`` is False.

    ``image_size`` None picks the median shorter side, at most ``max_image_size``; ``channels``
    None picks 1 when every image is grey, else 3. Unreadable files are skipped
    with one warning each, or raise ImgclusterError when ``strict``.
    """
    reporter = reporter or Reporter(quiet=True)
    _check_params(image_size, channels)
    if not found.files:
        raise UsageError(f"{show_path(found.root)}: no image files found")
    store = _Store(cache_dir or default_cache_dir(), found.root) if use_cache else None
    with dec.Workers(len(found.files), workers) as pool:
        probes = _probe_all(found.files, store, pool, reporter)
        good = [f for f in found.files if isinstance(probes[f.rel], dec.Probe)]
        if not good:
            none = _none_of(len(found), "is a readable image", "is not a readable image")
            raise UsageError(f"{show_path(found.root)}: {none}")
        size = image_size or auto_image_size([probes[f.rel] for f in good], max_image_size)  # type: ignore[misc]
        chans = channels or (1 if all(probes[f.rel].grey for f in good) else 3)  # type: ignore[union-attr]
        images, kept, failed, reused = _decode_all(good, size, chans, store, pool, reporter)
    skipped = sorted(
        [(str(f.path), p) for f in found.files if isinstance(p := probes[f.rel], str)]
        + [(str(f.path), r) for f, r in failed]
        + list(found.skipped)
    )
    _report_skipped(skipped, strict, reporter)
    if not kept:
        none = _none_of(len(found), "could be decoded", "could not be decoded")
        raise UsageError(f"{show_path(found.root)}: {none}")
    return Decoded(images, kept, skipped, found.root, size, chans, reused)


def auto_image_size(probes: Sequence[dec.Probe], most: int = dec.DEFAULT_MAX_SIZE) -> int:
    """The median shorter side of the images, between 8 and ``most`` (64) px.

    Benchmark sets are 16-32 px and are kept at their own size; photos are
    thousands of pixels and come down to 64 px, which keeps a 100k-image folder
    at 1.2 GB of RGB bytes while the methods' networks still see shapes.
    """
    sides = sorted(min(p.width, p.height) for p in probes)
    return int(min(most, max(8, sides[len(sides) // 2])))


def _none_of(n: int, does: str, does_not: str) -> str:
    """'none of the 3 files is ...'; a one-file input's 'its one file is not ...' (not
    'none of the 1 files')."""
    return f"its one file {does_not}" if n == 1 else f"none of the {n} files {does}"


def _check_params(image_size: int | None, channels: int | None) -> None:
    if image_size is not None and not 4 <= image_size <= 1024:
        raise UsageError(f"--image-size must be between 4 and 1024 pixels, got {image_size}")
    if channels not in (None, 1, 3):
        raise UsageError(f"channels must be 1 (grey) or 3 (colour), got {channels}")


def _report_skipped(skipped: list[tuple[str, str]], strict: bool, reporter: Reporter) -> None:
    if strict and skipped:
        path, reason = skipped[0]
        extra = f" ({len(skipped) - 1} more)" if len(skipped) > 1 else ""
        raise ImgclusterError(f"{show_path(path)}: {reason}{extra}; stopped because of --strict")
    for path, reason in skipped:
        reporter.warn(f"skipped {show_path(path)}: {reason}")


# -- file state -------------------------------------------------------------------------

Stat = tuple[int, int]  # (size in bytes, mtime in ns), as found by files.find_images


def _stat(f: ImageFile) -> Stat:
    return (f.size, f.mtime_ns)


def _probe_all(
    files: list[ImageFile],
    store: _Store | None,
    pool: dec.Workers,
    reporter: Reporter,
) -> dict[str, dec.Probe | str]:
    """Header facts (grey? size?) per file, reusing the cache's for unchanged files."""
    known = store.read_probes() if store else {}
    out: dict[str, dec.Probe | str] = {}
    todo: list[ImageFile] = []
    for f in files:
        entry = known.get(f.rel)
        if entry is not None and entry[0] == _stat(f):
            out[f.rel] = entry[1]
        else:
            todo.append(f)
    with reporter.task("scanning", total=len(todo)) as bar:
        chunks = pool.chunks([str(f.path) for f in todo])
        done = 0
        for results in pool.map(dec.probe_chunk, chunks):
            for f, result in zip(todo[done : done + len(results)], results, strict=True):
                out[f.rel] = result
            done += len(results)
            bar.advance(len(results))
    if store and todo:
        store.write_probes({f.rel: (_stat(f), out[f.rel]) for f in files})
    return out


def _decode_all(
    files: list[ImageFile],
    size: int,
    channels: int,
    store: _Store | None,
    pool: dec.Workers,
    reporter: Reporter,
) -> tuple[np.ndarray, list[ImageFile], list[tuple[ImageFile, str]], int]:
    """Decode what the cache lacks into a new array; returns (images, kept, failed, reused)."""
    old = store.read_index(size, channels) if store else None
    old_rows = old.rows if old else {}
    reuse = {f.rel: old_rows[f.rel] for f in files if old_rows.get(f.rel, (None,))[0] == _stat(f)}
    todo = [i for i, f in enumerate(files) if f.rel not in reuse]
    if old is not None and not todo:
        kept, failed = _split_reused(files, reuse)
        if [reuse[f.rel][1] for f in kept] == list(range(old.count)):  # the same rows, in order
            return store.open_array(old.array), kept, failed, len(kept)  # type: ignore[union-attr]
    target = store.new_array_path(size, channels) if store else None
    arr = _allocate(target, (len(files), channels, size, size))
    reasons = [""] * len(files)
    if old is not None and reuse:
        _copy_rows(store.open_array(old.array), arr, files, reuse, reasons)  # type: ignore[union-attr]
    with reporter.task("decoding", total=len(todo)) as bar:
        chunks = pool.chunks([str(files[i].path) for i in todo])
        done = 0
        for batch, why in pool.map(dec.decode_chunk, chunks, size, channels):
            rows = todo[done : done + len(why)]
            arr[rows] = batch
            for row, reason in zip(rows, why, strict=True):
                reasons[row] = reason
            done += len(why)
            bar.advance(len(why))
    ok = [i for i, r in enumerate(reasons) if not r]
    kept = [files[i] for i in ok]
    failed = [(files[i], reasons[i]) for i in range(len(files)) if reasons[i]]
    if len(ok) < len(files):
        arr = _compact(arr, ok, target)
    if store is not None and target is not None:
        arr = store.commit(arr, target, files, reasons, size, channels, old)
    return arr, kept, failed, len(files) - len(todo)


def _split_reused(
    files: list[ImageFile], reuse: dict[str, tuple[Stat, int, str]]
) -> tuple[list[ImageFile], list[tuple[ImageFile, str]]]:
    kept = [f for f in files if reuse[f.rel][1] >= 0]
    failed = [(f, reuse[f.rel][2]) for f in files if reuse[f.rel][1] < 0]
    return kept, failed


def _copy_rows(
    src: np.ndarray,
    dst: np.ndarray,
    files: list[ImageFile],
    reuse: dict[str, tuple[Stat, int, str]],
    reasons: list[str],
) -> None:
    """Copy the cached rows of unchanged files, and their remembered failures."""
    pairs = []
    for i, f in enumerate(files):
        if f.rel in reuse:
            _, row, reason = reuse[f.rel]
            if row >= 0:
                pairs.append((i, row))
            else:
                reasons[i] = reason
    for start in range(0, len(pairs), 4096):
        block = np.array(pairs[start : start + 4096])
        dst[block[:, 0]] = src[block[:, 1]]


def _allocate(path: Path | None, shape: tuple[int, ...]) -> np.ndarray:
    if path is None:
        return np.zeros(shape, dtype=np.uint8)
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)


def _compact(arr: np.ndarray, rows: list[int], path: Path | None) -> np.ndarray:
    """Drop the rows of failed files, in blocks so a big memory map never sits in RAM."""
    if path is None:
        return arr[rows]
    tmp = path.with_name(path.name + ".compact")
    out = np.lib.format.open_memmap(
        tmp, mode="w+", dtype=np.uint8, shape=(len(rows), *arr.shape[1:])
    )
    for start in range(0, len(rows), 4096):
        block = rows[start : start + 4096]
        out[start : start + len(block)] = arr[block]
    out.flush()
    del arr
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r+")


# -- the cache folder ------------------------------------------------------------------


@dataclass
class _Index:
    array: str
    count: int
    rows: dict[str, tuple[Stat, int, str]]  # rel -> (stat, row or -1, failure reason)


class _Store:
    """One cache folder per image root: probes.json, index-S-C.json, images-S-C-*.npy."""

    def __init__(self, base: Path, root: Path) -> None:
        digest = hashlib.sha256(os.fsencode(str(root))).hexdigest()[:16]
        self.dir = Path(base, f"{digest}-{_safe_name(root.name)}")
        self.root = root

    def _ensure(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(
                f"{show_path(self.dir)}: cannot create the cache folder ({exc.strerror}); "
                "set IMGCLUSTER_CACHE or pass --no-cache"
            ) from None

    def read_probes(self) -> dict[str, tuple[Stat, dec.Probe | str]]:
        data = _read_json(self.dir / "probes.json")
        if not data or data.get("version") != INDEX_VERSION:
            return {}
        out: dict[str, tuple[Stat, dec.Probe | str]] = {}
        for rel, size, mtime, grey, w, h, reason in data["files"]:
            out[rel] = ((size, mtime), reason or dec.Probe(bool(grey), w, h))
        return out

    def write_probes(self, entries: dict[str, tuple[Stat, dec.Probe | str]]) -> None:
        self._ensure()
        rows = []
        for rel, ((size, mtime), p) in entries.items():
            if isinstance(p, str):
                rows.append([rel, size, mtime, False, 0, 0, p])
            else:
                rows.append([rel, size, mtime, p.grey, p.width, p.height, ""])
        doc = {"version": INDEX_VERSION, "root": str(self.root), "files": rows}
        atomic_write_text(self.dir / "probes.json", json.dumps(doc))

    def read_index(self, size: int, channels: int) -> _Index | None:
        data = _read_json(self.dir / f"index-{size}-{channels}.json")
        if not data or data.get("version") != INDEX_VERSION:
            return None
        if not (self.dir / data["array"]).is_file():
            return None
        rows = {rel: ((sz, mt), row, reason) for rel, sz, mt, row, reason in data["files"]}
        return _Index(data["array"], int(data["count"]), rows)

    def open_array(self, name: str) -> np.ndarray:
        return np.load(self.dir / name, mmap_mode="r")

    def new_array_path(self, size: int, channels: int) -> Path:
        self._ensure()
        self._remove_orphans()
        return self.dir / f"images-{size}-{channels}-{secrets.token_hex(4)}.npy"

    def commit(
        self,
        arr: np.ndarray,
        path: Path,
        files: list[ImageFile],
        reasons: list[str],
        size: int,
        channels: int,
        old: _Index | None,
    ) -> np.ndarray:
        """Point the index at the new array, then delete the array it replaced."""
        if isinstance(arr, np.memmap):
            arr.flush()
        rows, row = [], 0
        for f, reason in zip(files, reasons, strict=True):
            rows.append([f.rel, f.size, f.mtime_ns, -1 if reason else row, reason])
            row += 0 if reason else 1
        doc = {
            "version": INDEX_VERSION,
            "root": str(self.root),
            "array": path.name,
            "count": row,
            "files": rows,
        }
        atomic_write_text(self.dir / f"index-{size}-{channels}.json", json.dumps(doc))
        if old is not None and old.array != path.name:
            (self.dir / old.array).unlink(missing_ok=True)
        del arr
        return np.load(path, mmap_mode="r")

    def _remove_orphans(self) -> None:
        now = time.time()
        for p in self.dir.glob("images-*.npy*"):
            try:
                if now - p.stat().st_mtime > _ORPHAN_AGE_S and not self._referenced(p.name):
                    p.unlink()
            except OSError:
                pass

    def _referenced(self, name: str) -> bool:
        for index in self.dir.glob("index-*.json"):
            data = _read_json(index)
            if data and data.get("array") == name:
                return True
        return False


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _safe_name(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return keep[:40] or "root"
