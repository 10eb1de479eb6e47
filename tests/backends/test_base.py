from __future__ import annotations

import asyncio
import contextvars
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from car_inference.backends.base import (
    BACKLOG_HIGH,
    PAUSE,
    TASK_PROTOCOLS,
    class_tasks,
    iterate_in_thread,
    label_distribution,
    ranked_result,
    run_blocking,
    until_stopped,
)
from car_inference.backends.fair import CLIENT, FairExecutor
from car_inference.errors import InferenceFailed
from car_inference.requests import RerankRequest
from car_inference.schema import TASK_CAPABILITIES, ModelCapability


async def test_items_flow_from_the_thread_and_errors_re_raise() -> None:
    def numbers(_: threading.Event) -> Iterator[int]:
        yield from range(5)

    assert [n async for n in iterate_in_thread(numbers)] == [0, 1, 2, 3, 4]

    def broken(_: threading.Event) -> Iterator[int]:
        yield 1
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        async for _ in iterate_in_thread(broken):
            pass


async def test_a_consumer_that_stops_reading_stops_the_producer() -> None:
    produced: list[int] = []
    finished = threading.Event()

    def endless(cancelled: threading.Event) -> Iterator[int]:
        try:
            i = 0
            while not cancelled.is_set():
                produced.append(i)
                yield i
                i += 1
                time.sleep(0.001)
        finally:
            finished.set()

    agen = iterate_in_thread(endless)
    async for n in agen:
        if n == 3:
            break
    await agen.aclose()
    await asyncio.get_running_loop().run_in_executor(None, finished.wait, 5)
    assert finished.is_set()
    count = len(produced)
    await asyncio.sleep(0.05)
    assert len(produced) == count, "nothing is produced after the consumer left"


def _submit_as(executor: FairExecutor, client: str, fn: Callable[[], object]) -> None:
    context = contextvars.copy_context()
    context.run(CLIENT.set, client)
    context.run(executor.submit, fn)


async def test_an_iterator_that_pauses_lets_other_clients_work_run_then_goes_on() -> None:
    """``PAUSE`` gives the thread up: the work another client queued meanwhile runs, then the
    rest of the iterator, on the same thread; the consumer never sees ``PAUSE``."""
    executor, order = FairExecutor("paused"), []

    def paused(_: threading.Event) -> Iterator[object]:
        yield 1
        _submit_as(executor, "b", lambda: order.append(("b", threading.current_thread().name)))
        yield PAUSE
        order.append(("a", threading.current_thread().name))
        yield 2

    CLIENT.set("a")
    assert [n async for n in iterate_in_thread(paused, executor)] == [1, 2]
    assert [who for who, _ in order] == ["b", "a"] and len({thread for _, thread in order}) == 1


async def test_an_iterator_can_pause_on_a_pool_of_several_threads() -> None:
    """The rest of a paused iterator may start on another thread of the pool before the first
    part has returned: it runs in a context of its own (one context cannot be entered twice)."""
    pool = ThreadPoolExecutor(max_workers=4)

    def paused(_: threading.Event) -> Iterator[object]:
        for i in range(20):
            yield i
            yield PAUSE

    try:
        for _ in range(10):
            assert [n async for n in iterate_in_thread(paused, pool)] == list(range(20))
    finally:
        pool.shutdown()


def _pausing_when_behind(made: list[int], total: int) -> Callable[[threading.Event], Iterator[object]]:
    """An iterator that pauses as llama.cpp's does when its reader is behind (``StreamControl``)."""

    def items(control: threading.Event) -> Iterator[object]:
        for i in range(total):
            made.append(i)
            yield i
            if control.behind():  # type: ignore[attr-defined]
                yield PAUSE

    return items


async def test_a_reader_that_stops_reading_parks_the_iterator_until_it_reads_on() -> None:
    """A stream kept and not read generated on to the end, holding the model (the same caller's
    next request waited 79 s for it); now it stays paused once BACKLOG_HIGH items wait unread,
    and goes on, in order and whole, once its reader has read down to BACKLOG_LOW."""
    made: list[int] = []
    executor, total = FairExecutor("backlog"), 3 * BACKLOG_HIGH
    items = iterate_in_thread(_pausing_when_behind(made, total), executor)
    assert await anext(items) == 0
    for _ in range(100):  # it makes items until its reader is BACKLOG_HIGH behind, then parks
        await asyncio.sleep(0.01)
    assert BACKLOG_HIGH <= len(made) <= BACKLOG_HIGH + 2, len(made)
    assert await run_blocking(lambda: "the thread is free", executor) == "the thread is free"
    rest = [n async for n in items]
    assert [0, *rest] == list(range(total)) and len(made) == total


async def test_a_parked_iterator_given_up_is_closed() -> None:
    executor, steps = FairExecutor("parked"), []

    def items(control: threading.Event) -> Iterator[object]:
        try:
            yield from _pausing_when_behind([], 10 * BACKLOG_HIGH)(control)
        finally:
            steps.append("closed")

    stream = iterate_in_thread(items, executor)
    await anext(stream)
    await asyncio.sleep(0.5)  # parked behind its unread backlog
    await stream.aclose()
    await asyncio.get_running_loop().run_in_executor(None, executor.submit(lambda: None).result, 10)
    assert steps == ["closed"]


