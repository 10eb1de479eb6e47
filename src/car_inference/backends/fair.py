"""Fair turns on a local model shared by several clients.

A local model runs one piece of work at a time: llama.cpp and torch work queues on one thread per
library (``base.openmp_thread``), Piper, Whisper, OCR and diffusers take turns on the model's lock
(``cache.UseLock``). In arrival order, a client that sends sixteen long generations at once makes
everyone who comes after wait for all sixteen. Here the next turn goes to the waiting client that
has had the least model time (start-time fair queuing): one client's backlog waits behind its own
work, another client waits for at most the turn in progress, and clients with long and short work
share the model by time, not by count. Work of one client keeps its order.

Who the client is comes from ``CLIENT``, a context variable the server sets per request (its API
key, else its address: the key ``[server] max_in_flight_per_client`` counts by). Library callers set
nothing and are one client, served in arrival order as before. A client that was idle starts level
with the turn in progress, so model time not used is not banked for later.
"""

from __future__ import annotations

import contextvars
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Generic, TypeVar

__all__ = ["CLIENT", "FairExecutor", "FairLock", "FairTurns", "step_by_step"]

# Who the work is for (set by the server around each request; None: the library's own caller).
CLIENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("car_inference_client", default=None)

Item = TypeVar("Item")


class FairTurns(Generic[Item]):
    """The waiting work of each client and whose turn is next. Not thread-safe: its owner locks.

    Each client has a virtual time, the model seconds it has been charged; the next turn goes to the
    waiting client with the smallest, ties to the one waiting longest. A client that starts waiting
    is moved up to the virtual time of the turn that started last (or, when the model was idle,
    of the turn that ended last), so being idle earns nothing and costs nothing."""

    def __init__(self) -> None:
        self._waiting: dict[str | None, deque[tuple[int, Item]]] = {}
        self._time: dict[str | None, float] = {}
        self._now = 0.0  # the clock: where the last turn started (ended, if nobody waited then)
        self._seq = itertools.count()

    def __len__(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    def add(self, client: str | None, item: Item, *, first: bool = False) -> None:
        """Queue ``item`` for ``client``, after its other waiting work or, when ``first`` (work
        that was paused to let others go and continues now), before it."""
        queue = self._waiting.get(client)
        if queue is None:
            queue = self._waiting[client] = deque()
            self._time[client] = max(self._time.get(client, 0.0), self._now)
        if first and queue:
            queue.appendleft((queue[0][0] - 1, item))
        else:
            queue.append((next(self._seq), item))

    def others_wait(self, client: str | None) -> bool:
        """Whether work of a client other than ``client`` is waiting."""
        return len(self._waiting) > (client in self._waiting)

    def pop(self) -> tuple[str | None, Item] | None:
        """The next turn: (client, item), or None when nobody waits."""
        if not self._waiting:
            return None
        client = min(self._waiting, key=lambda c: (self._time[c], self._waiting[c][0][0]))
        queue = self._waiting[client]
        _, item = queue.popleft()
        if not queue:
            del self._waiting[client]
        self._now = self._time[client]
        return client, item

    def remove(self, client: str | None, item: Item) -> bool:
        """Take back ``item`` (a waiter that gave up); whether it was still waiting."""
        queue = self._waiting.get(client)
        if queue is None:
            return False
        for entry in queue:
            if entry[1] is item:
                queue.remove(entry)
                if not queue:
                    del self._waiting[client]
                return True
        return False

    def charge(self, client: str | None, seconds: float) -> None:
        """Count a finished turn's model time against ``client``. When nobody waits, the clock
        moves to where that turn ended: after an idle model, whoever comes next starts level."""
        self._time[client] = self._time.get(client, self._now) + seconds
        if not self._waiting:
            self._now = max(self._now, self._time[client])
        if len(self._time) > 4 * len(self._waiting) + 64:
            # Idle clients at or behind the clock would restart from it anyway.
            for idle in [c for c, t in self._time.items() if c not in self._waiting and t <= self._now]:
                del self._time[idle]


class FairExecutor(Executor):
    """One worker thread (a ``ThreadPoolExecutor`` of one, for its shutdown at exit) that runs the
    submitted work in fair turns between clients (``FairTurns``) instead of in arrival order.

    Each submission queues one dispatch on the inner executor; a dispatch runs whichever waiting
    work is due then, so every piece of work runs once and the thread is the same one for all
    (what ``openmp_thread`` exists for)."""

    def __init__(self, thread_name_prefix: str) -> None:
        self._inner = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name_prefix)
        self._turns: FairTurns[tuple[Future[Any], Callable[[], Any]]] = FairTurns()
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        return self._submit(fn, args, kwargs, first=False)

    def resume(self, fn: Callable[..., Any], /, *args: Any) -> Future[Any]:
        """``submit`` for the rest of work that paused (``others_waiting``): it goes before the
        same client's other waiting work, which came after it."""
        return self._submit(fn, args, {}, first=True)

    def others_waiting(self) -> bool:
        """Whether another client's work waits for this thread (the caller's client: ``CLIENT``):
        long work asks between its steps, and pauses (``iterate_in_thread``'s ``PAUSE``)."""
        with self._lock:
            return self._turns.others_wait(CLIENT.get())

    def _submit(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], *, first: bool
    ) -> Future[Any]:
        future: Future[Any] = Future()
        work = (future, lambda: fn(*args, **kwargs))
        client = CLIENT.get()
        with self._lock:
            self._turns.add(client, work, first=first)
            try:
                self._inner.submit(self._dispatch)
            except RuntimeError:  # shut down: nothing will run it
                self._turns.remove(client, work)
                raise
        return future

    def _dispatch(self) -> None:
        with self._lock:
            turn = self._turns.pop()
        if turn is None:
            return
        client, (future, call) = turn
        if not future.set_running_or_notify_cancel():
            return  # cancelled while it waited
        start = time.perf_counter()
        try:
            result = call()
        except BaseException as exc:  # handed to the caller, as ThreadPoolExecutor does
            future.set_exception(exc)
        else:
            future.set_result(result)
        finally:
            with self._lock:
                self._turns.charge(client, time.perf_counter() - start)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if cancel_futures:
            with self._lock:
                while (turn := self._turns.pop()) is not None:
                    turn[1][0].cancel()
        self._inner.shutdown(wait=wait, cancel_futures=cancel_futures)


