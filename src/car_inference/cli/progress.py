"""Rich progress bars for `car models pull` and `car models upgrade`, drawn on stderr (stdout keeps
the summary and ``--json``): one bar per file (or Ollama layer) with size, speed and time left."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from ..runtimes.ollama import OllamaProgress

__all__ = ["PullBars"]


class PullBars:
    """Implements ``catalog.pull.PullProgress`` and takes Ollama's progress lines. Where the console
    is not a terminal (a log, CI) there are no bars: one line per finished file instead."""

    def __init__(self, console: Console, enabled: bool = True) -> None:
        self._console = console
        self._present: set[str] = set()  # files complete on disk when their pull started
        self._lines = enabled and not console.is_terminal
        enabled = enabled and console.is_terminal
        self._progress = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
        )
        self._tasks: dict[str, TaskID] = {}
        self._status: TaskID | None = None

    def __enter__(self) -> PullBars:
        self._progress.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.stop()

    # --- Hugging Face files (catalog.pull.PullProgress) --------------------------------------------

    def file_started(self, path: str, total: int | None, done: int) -> None:
        self._tasks[path] = self._progress.add_task(path, total=total, completed=done)
        if total is not None and done >= total:
            self._present.add(path)

    def advance(self, path: str, n: int) -> None:
        self._progress.advance(self._tasks[path], n)

    def file_finished(self, path: str, downloaded: int) -> None:
        task = self._tasks[path]
        total = self._progress.tasks[task].total
        if total is not None:
            self._progress.update(task, completed=total)
        if self._lines:
            size = f"{total / 1e6:,.1f} MB" if total is not None else "size unknown"
            # A file already in the cache is not read again: "verified" said what did not happen.
            state = "already there" if path in self._present and not downloaded else "verified"
            self._console.print(
                f"  {path}: {size}, {downloaded / 1e6:,.1f} MB downloaded, {state}", markup=False
            )

    # --- Ollama layers ----------------------------------------------------------------------------

    def ollama(self, event: OllamaProgress) -> None:
        if self._lines and (event.digest is None or event.completed == event.total):
            done = f" ({(event.total or 0) / 1e6:,.1f} MB)" if event.digest else ""
            self._console.print(f"  {event.status}{done}", markup=False)
        if event.digest is None:
            if self._status is None:
                self._status = self._progress.add_task(event.status, total=None)
            self._progress.update(self._status, description=event.status)
            return
        task = self._tasks.get(event.digest)
        if task is None:
            task = self._tasks[event.digest] = self._progress.add_task(event.status, total=event.total)
        self._progress.update(task, total=event.total, completed=event.completed or 0)
