"""Writes kept in memory while the PostgreSQL state store is unreachable, written when it returns.

``PgOutcomeStore`` is built on ``BufferedWrites``. When a write finds the database unreachable (a
lost connection, a refused one, no connection from the pool in time), the store goes *down*: that
write and every later one (traces, outcomes, feedback, spend) are appended, in order, to an
in-memory buffer of at most ``buffer_limit`` records, and return at once what they can say without
the database (``record_trace``: no quick-retry lookup, the quality it was given). The writes of a
``batch()`` whose transaction was lost with the connection go back to the buffer's front, before
the ones that came after them. Reads fail at once with ``errors.StateUnavailable`` (the server's
503 with ``Retry-After``) while it is down, instead of waiting for the pool, except spend totals:
the last totals read for the same window plus the buffered spend, so spend limits and
``/v1/health`` keep working.

Every ``retry_s`` (a timer, and any write or read that comes along) the store tries one connection;
once it connects, the buffer is written in order, in transactions of ``REPLAY_CHUNK`` records under
the write lock, before any newer write, and the store is *up* again.

What is lost: records beyond ``buffer_limit`` in one outage (the first ones are kept, later ones
are dropped and counted in ``dropped``; ``buffer_limit = 0`` drops everything), and the whole
buffer if the process ends before the database returns (``close`` tries once more). A record whose
replay the database refuses (a trace id it already has: the outage hit as a commit went through)
is skipped and logged, never counted twice. The in-process router keeps learning meanwhile: the
tracker's mirror is updated as usual; the counts reach the database with the replay.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg_pool import PoolTimeout

from ..errors import StateUnavailable
from .store_base import QualityChange, StoreBase, TraceRow

__all__ = ["REPLAY_CHUNK", "BufferedWrites", "unreachable"]

log = logging.getLogger("car_inference.state")

REPLAY_CHUNK = 200

# One buffered write: the StoreBase method, its arguments.
_Record = tuple[str, tuple[Any, ...], dict[str, Any]]


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database could not be reached (rather than refusing a statement):
    no pooled connection in time, a broken or refused connection (no SQLSTATE, class 08), or the
    server shutting down (class 57: admin shutdown, crash recovery)."""
    if isinstance(exc, PoolTimeout | StateUnavailable):
        return True
    if not isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return False
    state = getattr(exc, "sqlstate", None)
    return state is None or state[:2] in ("08", "57")


