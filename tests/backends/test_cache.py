from __future__ import annotations

import gc
import json
import mmap
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from car_inference.backends.cache import RECORD_EVERY_S, ModelCache, read_records


def test_lru_eviction_keeps_within_budget() -> None:
    cache = ModelCache(budget_mb=100)
    cache.get_or_load("a", 40, lambda: "A")
    cache.get_or_load("b", 40, lambda: "B")
    cache.get("a")  # a is now the most recently used
    cache.get_or_load("c", 40, lambda: "C")
    assert cache.keys() == ["a", "c"] and cache.evictions == ["b"]
    assert cache.used_mb == 80


def test_a_model_larger_than_the_budget_loads_alone() -> None:
    cache = ModelCache(budget_mb=10)
    cache.get_or_load("small", 5, lambda: 1)
    assert cache.get_or_load("huge", 50, lambda: 2).instance == 2
    assert cache.keys() == ["huge"]


def test_concurrent_requests_load_once() -> None:
    cache = ModelCache(budget_mb=100)
    loads = []

    def loader() -> object:
        loads.append(1)
        time.sleep(0.05)
        return object()

    results = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get_or_load("m", 1, loader))) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loads) == 1
    assert len({id(r.instance) for r in results}) == 1


def test_each_entry_has_its_own_lock_and_invalidate_drops_it() -> None:
    cache = ModelCache(budget_mb=100)
    a = cache.get_or_load("a", 1, lambda: 1)
    b = cache.get_or_load("b", 1, lambda: 2)
    assert a.lock is not b.lock
    cache.invalidate("a")
    assert cache.get("a") is None and cache.get("b") is b


def _weights() -> mmap.mmap:
    """64 MB of fresh pages, each written: RSS grows by them even in a big test process, which
    could serve a bytearray from memory it freed earlier (RSS then barely moves)."""
    weights = mmap.mmap(-1, 64 * 2**20)
    for at in range(0, len(weights), 4096):
        weights[at] = 1
    return weights


def test_the_budget_counts_measured_memory_not_the_estimate() -> None:
    cache = ModelCache(budget_mb=100)
    a = cache.get_or_load("a", 1, _weights)
    assert a.estimated_mb == 1 and a.measured_mb is not None and a.measured_mb >= 48
    assert a.size_mb == a.measured_mb and cache.used_mb == a.measured_mb
    # Estimated at 1 MB, b would fit beside a; measured at 64 MB it does not, so a goes.
    b = cache.get_or_load("b", 1, _weights)
    assert cache.keys() == ["b"] and cache.evictions == ["a"]
    assert cache.used_mb == b.measured_mb


def test_a_load_that_shows_no_growth_keeps_the_estimate() -> None:
    cache = ModelCache(budget_mb=100)
    entry = cache.get_or_load("small", 7, lambda: 1)
    assert entry.measured_mb is None and entry.size_mb == 7 == cache.used_mb


async def test_a_real_gguf_load_is_budgeted_by_its_measured_memory() -> None:
    from car_inference.engine import InferenceEngine

    smol = "huggingface/smollm2-135m-instruct:q4_1"
    engine = InferenceEngine()  # its own cache, so this load really happens here
    assert await engine.warm_up([smol]) == [None]
    entry = engine.cache.get(f"gguf:{smol}")
    assert entry is not None and entry.estimated_mb == engine.registry.get(smol).size_mb  # type: ignore[union-attr]
    # The weights (94 MB file) plus the KV cache and compute buffers llama.cpp allocates.
    assert entry.measured_mb is not None and entry.measured_mb > 0
    assert entry.size_mb == entry.measured_mb and engine.cache.used_mb == entry.measured_mb


def test_entries_know_when_they_were_loaded_used_and_busy() -> None:
    cache = ModelCache(budget_mb=100)
    entry = cache.get_or_load("a", 1, lambda: 1)
    [loaded] = cache.loaded()
    assert loaded.key == "a" and not loaded.busy and loaded.loaded_at <= loaded.last_used
    time.sleep(0.25)
    assert cache.loaded()[0].idle_s >= 0.2
    with entry.lock:
        assert entry.lock.locked() and cache.loaded()[0].busy and cache.loaded()[0].idle_s == 0
    assert not entry.lock.locked() and cache.loaded()[0].idle_s < 0.1, "a use ends when the lock is released"
    assert entry.lock.acquire(blocking=False) and not entry.lock.acquire(blocking=False), "still a lock"
    entry.lock.release()


def test_records_let_other_processes_see_what_is_loaded(tmp_path: Path) -> None:
    folder = tmp_path / "loaded"
    cache = ModelCache(budget_mb=100, record_dir=folder)
    assert read_records(folder) == [], "nothing loaded: no record"
    entry = cache.get_or_load("gguf:m", 3, lambda: 1)
    [seen] = read_records(folder)
    assert (seen.key, seen.pid, seen.estimated_mb, seen.busy) == ("gguf:m", os.getpid(), 3, False)
    with entry.lock:
        assert _soon(lambda: read_records(folder)[0].busy), "a use shows within RECORD_EVERY_S"
    assert _soon(lambda: not read_records(folder)[0].busy)
    cache.invalidate("gguf:m")
    assert read_records(folder) == [] and not any(folder.iterdir())


