"""Outcome and spend records written after the answer, off the request path.

Recording one answer is a handful of SQLite statements plus a commit; the commit alone (WAL page
writes) costs about 135 µs here, more than a fast upstream takes to answer. So the engine queues
the writes and runs them later, in the order they were made, each write in its own savepoint of a
``batch()`` transaction so that one failing write is undone alone and the others commit. Reads
that must see them (feedback, reports, export, close) call ``flush()``, which runs whatever is
still queued right there. Routing reads the tracker's in-memory mirror, updated by the same calls;
circuit breakers stay synchronous because the very next attempt depends on them.

Where the writes run:
- on the event loop by default: a loop turn after the answer, ``chunk`` records per turn, so that
  a request arriving meanwhile waits for one chunk, not the queue;
- without a loop (a synchronous caller), at once;
- on a writer thread of their own once ``start_writer()`` is called, as ``car serve`` does, or,
  with ``thread_on_loop`` (the engine's), from the first record submitted on an event loop (a
  library caller's application): a state.db write-locked by another process for 4 s (a CLI
  command, another program on the same home) stalled that caller's whole event loop for 2.9 s
  while a record waited for the lock, where the writer thread waits for it alone. The thread: the
  first queued record wakes it, it waits ``delay_s`` for others to share the commit, and SQLite
  does its work (pages, WAL checkpoints and their fsync) without the GIL, so the loop keeps
  serving. On the server benchmark this halved the requests slowed by record writes (p99 +8.7 ->
  +6.4 ms) at the same p50.

What the writer trades: a crash loses at most the last ``delay_s`` of records (the database itself
stays consistent: every commit is atomic), and spend recorded in that window is not yet counted by
a limit check in another process.

When the store cannot keep up (a PostgreSQL far away, a fleet whose counter writes take turns
under one lock), records wait here: learning, spend and traces lag behind the answers, and the
queue holds their requests in memory. ``pending`` and ``lag_s`` say so (the health report's
``state``, ``/metrics``), and the writer warns once the oldest waiting record is ``warn_after_s``
old, and again when it has caught up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

__all__ = ["Bookkeeper"]

log = logging.getLogger("car_inference.engine")

WRITER_BATCH = 256  # records per commit of the writer thread at most
PAUSE_EVERY_S = 0.001  # the writer thread lets go of the GIL this often (see Bookkeeper.flush)


class Bookkeeper:
    def __init__(
        self,
        batch: Callable[[], AbstractContextManager[Any]] | None = None,
        *,
        delay_s: float = 0.0,
        chunk: int = 8,
        warn_after_s: float = 30.0,
        pause: bool = False,
        thread_on_loop: bool = False,
    ) -> None:
        """``batch``: the transaction a group of writes runs in (none: each write on its own);
        ``delay_s``: how long the writer thread waits for more records to share its commit;
        ``chunk``: how many records one loop turn writes; ``warn_after_s``: how late the oldest
        waiting record may be before the writer warns that the store is not keeping up;
        ``pause``: the writer thread lets go of the GIL every ``PAUSE_EVERY_S`` of records (``flush``);
        ``thread_on_loop``: the first record submitted on an event loop starts the writer thread."""
        # (submitted at, by time.monotonic(); the write and its arguments)
        self._pending: deque[tuple[float, Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = deque()
        self._lock = threading.Lock()
        self._scheduled: asyncio.Handle | None = None
        self._batch = batch or contextlib.nullcontext
        self.delay_s = delay_s
        self.chunk = chunk
        self._writer: threading.Thread | None = None
        self._wake: threading.Event | None = None
        self._stopping = False
        self._halt = threading.Event()  # set by close: the writer's wait for its window ends
        self.warn_after_s = warn_after_s
        self.pause = pause
        self._behind = False  # warned that records lag; said again when caught up
        self._failing = False  # a batch's commit failed: its records wait to be tried again
        self.thread_on_loop = thread_on_loop
        # Set by its owner once the store it writes to is closed (InferenceEngine.close): a record
        # submitted later is dropped with a warning instead of failing on the closed store.
        self.retired = False

    def start_writer(self) -> None:
        """Write from a thread of its own from now on (a server: the SQLite work, WAL checkpoints
        included, runs mostly without the GIL, so the event loop keeps serving meanwhile)."""
        if self._writer is not None:
            return
        self._wake = threading.Event()
        self._halt.clear()
        self._writer = threading.Thread(target=self._write_loop, name="car-inference-records", daemon=True)
        self._writer.start()

    def _write_loop(self) -> None:
        assert self._wake is not None
        while not self._stopping:
            self._wake.wait()
            if self._stopping:
                break
            # Let the records of this window share the commit; close() ends the wait at once (a
            # sleep held a server's shutdown for record_delay_ms, up to 10 s).
            if self._halt.wait(self.delay_s):
                break
            self._wake.clear()
            # A backlog goes in batches of WRITER_BATCH: each commit lets go of the store's write
            # lock (other replicas' writers take turns) and the lag is checked between them.
            while self._pending and not self._stopping:
                self._check_lag()
                self.flush(WRITER_BATCH, pause=self.pause)
            self._check_lag()

    @property
    def pending(self) -> int:
        """Records waiting to be written."""
        return len(self._pending)

    @property
    def lag_s(self) -> float:
        """How long the oldest waiting record has waited (0 when none waits)."""
        try:
            return max(0.0, time.monotonic() - self._pending[0][0])
        except IndexError:
            return 0.0

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if self.retired:  # a stream left unclosed, finalized after the engine closed: a traceback
            log.warning(  # about a closed database at exit, and the record lost all the same
                "an outcome record came after the engine closed and is not written (close a stream"
                " you leave early, e.g. with contextlib.aclosing, before closing the engine)"
            )
            return
        self._pending.append((time.monotonic(), fn, args, kwargs))
        if self._wake is not None:
            self._wake.set()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop to defer to: write now
            self.flush()
            return
        if self.thread_on_loop and not self._stopping:
            self.start_writer()
            assert self._wake is not None
            self._wake.set()
            return
        if self._scheduled is None:
            self._scheduled = loop.call_soon(self._drain)

    def _drain(self) -> None:
        """Write at most ``chunk`` records, then yield to the loop and come back for the rest."""
        self._scheduled = None
        self.flush(self.chunk)
        if self._pending and self._scheduled is None:
            try:
                self._scheduled = asyncio.get_running_loop().call_soon(self._drain)
            except RuntimeError:
                self.flush()

    def _check_lag(self) -> None:
        """Warn once while the oldest waiting record is older than ``warn_after_s``; say when the
        queue has caught up."""
        lag = self.lag_s
        if not self._behind and lag >= self.warn_after_s:
            self._behind = True
            log.warning(
                "outcome records are %.1f s behind the answers (%d waiting): the state store is not "
                "keeping up, so learning, spend and traces lag and the waiting records hold memory",
                lag, len(self._pending),
            )  # fmt: skip
        elif self._behind and lag < self.warn_after_s / 10:
            self._behind = False
            log.warning("outcome records caught up (%d waiting, %.1f s behind)", len(self._pending), lag)

    def flush(self, limit: int | None = None, *, pause: bool = False) -> None:
        """Run the queued writes now (all of them, or the first ``limit``), in order, in one batch.
        ``pause`` (the writer thread): let go of the GIL between records once a millisecond of
        them has run, so that a request the loop has waiting runs then instead of after the batch
        (a store that waits little for its database, as a pipelined PostgreSQL batch, would
        otherwise hold it for up to the interpreter's 5 ms switch interval at a time)."""
        with self._lock:
            if not self._pending:
                return
            todo = len(self._pending) if limit is None else min(limit, len(self._pending))
            paused = time.perf_counter()
            taken: list[tuple[float, Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []
            try:
                with self._batch():
                    for _ in range(todo):
                        taken.append(record := self._pending.popleft())
                        _, fn, args, kwargs = record
                        try:
                            fn(*args, **kwargs)
                        except Exception:  # a lost record must be visible, never raised into a request
                            log.exception("recording an outcome failed")
                        if pause and (now := time.perf_counter()) - paused >= PAUSE_EVERY_S:
                            time.sleep(0)
                            paused = now
            except Exception:  # the batch's own commit failed (disk full, I/O error): rolled back,
                # its records wait at the front to be tried again (they were dropped, the traces
                # gone and their feedback a 404); the queue's bound refuses requests meanwhile
                self._pending.extendleft(reversed(taken))
                if not self._failing:
                    log.exception("writing a batch of outcome records failed; they are kept to try again")
                self._failing = True
                return
            if self._failing:
                log.warning("outcome records are written again (%d were waiting)", len(taken))
                self._failing = False

    def flush_unless_writer(self) -> None:
        """``flush()`` where the writes run on the caller's loop (a report then counts the last
        answers); with a writer thread, nothing: its queue may be long and the store slow, and a
        health report must not wait for them (it says what waits instead)."""
        if self._writer is None:
            self.flush()

    def close(self) -> None:
        self.thread_on_loop = False  # records submitted after close are written where they are made
        if self._writer is not None and self._wake is not None:
            self._stopping = True
            self._halt.set()
            self._wake.set()
            self._writer.join(timeout=10)
            self._writer = self._wake = None  # records submitted after this are not left queued
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        self.flush()