class BufferedWrites(StoreBase):
    """The write methods of ``StoreBase``, buffered while the database is unreachable (see the
    module). Subclasses call ``_init_buffer`` and provide ``_try_connect``, ``_replay`` and
    ``_in_batch``."""

    buffer_limit: int
    retry_s: float

    def _init_buffer(self, limit: int, retry_s: float) -> None:
        self.buffer_limit = max(0, int(limit))
        self.retry_s = retry_s
        self._buffer: deque[_Record] = deque()
        self._buf_lock = threading.RLock()
        self._down_since: float | None = None
        self._down_reason = ""
        self._retry_at = 0.0
        self._timer: threading.Timer | None = None
        self.dropped = 0  # records lost to the bound, since the store opened
        self.replayed = 0  # buffered records written once the database returned
        self._replayed_before = self._dropped_before = 0  # the counts when this outage began
        self._spend_seen: dict[tuple[float, float | None], dict[str, float]] = {}

    # --- subclass plumbing ---------------------------------------------------------------------

    def _try_connect(self) -> None:
        """Connect once (short timeout); raise when the database is still unreachable."""
        raise NotImplementedError

    def _replay(self, records: list[_Record], run: Callable[[_Record], None]) -> None:
        """Run ``records`` in one transaction under the write lock, each in its own savepoint."""
        raise NotImplementedError

    def _in_batch(self) -> bool:
        raise NotImplementedError

    def _in_dead_batch(self) -> bool:
        """In a batch that could not open its connection (its writes go to the buffer)."""
        return False

    def _journal(self, record: _Record) -> None:
        """A write that went through inside a batch: kept until the batch commits."""

    # --- state ---------------------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def down_since(self) -> float | None:
        """When the database stopped answering (epoch seconds), None while it answers."""
        return self._down_since

    def _went_down(self, exc: BaseException) -> None:
        with self._buf_lock:
            self._retry_at = time.monotonic() + self.retry_s
            if self._down_since is not None:
                return
            self._down_since = time.time()
            self._replayed_before = self.replayed
            self._dropped_before = self.dropped
            self._down_reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            log.warning(
                "PostgreSQL state store %s is unreachable (%s): up to %d records are kept in memory and"
                " written when it returns; records beyond that are dropped",
                self.location, self._down_reason, self.buffer_limit,
            )  # fmt: skip
            self._arm_timer()

    def _arm_timer(self) -> None:
        if self._timer is None or not self._timer.is_alive():
            self._timer = threading.Timer(self.retry_s, self._tick)
            self._timer.daemon = True
            self._timer.start()

    def _tick(self) -> None:
        self._timer = None
        if not self._in_batch() and self.recover(force=True):
            return
        with self._buf_lock:
            if self._down_since is not None or self._buffer:
                self._arm_timer()

    def _enqueue(self, records: list[_Record], *, front: bool = False) -> None:
        with self._buf_lock:
            if front:
                self._buffer.extendleft(reversed(records))
            else:
                self._buffer.extend(records)
            over = len(self._buffer) - self.buffer_limit
            if over > 0:
                if self.dropped == 0 or over == len(records):
                    log.error(
                        "PostgreSQL state store %s: %d records buffered, the limit; newer records are"
                        " dropped until it returns",
                        self.location, self.buffer_limit,
                    )  # fmt: skip
                for _ in range(over):
                    self._buffer.pop()
                self.dropped += over

    def recover(self, *, force: bool = False) -> bool:
        """Try the database (when a retry is due, or ``force``) and write the buffer to it; True
        when the store is up with nothing buffered."""
        with self._buf_lock:
            if self._down_since is None and not self._buffer:
                return True
            if not force and time.monotonic() < self._retry_at:
                return False
            try:
                if self._down_since is not None:
                    self._try_connect()
                while self._buffer:
                    chunk = [self._buffer[i] for i in range(min(REPLAY_CHUNK, len(self._buffer)))]
                    self._replay(chunk, self._replay_one)
                    for _ in chunk:
                        self._buffer.popleft()
                    self.replayed += len(chunk)
            except Exception as exc:
                if not unreachable(exc):
                    raise
                self._retry_at = time.monotonic() + self.retry_s
                if self._down_since is None:
                    self._went_down(exc)
                return False
            if self._down_since is not None:
                log.warning(
                    "PostgreSQL state store %s is reachable again, %.1f s after it was found away: %d"
                    " buffered records written, %d dropped",
                    self.location, time.time() - self._down_since, self.replayed - self._replayed_before,
                    self.dropped - self._dropped_before,
                )  # fmt: skip
            self._down_since = None
            return True

    def _replay_one(self, record: _Record) -> None:
        name, args, kwargs = record
        try:
            getattr(StoreBase, name)(self, *args, **kwargs)
        except psycopg.Error as exc:
            if unreachable(exc):
                raise
            log.warning("a buffered %s was refused on replay and is skipped: %s", name, exc)

    def _available(self) -> bool:
        """Whether writes may go to the database now (recovering first when a retry is due)."""
        if self._down_since is None and not self._buffer:
            return True
        if self._in_batch():
            return False  # the batch's connection is gone: its writes wait for the replay
        return self.recover()

    def _write(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], fallback: Any) -> Any:
        record: _Record = (name, args, kwargs)
        if self._available():
            try:
                result = getattr(StoreBase, name)(self, *args, **kwargs)
            except Exception as exc:
                if not unreachable(exc):
                    raise
                self._went_down(exc)
            else:
                self._journal(record)
                return result
        with self._buf_lock:
            if self._down_since is None and not self._buffer:  # it came back meanwhile
                return self._write(name, args, kwargs, fallback)
            self._enqueue([record])
        return fallback

    def _check_readable(self) -> None:
        """Reads fail at once while the database is away (none of them is buffered); inside a
        batch that could not connect too (its spend re-read waited out the pool's 5 s, under the
        lock each request's spend check takes, every second of an outage)."""
        if self._down_since is None or (self._in_batch() and not self._in_dead_batch()):
            return
        if self._in_dead_batch() or not self.recover():
            raise StateUnavailable(
                f"the PostgreSQL state store {self.location} is unreachable ({self._down_reason});"
                f" {len(self._buffer)} records are waiting in memory",
                retry_after=self.retry_s,
            )

    # --- spend totals: answered from memory while the database is away -----------------------

    def spend_by_provider(self, since: float, until: float | None = None) -> dict[str, float]:
        """The database's totals; while it is unreachable, the last totals it gave for this window
        plus the buffered spend inside it (spend limits keep counting through an outage)."""
        window = (since, until)
        try:
            totals = StoreBase.spend_by_provider(self, since, until)
        except Exception as exc:
            if not unreachable(exc):
                raise
            with self._buf_lock:
                totals = dict(self._spend_seen.get(window, {}))
                for name, args, _kwargs in self._buffer:
                    if name == "add_spend" and since <= args[3] and (until is None or args[3] < until):
                        totals[args[0]] = totals.get(args[0], 0.0) + float(args[2])
            return totals
        with self._buf_lock:
            if len(self._spend_seen) > 16:  # a few windows (this day, this month) are read over and over
                self._spend_seen.clear()
            # A copy: the caller's dict is its own (SpendControl adds each call's spend to it, and
            # the outage's answer, this copy plus the buffered spend, counted that spend twice).
            self._spend_seen[window] = dict(totals)
        return totals

    # --- the buffered writes -------------------------------------------------------------------

    def start_trace(self, row: TraceRow, *, retry_window_s: float | None = None) -> str | None:
        result: str | None = self._write("start_trace", (row,), {"retry_window_s": retry_window_s}, None)
        return result

    def finish_trace(self, trace_id: str, **kwargs: Any) -> tuple[TraceRow, float] | None:
        kwargs.setdefault("now", time.time())
        result: tuple[TraceRow, float] | None = self._write("finish_trace", (trace_id,), kwargs, None)
        return result

    def record_trace(self, row: TraceRow, **kwargs: Any) -> tuple[str | None, float]:
        success, score = kwargs.get("success"), kwargs.get("score")
        quality = 0.0 if success is None else (score if score is not None else float(success))
        kwargs.setdefault("now", time.time())  # the time it happened, not the replay's
        result: tuple[str | None, float] = self._write("record_trace", (row,), kwargs, (None, quality))
        return result

    def adjust_quality(
        self, trace_id: str, kind: str, value: float, *, explicit: bool, now: float | None = None
    ) -> QualityChange | None:
        kwargs = {"explicit": explicit, "now": time.time() if now is None else now}
        result: QualityChange | None = self._write("adjust_quality", (trace_id, kind, value), kwargs, None)
        return result

    def add_spend(self, provider: str, model_id: str, usd: float, ts: float | None = None) -> None:
        self._write("add_spend", (provider, model_id, usd, time.time() if ts is None else ts), {}, None)