async def test_a_paused_iterator_given_up_is_closed_without_going_on() -> None:
    executor, gate, steps = FairExecutor("given-up"), threading.Event(), []

    def paused(_: threading.Event) -> Iterator[object]:
        try:
            yield 1
            _submit_as(executor, "b", lambda: gate.wait(10))  # holds the thread until let go
            yield PAUSE
            steps.append("went on")
            yield 2
        finally:
            steps.append("closed")

    CLIENT.set("a")
    items = iterate_in_thread(paused, executor)
    assert await anext(items) == 1
    await items.aclose()  # the consumer leaves while the rest waits behind b's work
    gate.set()
    await asyncio.get_running_loop().run_in_executor(None, executor.submit(lambda: None).result, 10)
    assert steps == ["closed"]


async def test_work_runs_on_the_executor_given() -> None:
    one = ThreadPoolExecutor(max_workers=1, thread_name_prefix="only")

    def names(_: threading.Event) -> Iterator[str]:
        yield threading.current_thread().name

    assert await run_blocking(lambda: threading.current_thread().name, one) == "only_0"
    assert [n async for n in iterate_in_thread(names, one)] == ["only_0"]
    assert (await run_blocking(lambda: threading.current_thread().name)).startswith("car-model")


async def test_a_stream_given_up_while_it_waited_for_its_thread_never_starts() -> None:
    one = ThreadPoolExecutor(max_workers=1)
    release = threading.Event()
    one.submit(release.wait, 5)  # the only thread is busy
    started = threading.Event()

    def work(_: threading.Event) -> Iterator[int]:
        started.set()
        yield 1

    agen = iterate_in_thread(work, one)
    waiting = asyncio.ensure_future(agen.__anext__())
    await asyncio.sleep(0.05)
    waiting.cancel()  # the consumer leaves before the thread is free
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await agen.aclose()
    release.set()
    await asyncio.get_running_loop().run_in_executor(one, lambda: None)  # after the queued work
    assert not started.is_set()


def test_label_distribution_sums_to_one_sorted() -> None:
    c = label_distribution(["a", "b", "c"], [0.0, 2.0, 1.0], "m", "x")
    assert [r.label for r in c.results] == ["b", "c", "a"]
    assert abs(sum(r.score for r in c.results) - 1) < 1e-9


def test_ranked_result_breaks_ties_by_input_order_and_cuts_top_n() -> None:
    req = RerankRequest(query="q", documents=["a", "b", "c", "d"], top_n=3)
    r = ranked_result(req, [0.5, 0.9, 0.5, 0.1], "m", "x")
    assert [d.index for d in r.ranked] == [1, 0, 2]


def test_tasks_are_read_from_the_backend_classes_without_importing_them() -> None:
    """What the source says each built-in backend implements is what the imported class has, and
    finding it out imported no SDK."""
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from car_inference.backends import BACKENDS, backend_available, load_backend_class\n"
        "from car_inference.backends.base import TASK_PROTOCOLS, _protocol_methods, class_tasks\n"
        "read = {k: sorted(class_tasks(s.target)) for k, s in BACKENDS.items() if backend_available(k)}\n"
        "sdks = sorted(m for m in ('openai', 'anthropic', 'google.genai', 'llama_cpp') if m in sys.modules)\n"
        "asked = {}\n"
        "for kind in read:\n"
        "    cls = load_backend_class(kind, 'm/x')\n"
        "    asked[kind] = sorted(c for c, p in TASK_PROTOCOLS.items()\n"
        "                         if all(callable(getattr(cls, n, None)) for n in _protocol_methods(p)))\n"
        "print(json.dumps([read, asked, sdks]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    read, asked, sdks = json.loads(out)
    assert sdks == [], "no SDK imported to find out"
    assert read == asked and {"openai", "anthropic", "gemini", "gguf", "piper", "whisper"} <= set(read)
    assert read["anthropic"] == ["generate"] and read["piper"] == ["text_to_speech"]
    assert read["whisper"] == ["speech_to_text"] and {"generate", "embed"} <= set(read["openai"])


def test_a_backend_that_defines_a_task_method_implements_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "painters.py").write_text(
        "from car_inference.backends.remote import RemoteBackend\n"
        "class Base:\n"
        "    async def generate_image(self, model, request, progress=None): ...\n"
        "class Painter(Base):\n"
        "    async def synthesize(self, model, request): ...\n"
        "class Chatty(RemoteBackend):\n"
        "    pass\n"
        "class Odd(dict):\n"  # a base from elsewhere: the class is imported and asked
        "    async def transcribe(self, model, request): ...\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert TASK_PROTOCOLS.keys() == TASK_CAPABILITIES
    assert class_tasks("painters:Painter") == {
        ModelCapability.IMAGE_GENERATION,
        ModelCapability.TEXT_TO_SPEECH,
    }
    assert class_tasks("painters:Chatty") == {ModelCapability.GENERATE}
    assert class_tasks("painters:Odd") == {ModelCapability.SPEECH_TO_TEXT}


def test_until_stopped_ends_work_at_its_next_step() -> None:
    """Once the caller has gone (``run_stoppable`` sets the event) no further step is taken: a
    Whisper window, a Piper piece, a label or document scored by llama.cpp."""
    stop = threading.Event()
    taken: list[int] = []

    def steps() -> Iterator[int]:
        for i in range(23):
            taken.append(i)
            if i == 2:
                stop.set()  # the caller goes away during the third step
            yield i

    with pytest.raises(InferenceFailed, match=r"^m: transcription stopped: its caller went away$"):
        list(until_stopped(steps(), stop, "m: transcription"))
    assert taken == [0, 1, 2]
    assert list(until_stopped(iter(range(3)), threading.Event(), "m")) == [0, 1, 2]