class FairLock:
    """A lock whose waiters get it in fair turns between clients (``FairTurns``), handed over
    directly on release. Holding time is charged to the holder's client. Not reentrant."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._turns: FairTurns[threading.Event] = FairTurns()
        self._held = False
        self._holder: str | None = None
        self._since = 0.0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        client = CLIENT.get()
        with self._mutex:
            if not self._held:
                self._take(client)
                return True
            if not blocking:
                return False
            turn = threading.Event()
            self._turns.add(client, turn)
        if turn.wait(None if timeout < 0 else timeout):
            return True
        with self._mutex:
            if self._turns.remove(client, turn):
                return False
        return True  # handed over as the wait ran out

    def _take(self, client: str | None) -> None:
        self._held = True
        self._holder = client
        self._since = time.perf_counter()

    def release(self) -> None:
        with self._mutex:
            if not self._held:
                raise RuntimeError("release of an unheld FairLock")
            self._turns.charge(self._holder, time.perf_counter() - self._since)
            turn = self._turns.pop()
            if turn is None:
                self._held = False
                return
            self._take(turn[0])
            turn[1].set()

    def locked(self) -> bool:
        return self._held

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def step_by_step(items: Iterable[Item], lock: AbstractContextManager[Any]) -> Iterator[Item]:
    """``items``, holding ``lock`` only while each is made (a Whisper window, a Piper sentence):
    between steps the model's next turn can go to another client (``FairLock``)."""
    steps = iter(items)
    while True:
        with lock:
            try:
                item = next(steps)
            except StopIteration:
                return
        yield item
