"""A GGUF model loaded in llama-cpp-python (``LoadedGguf``): tokenizing a prompt around its
template's control tokens, the KV-cache prefix it shares with a new prompt, prefill in stoppable
batches, and the logits after a prompt. Also ``quiet_llama_cpp``: llama.cpp's log levels read
right, so that only its errors reach stderr."""

from __future__ import annotations

import ctypes
import functools
import logging
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from threading import Event
from typing import Any

from ..errors import InferenceFailed, InvalidInput
from .control_text import control_pattern, neutralize, tokenize_around

__all__ = ["LoadedGguf", "quiet_llama_cpp"]

log = logging.getLogger(__name__)

# ggml's log levels (ggml.h: DEBUG 1, INFO 2, WARN 3, ERROR 4; CONT 5 continues the last line).
_GGML_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_LOG_CALLBACK: list[Any] = []  # ours once installed, kept referenced: llama.cpp holds a C pointer


def quiet_llama_cpp(threshold: int | None = None) -> None:
    """Only llama.cpp's errors reach stderr unless the application asks for more. llama-cpp-python's
    own log callback reads ggml's levels as numbered before ggml.h renumbered them, so a warning
    (such as a vocabulary-only load's "n_ctx_seq > n_ctx_train (0)") passes as an error even with
    ``verbose=False``; ours reads them right and honours the "llama-cpp-python" logger's level,
    or ``threshold`` when given (a ``Llama(verbose=True)`` sets that logger to DEBUG)."""
    import llama_cpp

    logger = logging.getLogger("llama-cpp-python")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.ERROR)
    if _LOG_CALLBACK:
        return
    last = [logging.ERROR]

    @llama_cpp.llama_log_callback
    def forward(level: int, text: bytes, _user_data: Any) -> None:
        last[0] = last[0] if level == 5 else _GGML_LEVELS.get(level, logging.ERROR)
        if last[0] >= (threshold if threshold is not None else logger.getEffectiveLevel()):
            sys.stderr.write(text.decode("utf-8", "replace"))
            sys.stderr.flush()

    llama_cpp.llama_log_set(forward, ctypes.c_void_p(0))
    _LOG_CALLBACK.append(forward)


_NEVER = Event()  # a stop that is never set


