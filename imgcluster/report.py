"""Progress bars, warnings and notes on stderr; results go to stdout elsewhere.

Every step takes an optional ``Reporter``; the library default is silent so that
importing code gets no terminal output it did not ask for.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


def show_path(path: object) -> str:
    """A path as one printable line: control characters and undecodable bytes escaped."""
    text = str(path)
    out = []
    for ch in text:
        if ch.isprintable() and not 0xDC80 <= ord(ch) <= 0xDCFF:
            out.append(ch)
        elif 0xDC80 <= ord(ch) <= 0xDCFF:  # a raw byte kept by surrogateescape
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """'1 image', '3 images': one-image clusters, single-file assigns and K = 1 do happen."""
    return f"{n} {noun}" if n == 1 else f"{n} {plural or noun + 's'}"


class Task:
    """One progress bar; ``advance`` moves it and ``info`` sets the text after it."""

    def __init__(self, progress: Progress | None, task_id: int | None) -> None:
        self._progress = progress
        self._id = task_id

    def advance(self, n: float = 1) -> None:
        if self._progress is not None and self._id is not None:
            self._progress.advance(self._id, n)

    def info(self, text: str) -> None:
        if self._progress is not None and self._id is not None:
            self._progress.update(self._id, info=text)


class Reporter:
    """Writes progress, warnings and notes to stderr, or nothing when quiet."""

    def __init__(self, quiet: bool = False, console: Console | None = None) -> None:
        self.quiet = quiet
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        self.warnings: list[str] = []
        self._progress: Progress | None = None

    def warn(self, message: str) -> None:
        """A one-line warning; kept in ``warnings`` and printed unless quiet."""
        self.warnings.append(message)
        if not self.quiet:
            self.console.print(f"warning: {message}", markup=False, style="yellow")

    def note(self, message: str) -> None:
        """An informational line on stderr (suppressed by quiet)."""
        if not self.quiet:
            self.console.print(message, markup=False)

    @contextmanager
    def task(self, description: str, total: float | None) -> Iterator[Task]:
        """A progress bar for one phase; nested phases share one live display."""
        if self.quiet or total == 0:  # nothing to show (e.g. everything came from the cache)
            yield Task(None, None)
            return
        outer = self._progress is None
        if outer:
            self._progress = _new_progress(self.console)
            self._progress.start()
        progress = self._progress
        task_id = progress.add_task(description, total=total, info="")
        try:
            yield Task(progress, task_id)
        finally:
            if outer:
                progress.stop()
                self._progress = None
            else:
                progress.remove_task(task_id)


class _RateColumn(ProgressColumn):
    """Items per second, the figure that tells whether decoding or training is slow."""

    def render(self, task) -> Text:  # type: ignore[no-untyped-def]
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f}/s")


def _new_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
    )
