"""Ctrl-C while a command starts: remembered and acted on at the next step, not raised where it lands.

An exception raised from a signal handler lands in whatever code runs then; where that is a weakref
callback or a ``__del__`` (the import system runs some), Python prints "Exception ignored" and
drops it, and the command carried on as if never interrupted: ``car serve`` came up and served (about
1 start in 40 on a loaded machine). So during the CLI's imports and ``car serve``'s start the
handler only remembers the signal, and ``check`` exits 130 (no traceback, the exit status of any
other Ctrl-C). Only while Python's own handler is in place, on the main thread: a program that
installed its own keeps it. No import of typer or anything heavy: the CLI installs this first.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import Any, NoReturn

__all__ = ["EXIT_INTERRUPTED", "Interrupts", "leave_at_the_next", "leave_now"]

EXIT_INTERRUPTED = 130


class Interrupts:
    """``with Interrupts() as interrupts: ... interrupts.check() ...``; ``seen`` says whether a
    Ctrl-C came. Outside the block, the previous handler is back."""

    def __init__(self) -> None:
        self.seen = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.seen = True

    def install(self) -> Interrupts:
        """Remember Ctrl-C from now on (see the module's text for when)."""
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def restore(self) -> None:
        """The previous handler back."""
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def __enter__(self) -> Interrupts:
        return self.install()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.restore()

    def check(self) -> None:
        """Exit 130 if a Ctrl-C came."""
        if self.seen:
            leave_at_the_next()
            raise SystemExit(EXIT_INTERRUPTED)


def leave_at_the_next() -> None:
    """Once a Ctrl-C is being acted on (the command ends with 130), a second one ends the process
    at once, with the same status. The exit waits for the model's worker thread, still inside
    llama.cpp for up to seconds; a second Ctrl-C then broke that wait with a threading traceback,
    and the interpreter went on to finalize under the running native thread (a segfault)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _leave_now)


def _leave_now(signum: int, frame: FrameType | None) -> None:
    leave_now()


def leave_now() -> NoReturn:
    """End an interrupted command (status 130) without the interpreter's exit: that waits for the
    model's worker thread (seconds inside llama.cpp), and a Ctrl-C in its last steps, after Python
    put the default handler back, killed the process by the signal (status -2). The command has
    closed its engine by now; only the output is flushed."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(EXIT_INTERRUPTED)
