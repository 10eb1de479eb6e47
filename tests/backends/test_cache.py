from __future__ import annotations

import threading
import time

from car_inference.backends.cache import ModelCache


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
