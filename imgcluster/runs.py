"""The run folder: where ``train`` puts the model, the labels, the config and the log.

    runs/<folder>-<method>/
        model.safetensors, model.json   the model (see model.py)
        labels.csv                      path,cluster,confidence,distance per training image
        embeddings.npy                  float32 N×D, rows aligned with labels.csv
        config.toml                     every setting, resolved, so the run can be repeated
        train.log.jsonl                 one JSON object per epoch / phase
        checkpoint.safetensors          a run stopped part-way: what --resume goes on from

Every file is written under a temporary name and renamed, so a killed run never
leaves a half-written file under a final name. An existing run is never
overwritten unless asked (``force``), and even then the old one is only deleted
once the new one is complete.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from .atomic import atomic_path, atomic_write_text
from .errors import UsageError
from .report import show_path

CHECKPOINT = "checkpoint.safetensors"


class RunFolder:
    """A run folder being written; ``finish`` marks it complete."""

    def __init__(self, path: Path, replaced: Path | None = None) -> None:
        self.path = path
        self._replaced = replaced
        self._log: list[str] = []
        self._lock = RunLock(path)  # a second process on the same folder is refused

    @classmethod
    def create(cls, out: Path | None, runs_dir: Path, name: str, force: bool) -> RunFolder:
        """Make the folder: ``out`` if given, else ``runs_dir/name`` with a free numbered suffix."""
        if out is None:
            return cls(_new_numbered(Path(runs_dir), name))
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise UsageError(f"{show_path(out)}: exists and is not a folder")
        if out.is_dir() and any(out.iterdir()):
            if not force:
                raise UsageError(
                    f"{show_path(out)}: already exists; pass --force to replace it, "
                    "or choose another --out"
                )
            # kept aside until the new run is complete, so a failed run loses nothing
            old = RunLock(out)  # not while another process is using it
            aside = out.with_name(f".{out.name}.replaced-{secrets.token_hex(3)}")
            os.rename(out, aside)
            old.release(aside / RunLock.NAME)
            _mkdir(out)
            return cls(out, aside)
        _mkdir(out)
        return cls(out)

    @classmethod
    def reopen(cls, path: Path) -> RunFolder:
        """An unfinished run folder, to resume: its log is kept and extended."""
        path = Path(path)
        if not (path / "config.toml").is_file():
            raise UsageError(f"{show_path(path)}: not a run folder (no config.toml)")
        run = cls(path)
        log = path / "train.log.jsonl"
        if log.is_file():
            run._log = [
                line for line in log.read_text(encoding="utf-8").splitlines() if line.strip()
            ]
        return run

    def read_config(self) -> dict[str, Any]:
        try:
            with open(self.path / "config.toml", "rb") as fh:
                return tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise UsageError(
                f"{show_path(self.path / 'config.toml')}: unreadable ({exc})"
            ) from None

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_text(self.path / "config.toml", tomli_w.dumps(_toml_safe(config)))

    def log(self, record: dict[str, Any]) -> None:
        """Add a line to train.log.jsonl; the file is rewritten whole, atomically."""
        self._log.append(json.dumps(record, default=_jsonable))
        atomic_write_text(self.path / "train.log.jsonl", "\n".join(self._log) + "\n")

    def write_embeddings(self, z: np.ndarray) -> None:
        with atomic_path(self.path / "embeddings.npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(z, dtype=np.float32))

    def release(self) -> None:
        """Unlock the folder and leave it as it is (a resume that failed before training)."""
        self._lock.release()

    def finish(self) -> None:
        """The run is complete: delete the run it replaced, if any, and unlock."""
        if self._replaced is not None:
            shutil.rmtree(self._replaced, ignore_errors=True)
            self._replaced = None
        self.release()

    def keep_partial(self) -> None:
        """The run stopped with a checkpoint: keep it to resume; the run it replaces goes."""
        self.finish()

    def abandon(self) -> None:
        """The run failed: remove what it wrote and put back the run it was replacing."""
        self.release()
        shutil.rmtree(self.path, ignore_errors=True)
        if self._replaced is not None:
            os.rename(self._replaced, self.path)
            self._replaced = None


class RunLock:
    """An exclusive lock on a run folder (``flock`` on FOLDER/.lock, holding the owner's pid).

    The kernel drops it when the process ends, even when it is killed, so a stale lock
    never blocks a later run.
    """

    NAME = ".lock"

    def __init__(self, folder: Path) -> None:
        path = Path(folder) / self.NAME
        self._path: Path | None = path
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(self._fd, 32).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            self._fd = None
            raise UsageError(
                f"{show_path(folder)}: in use by another imgcluster process (pid {owner}); "
                "wait for it to finish, or choose another --out"
            ) from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self, moved_to: Path | None = None) -> None:
        """Unlock and remove the lock file (at ``moved_to`` if its folder was renamed)."""
        if self._fd is None:
            return
        (moved_to or self._path).unlink(missing_ok=True)  # type: ignore[union-attr]
        os.close(self._fd)  # closing drops the flock
        self._fd = None


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{secrets.token_hex(3)}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise UsageError(
            f"{show_path(path)}: cannot write the run folder ({exc.strerror})"
        ) from None


def _new_numbered(runs_dir: Path, name: str) -> Path:
    """``runs_dir/name``, or ``name-2``, ``name-3``...: the first that can be created anew."""
    _mkdir(runs_dir)
    for n in range(1, 10_000):
        path = runs_dir / (name if n == 1 else f"{name}-{n}")
        try:
            path.mkdir()  # atomic: two runs started together never share a folder
            return path
        except FileExistsError:
            continue
    raise UsageError(f"{show_path(runs_dir)}: too many runs named {name}; pass --out")


def _toml_safe(value: Any) -> Any:
    """TOML has no null: drop None values; paths and tuples become strings and lists."""
    if isinstance(value, dict):
        return {str(k): _toml_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_toml_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def unfinished(folder: Path, missing: str) -> UsageError:
    """The error for a folder that is not a finished run folder (``missing`` is not in it),
    saying how to go on when it is a run stopped part-way (its checkpoint is there)."""
    msg = f"{show_path(folder)}: not a finished run folder (no {missing})"
    if (folder / CHECKPOINT).is_file():
        msg += f"; it stopped part-way: {continue_with(show_path(folder))}"
    return UsageError(msg)


def continue_with(folder: Path | str) -> str:
    """How to go on with a run stopped part-way."""
    return f"continue with: imgcluster train --resume {folder}"


def run_name(root: Path, method: str) -> str:
    base = "".join(c if c.isalnum() or c in "-_." else "_" for c in root.name) or "images"
    return f"{base}-{method}"
