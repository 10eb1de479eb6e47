"""``LoadedGguf`` on the embedded SmolLM2-135M GGUF, for real (offline): the cached prefix, prefill
in stoppable batches, the logits after a prompt, and llama.cpp's log levels."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from car_inference.backends.base import BackendContext
from car_inference.backends.cache import ModelCache
from car_inference.backends.gguf_loaded import LoadedGguf, quiet_llama_cpp
from car_inference.backends.llamacpp import LLAMA_THREAD, LlamaCppBackend
from car_inference.catalog import load_builtin
from car_inference.catalog.locate import local_path
from car_inference.config import CarConfig

SMOL = "huggingface/smollm2-135m-instruct:q4_1"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadedGguf]:
    config = CarConfig(home=tmp_path_factory.mktemp("home"))
    backend = LlamaCppBackend(BackendContext(config=config, cache=ModelCache(config.local.cache_mb)))
    model = next(m for m in load_builtin().models if m.id == SMOL)
    yield on_llama_thread(backend._load, model, str(local_path(model)), False)


def on_llama_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Every llama.cpp call runs on the backend's one thread (``base.openmp_thread``: a call from
    another thread would leave OpenMP pools behind that slow every later test's decoding)."""
    return LLAMA_THREAD.submit(fn, *args).result()


def llama_test(test: Callable[[LoadedGguf], None]) -> Callable[[LoadedGguf], None]:
    def run(loaded: LoadedGguf) -> None:
        on_llama_thread(test, loaded)

    run.__name__, run.__doc__ = test.__name__, test.__doc__
    return run


def _words(loaded: LoadedGguf, n: int) -> list[int]:
    return loaded.tokenize("one two three four five six seven eight nine ten " * n, special=False)


@llama_test
def test_the_cached_prefix_is_what_the_kv_cache_shares_with_a_new_prompt(loaded: LoadedGguf) -> None:
    first = _words(loaded, 3)
    assert loaded.prefill(first, threading.Event(), whole=True)
    assert loaded.llm.n_tokens == len(first)
    # A prompt that continues the evaluated one shares all of it; one that differs early, less.
    assert loaded.cached([*first, 42, 43]) == len(first)
    changed = [first[0], first[1] + 1, *first[2:]]
    assert loaded.cached(changed) == 1
    # The last token is always evaluated again, for its logits.
    assert loaded.cached(first) == len(first) - 1


@llama_test
def test_prefill_leaves_the_last_batch_to_generate_unless_whole(loaded: LoadedGguf) -> None:
    loaded.llm.reset()
    step = loaded.llm.n_batch
    tokens = _words(loaded, 2 * step // 10 + 5)  # more than two batches, not a multiple of one
    assert len(tokens) > 2 * step and (len(tokens) - 1) % step
    assert loaded.prefill(tokens, threading.Event())
    assert loaded.llm.n_tokens == (len(tokens) - 1) // step * step
    assert loaded.prefill(tokens, threading.Event(), whole=True)
    assert loaded.llm.n_tokens == len(tokens)


@llama_test
def test_a_set_stop_ends_prefill_between_batches(loaded: LoadedGguf) -> None:
    loaded.llm.reset()
    step = loaded.llm.n_batch
    tokens = _words(loaded, 3 * step // 10)
    stop = threading.Event()
    steps = loaded.prefill_steps(tokens, whole=True)
    next(steps)
    next(steps)  # the first batch is read, the second about to be
    stop.set()
    assert loaded.llm.n_tokens == step
    assert not loaded.prefill(tokens, stop, whole=True)  # from the cache on, nothing more is read
    assert loaded.llm.n_tokens == step


@llama_test
def test_last_logits_reuse_the_cache_and_equal_a_fresh_pass(loaded: LoadedGguf) -> None:
    prefix = _words(loaded, 2)
    tokens = [*prefix, *loaded.tokenize(" eleven twelve", special=False)]
    loaded.llm.reset()
    fresh = loaded.last_logits(tokens)
    loaded.llm.reset()
    loaded.prefill(prefix, threading.Event(), whole=True)
    reused = loaded.last_logits(tokens)
    assert fresh.shape == (loaded.llm.n_vocab(),)
    assert int(fresh.argmax()) == int(reused.argmax())
    assert abs(fresh - reused).max() < 1e-2
    stop = threading.Event()
    stop.set()
    loaded.llm.reset()
    with pytest.raises(Exception, match="caller went away"):
        loaded.last_logits(tokens, stop)


@llama_test
def test_continuation_logprobs_in_one_pass_equal_a_token_at_a_time(loaded: LoadedGguf) -> None:
    """A likelihood label's tokens are scored from one batched evaluation (a token at a time was
    one evaluation each); the numbers are the same, and the cache stays usable."""
    import numpy as np

    prefix = _words(loaded, 3)
    continuation = loaded.tokenize(" and then the fourteenth word", special=False)
    never = threading.Event()
    loaded.llm.reset()
    batched = loaded.continuation_logprobs(prefix, continuation, never)
    one_by_one = []
    for i, token in enumerate(continuation):
        logits = loaded.last_logits(prefix + continuation[:i])
        one_by_one.append(float(logits[token] - logits.max() - np.log(np.exp(logits - logits.max()).sum())))
    assert len(batched) == len(continuation)
    assert max(abs(a - b) for a, b in zip(batched, one_by_one, strict=True)) < 5e-2, (batched, one_by_one)
    assert all(value <= 0 for value in batched)
    stop = threading.Event()
    stop.set()
    loaded.llm.reset()
    with pytest.raises(Exception, match="caller went away"):
        loaded.continuation_logprobs(prefix, continuation, stop)


@llama_test
def test_is_eog_knows_the_end_of_turn_token(loaded: LoadedGguf) -> None:
    assert loaded.is_eog(loaded.llm.token_eos())
    assert not loaded.is_eog(loaded.tokenize("Paris", special=False)[0])


def test_llama_cpp_logs_only_errors_unless_the_application_asks() -> None:
    logger = logging.getLogger("llama-cpp-python")
    before = logger.level
    try:
        logger.setLevel(logging.NOTSET)
        quiet_llama_cpp()
        assert logger.level == logging.ERROR
        logger.setLevel(logging.DEBUG)
        quiet_llama_cpp()  # an application's own level is kept
        assert logger.level == logging.DEBUG
    finally:
        logger.setLevel(before)
