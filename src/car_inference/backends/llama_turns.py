"""A long llama.cpp generation gives the model to other clients between its turns.

All llama.cpp work of the process runs on one thread (``LLAMA_THREAD``), in fair turns between
clients (``fair.FairExecutor``). A generation used to be one turn: a client's 16-token chat
waited for another's 1,000-token answer, or for a long prompt's whole prefill, to end. Now,
once a generation has run ``TURN_S`` and another client's work waits, it pauses: it saves the
context's state (the KV cache of its tokens, and which tokens they are), lets go of the model and
of the thread (``base.PAUSE``), and, at its next turn, takes the model again, puts its state back
and goes on from the token where it stopped. The other work may have used the same model: the
state it finds is its own again, exactly (a greedy answer is the same token for token; tested).

A saved state is a copy of the KV cache of the tokens so far (SmolLM2-135M: 23 KB a token), made
and put back in a few milliseconds; the turn grows to 20 times what the last switch cost, so
larger models and contexts switch less often. The sampler chain is built again on resuming and
first accepts the tokens generated so far, so a repeat penalty's window and a JSON grammar's
position are as they were. A generation with a seed is one turn, as before: its random sequence
cannot be carried over to a new sampler.
"""

from __future__ import annotations

import ctypes
import random
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import InferenceFailed
from .base import PAUSE
from .fair import FairLock

__all__ = ["TURN_S", "SavedState", "Turns", "resumable"]

TURN_S = 0.25  # the least a generation runs before it gives the model to waiting work
SWITCH_SHARE = 20  # ... and at least this many times what its last pause and resume cost


@dataclass(slots=True)
class SavedState:
    data: Any  # numpy uint8 array: llama_state_get_data's bytes, in its first ``size``
    size: int
    input_ids: Any  # numpy array: the tokens whose KV the data holds
    n_tokens: int


def save(llm: Any, reuse: SavedState | None = None) -> SavedState:
    """The state of ``llm``'s context (a ``llama_cpp.Llama``) that its next user would change,
    in ``reuse``'s buffer when it is large enough. A numpy buffer: a ctypes array is zeroed when
    made (30 ms for 46 MB); fresh memory still costs its first touch (38 ms for 46 MB, 5 ms when
    the buffer is used again)."""
    import llama_cpp
    import numpy as np

    size = llama_cpp.llama_state_get_size(llm.ctx)
    if reuse is not None and len(reuse.data) >= size:
        data = reuse.data
    else:  # room to grow: the next pause of the generation, a few hundred tokens on, reuses it
        data = np.empty(size + size // 2, dtype=np.uint8)
    written = llama_cpp.llama_state_get_data(llm.ctx, _pointer(data), size)
    if written > size:
        raise InferenceFailed("could not save the llama.cpp context's state to pause a generation")
    return SavedState(data, written, llm.input_ids[: llm.n_tokens].copy(), llm.n_tokens)


def restore(llm: Any, state: SavedState) -> None:
    import llama_cpp

    if llama_cpp.llama_state_set_data(llm.ctx, _pointer(state.data), state.size) != state.size:
        raise InferenceFailed("could not restore the llama.cpp context's state to resume a generation")
    llm.input_ids[: state.n_tokens] = state.input_ids
    llm.n_tokens = state.n_tokens


def _pointer(data: Any) -> Any:
    return data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))


class Turns:
    """One generation's turns on ``llm`` under ``lock`` (held when it starts). ``due()`` between
    steps says whether to pause; ``pause()`` is yielded from: it saves, lets go, yields ``PAUSE``,
    and comes back with the model and the state."""

    def __init__(
        self, llm: Any, lock: FairLock, others_waiting: Callable[[], bool], *, allowed: bool
    ) -> None:
        self.llm, self.lock, self.others_waiting, self.allowed = llm, lock, others_waiting, allowed
        self.started = time.perf_counter()
        self.switch_s = 0.0
        self._saved: SavedState | None = None

    def due(self) -> bool:
        if not self.allowed:
            return False
        ran = time.perf_counter() - self.started
        return ran >= max(TURN_S, SWITCH_SHARE * self.switch_s) and self.others_waiting()

    def pause(self) -> Iterator[Any]:
        start = time.perf_counter()
        state = self._saved = save(self.llm, self._saved)
        self.lock.release()
        spent = time.perf_counter() - start
        try:
            yield PAUSE
        finally:  # closed while paused too: the caller's ``with lock`` releases it again
            self.lock.acquire()
        start = time.perf_counter()
        restore(self.llm, state)
        self.switch_s = spent + time.perf_counter() - start
        self.started = time.perf_counter()

    def tokens(
        self, start: Callable[[list[int]], Generator[int, Any, None]], prompt: list[int]
    ) -> Generator[Any, None, None]:
        """``start(prompt)``'s tokens (a ``Llama.generate``), with ``PAUSE`` between them when a
        pause is due. After one, generation starts again from the prompt and the tokens so far:
        the cache holds all but the last, which is evaluated then, as it would have been."""
        produced: list[int] = []
        generation = start(prompt)
        try:
            while (token := next(generation, None)) is not None:
                produced.append(token)
                yield token
                if self.due():
                    generation.close()
                    yield from self.pause()
                    self.llm.set_seed(random.getrandbits(32))  # not the sequence it began with
                    self._prime(produced)
                    generation = start(prompt + produced)
        finally:
            generation.close()
            vars(self.llm).pop("_init_sampler", None)

    def _prime(self, produced: list[int]) -> None:
        """Make the next sampler chain ``Llama.generate`` builds accept ``produced`` first, as the
        paused one had: the repeat penalty's window of recent tokens and a grammar's position
        (JSON output) are then what they were. (``Llama._init_sampler``, shadowed once on the
        instance; ``resumable`` says whether this llama-cpp-python has it.)"""
        llm = self.llm
        make = type(llm)._init_sampler

        def primed(*args: Any, **kwargs: Any) -> Any:
            vars(llm).pop("_init_sampler", None)
            sampler = make(llm, *args, **kwargs)
            for token in produced:
                sampler.accept(token)
            return sampler

        llm._init_sampler = primed


def resumable(llm: Any, *, seed: int | None) -> bool:
    """Whether a generation on ``llm`` can pause and go on exactly: its sampler chain can be
    rebuilt (``Turns._prime``), and no seed asks for one random sequence (the sampler's random
    state cannot be carried over)."""
    return seed is None and callable(getattr(type(llm), "_init_sampler", None))