@dataclass
class LoadedGguf:
    llm: Any  # llama_cpp.Llama
    template: str | None
    bos: str
    eos: str
    add_bos: bool
    n_ctx: int
    vocab: Any

    def tokenize(self, text: str, *, special: bool, add_bos: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def tokenize_prompt(self, render: Callable[..., str], *client: Any, bos: bool = True) -> list[int]:
        """``render(*client)`` tokenized with its template's control tokens, while the text of
        one in the ``client`` values (strings, messages, tools) stays text (``control_text``).
        A BOS is added unless ``bos`` is off or the rendered text starts with one."""
        found: list[str] = []
        if self.controls is not None:
            client = tuple(neutralize(value, self.controls, found) for value in client)
        text = render(*client)
        add_bos = bos and self.add_bos and not (self.bos and text.startswith(self.bos))
        if found:
            return tokenize_around(
                text, found, lambda t, sp, b: self.tokenize(t, special=sp, add_bos=b), add_bos
            )
        return self.tokenize(text, special=True, add_bos=add_bos)

    def fit_prompt(
        self, render: Callable[..., str], text: str, *rest: Any, room: int, what: str, bos: bool = True
    ) -> list[int]:
        """``tokenize_prompt(render, text, *rest)`` in at most ``room`` tokens: a ``text`` that
        does not fit is cut from its end, the rest of the prompt (instruction, query, labels, the
        turn's close) kept whole; ``InvalidInput`` when ``what`` alone does not fit. Scoring the
        prompt's tail instead dropped exactly those: a football text was "politics" at 91 %
        whatever the labels' order, a document scored the same for any query."""
        tokens = self.tokenize_prompt(render, text, *rest, bos=bos)
        kept = text
        while len(tokens) > room:
            if not kept:
                raise InvalidInput(
                    f"the {what} alone take {len(tokens)} tokens; the model's window holds {self.n_ctx}"
                )
            over = len(tokens) - room
            own = max(1, len(self.tokenize(kept, special=False)))
            cut = over * len(kept) // own + 8  # characters for the tokens over, and a few more
            kept = kept[: max(0, len(kept) - cut)]
            tokens = self.tokenize_prompt(render, kept, *rest, bos=bos)
        if kept is not text:
            log.info("a text of %d characters was cut to %d to fit in %d tokens", len(text), len(kept), room)
        return tokens

    @functools.cached_property
    def controls(self) -> re.Pattern[str] | None:
        """The text of the model's control tokens (``control_text``); read once, ~50 ms."""
        return control_pattern(self.llm, self.vocab)

    def is_eog(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def cached(self, tokens: list[int]) -> int:
        """How many of ``tokens`` (all but the last, which must be evaluated for its logits) the
        KV cache holds already."""
        llm, prefix = self.llm, 0
        for a, b in zip(llm.input_ids[: llm.n_tokens], tokens[:-1], strict=False):
            if a != b:
                break
            prefix += 1
        return prefix

    def prefill(self, tokens: list[int], stop: Event, *, whole: bool = False) -> bool:
        """Evaluate ``tokens`` past the cached prefix in the batches ``llm.eval`` makes (n_batch
        from the prefix on), checking ``stop`` between them; False when it was set. A long prompt
        takes seconds to read (8K tokens: a minute under load on 2 cores), and a caller that went
        away held the model through all of it. Unless ``whole``, the last batch is left for
        ``generate`` to evaluate, as one call would: the same batches, the same logits."""
        return all(not stop.is_set() for _ in self.prefill_steps(tokens, whole=whole))

    def prefill_steps(self, tokens: list[int], *, whole: bool = False) -> Iterator[None]:
        """``prefill``, yielding before each batch (to check a stop, or to pause)."""
        llm = self.llm
        start = self.cached(tokens)
        step = llm.n_batch
        end = len(tokens) if whole else start + (len(tokens) - 1 - start) // step * step
        llm.n_tokens = start  # eval() drops the KV cache beyond this point
        for i in range(start, end, step):
            yield
            llm.eval(tokens[i : min(i + step, end)])

    def last_logits(self, tokens: list[int], stop: Event | None = None) -> Any:
        """Logits after ``tokens``, reusing the KV cache for the prefix already evaluated;
        ``InferenceFailed`` once ``stop`` is set (``prefill``)."""
        import llama_cpp
        import numpy as np

        if not self.prefill(tokens, stop or _NEVER, whole=True):
            raise InferenceFailed("reading the prompt stopped: its caller went away")
        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).astype("float64")

    def continuation_logprobs(self, prefix: list[int], continuation: list[int], stop: Event) -> list[float]:
        """log P(token | everything before it) for each token of ``continuation`` after ``prefix``,
        from one batched evaluation with logits at every position: read a token at a time, a
        label of n tokens was n evaluations (and a long one held the model for minutes). Falls
        back to that where this llama-cpp-python has no batch to ask every position's logits of."""
        llm = self.llm
        batch, context = getattr(llm, "_batch", None), getattr(llm, "_ctx", None)
        if batch is None or context is None or not hasattr(batch, "set_batch") or not prefix:
            return [
                _logprob(self.last_logits(prefix + continuation[:i], stop), t)
                for i, t in enumerate(continuation)
            ]
        import llama_cpp
        import numpy as np

        if not self.prefill(prefix[:-1], stop, whole=True):
            raise InferenceFailed("reading the prompt stopped: its caller went away")
        tokens = [prefix[-1], *continuation[:-1]]  # the logits at each predict the next one
        context.kv_cache_seq_rm(-1, llm.n_tokens, -1)
        found: list[float] = []
        for start in range(0, len(tokens), llm.n_batch):
            if stop.is_set():
                raise InferenceFailed("reading the prompt stopped: its caller went away")
            chunk = tokens[start : start + llm.n_batch]
            batch.set_batch(batch=chunk, n_past=llm.n_tokens, logits_all=True)
            context.decode(batch)
            llm.input_ids[llm.n_tokens : llm.n_tokens + len(chunk)] = chunk
            llm.n_tokens += len(chunk)
            for j in range(len(chunk)):
                ptr = llama_cpp.llama_get_logits_ith(llm.ctx, j)
                logits = np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype("float64")
                found.append(_logprob(logits, continuation[start + j]))
        return found


def _logprob(logits: Any, token: int) -> float:
    """log softmax(logits)[token], computed stably."""
    import numpy as np

    m = float(logits.max())
    return float(logits[token]) - m - float(np.log(np.exp(logits - m).sum()))