def test_a_record_of_another_shape_is_read_as_far_as_it_goes(tmp_path: Path) -> None:
    """A record written by another car version (a field more, one less) or damaged: `car models
    ps` crashed on it with a TypeError traceback."""
    folder = tmp_path / "loaded"
    folder.mkdir()
    now = time.time()
    known = {"key": "gguf:a", "pid": os.getpid(), "measured_mb": None, "estimated_mb": 3.0,
             "loaded_at": now, "last_used": now}  # fmt: skip
    models = [known | {"device": "cuda:0"}, {"key": "gguf:b", "pid": os.getpid()}, "junk", None]
    (folder / "loaded-1-1.json").write_text(json.dumps({"pid": os.getpid(), "models": models}))
    (folder / "loaded-1-2.json").write_text(json.dumps({"pid": os.getpid(), "models": None}))
    [seen] = read_records(folder)
    assert seen.key == "gguf:a" and seen.estimated_mb == 3.0


def _soon(check: Callable[[], bool], within_s: float = 5.0) -> bool:
    """Whether ``check()`` holds within ``within_s`` (the record's writer thread writes uses)."""
    deadline = time.monotonic() + within_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_burst_of_uses_is_written_once_and_ends_idle(tmp_path: Path) -> None:
    """Each use flips a model busy and idle; 1,000 of them in a row are a handful of record writes
    (one per RECORD_EVERY_S), not 2,000, and the last one written says idle."""
    folder = tmp_path / "loaded"
    cache = ModelCache(budget_mb=100, record_dir=folder)
    entry = cache.get_or_load("gguf:m", 3, lambda: 1)
    record = cache.record
    assert record is not None and record.writes == 1, "a load is written at once"
    start = time.monotonic()
    for _ in range(1000):
        with entry.lock:
            pass
    elapsed = time.monotonic() - start
    assert _soon(lambda: record.writes >= 2)
    time.sleep(3 * RECORD_EVERY_S)
    assert record.writes <= 2 + elapsed / RECORD_EVERY_S
    assert not read_records(folder)[0].busy


def test_nothing_writes_a_closed_record(tmp_path: Path) -> None:
    folder = tmp_path / "loaded"
    cache = ModelCache(budget_mb=100, record_dir=folder)
    entry = cache.get_or_load("gguf:m", 3, lambda: 1)
    assert cache.record is not None
    with entry.lock:
        cache.record.close()  # what the process does at exit, a use still running
    time.sleep(3 * RECORD_EVERY_S)
    cache.get_or_load("gguf:n", 3, lambda: 2)
    assert not any(folder.iterdir())


def test_records_of_dead_processes_are_dropped(tmp_path: Path) -> None:
    folder = tmp_path / "loaded"
    script = (
        "import sys; from pathlib import Path; from car_inference.backends.cache import ModelCache;"
        "c = ModelCache(100, record_dir=Path(sys.argv[1])); c.get_or_load('gguf:x', 1, lambda: 1);"
        "import os; os._exit(0)"  # dies without running atexit: the record stays behind
    )
    subprocess.run([sys.executable, "-c", script, str(folder)], check=True)
    [record] = folder.glob("loaded-*.json")
    assert read_records(folder) == [] and not record.exists()
    subprocess.run(
        [sys.executable, "-c", script.replace("import os; os._exit(0)", "pass"), str(folder)], check=True
    )
    assert not any(folder.iterdir()), "a clean exit removes its own record"


def test_closing_or_dropping_a_cache_removes_its_record(tmp_path: Path) -> None:
    closed = ModelCache(budget_mb=100, record_dir=tmp_path / "closed")
    closed.get_or_load("gguf:m", 3, lambda: 1)
    closed.close()
    assert not any((tmp_path / "closed").iterdir())
    dropped = ModelCache(budget_mb=100, record_dir=tmp_path / "dropped")
    entry = dropped.get_or_load("gguf:m", 3, lambda: 1)
    with entry.lock:  # its record's writer thread runs for a while: it must not keep the cache
        pass
    del dropped, entry
    gc.collect()
    assert _soon(lambda: not any((tmp_path / "dropped").iterdir()))


def test_two_caches_of_one_process_keep_records_of_their_own(tmp_path: Path) -> None:
    """Two engines on one home in one process (``car models ps`` run in-process makes one): each
    records its own models, and closing one leaves the other's (they shared loaded-<pid>.json)."""
    folder = tmp_path / "loaded"
    first, second = ModelCache(100, record_dir=folder), ModelCache(100, record_dir=folder)
    first.get_or_load("gguf:a", 3, lambda: 1)
    second.get_or_load("gguf:b", 3, lambda: 2)
    assert sorted(r.key for r in read_records(folder)) == ["gguf:a", "gguf:b"]
    second.close()
    assert [r.key for r in read_records(folder)] == ["gguf:a"]
