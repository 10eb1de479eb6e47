"""GGUF models in-process through llama-cpp-python: generation, streaming, tokenize, embeddings,
one-pass yes/no reranking and likelihood classification.

Every call holds the loaded instance's lock in a worker thread; the event loop never blocks.
Generation runs our own token loop over ``Llama.generate`` (the same sampler chain
``create_completion`` uses) so that we count tokens exactly, stop at a token boundary when the
consumer goes away, split ``<think>``/``<tool_call>`` blocks as they stream, and pause between
tokens (or prompt batches) for another client's waiting work (``llama_turns``).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
import hashlib
import math
import random
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Generator, Iterator, Sequence
from threading import Event
from typing import Any, TypeVar

from ..catalog.locate import local_path
from ..config import CarConfig
from ..errors import InferenceFailed, InvalidInput, TokenizationError, UnsupportedMode
from ..requests import (
    Classification,
    ClassifyRequest,
    EmbedRequest,
    EmbedResult,
    GenerateParams,
    GenerateRequest,
    RerankRequest,
    RerankResult,
    ThinkingMode,
    TokenUsage,
)
from ..schema import GgufSource, ModelSchema
from ..stream import (
    Done,
    StreamAccumulator,
    StreamEvent,
    TextDelta,
    ThinkingDelta,
    ToolCallDelta,
    ToolCallStart,
)
from . import ggml_cpu
from .base import (
    PAUSE,
    BackendContext,
    GenerationOutput,
    iterate_in_thread,
    label_distribution,
    openmp_thread,
    over_window,
    ranked_result,
    run_stoppable,
)
from .cache import CachedModel
from .chat_template import StopMatcher, TagSplitter, chat_messages, parse_tool_call_block, render_chat
from .gguf_grammar import json_grammar
from .gguf_loaded import LoadedGguf, quiet_llama_cpp
from .llama_turns import Turns, resumable
from .prompts import DEFAULT_RERANK_INSTRUCTION, classify_prompt, rerank_prompt
from .vision import chat_handler, check_vision, has_images, mmproj_path, run_vision, vision_messages

__all__ = ["LLAMA_THREAD", "LlamaCppBackend", "LoadedGguf"]

# Every llama.cpp call of the process runs on this one thread (``base.openmp_thread``: why).
LLAMA_THREAD = openmp_thread("car-llama")
# Texts per turn of that thread when embedding (``LlamaCppBackend._turns``).
EMBED_SLICE = 32
_I = TypeVar("_I")
_R = TypeVar("_R")

MAX_VOCABS = 4  # vocabulary-only loads kept for counting prompt tokens at routing time
# A likelihood label is scored in two spellings, in one turn on the model, after a prompt that
# lists every label: read a token at a time (as it was), a 1,500-token label held SmolLM2 for 6
# minutes while another client's 4-token chat waited 343 s. Each spelling is one batched pass now
# (``LoadedGguf.continuation_logprobs``); labels are class names, and 64 tokens is a long sentence.
MAX_LABEL_TOKENS = 64


class LlamaCppBackend:
    kind = "gguf"

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx
        self.settings = ctx.config.local
        self._vocabs: OrderedDict[str, LoadedGguf] = OrderedDict()
        self._vocab_lock = threading.Lock()

    # --- loading -----------------------------------------------------------------------------

    def _entry(self, model: ModelSchema, *, embedding: bool = False) -> CachedModel:
        path = local_path(model)
        size = model.cost.size_mb or max(1, path.stat().st_size // 2**20)
        key = f"{'gguf-embed' if embedding else 'gguf'}:{model.id}"
        return self.ctx.cache.get_or_load(key, size, lambda: self._load(model, str(path), embedding))

    @staticmethod
    def context_window(model: ModelSchema, config: CarConfig) -> int:
        """The window a GGUF runs with: ``local.n_ctx``, capped by the model's own."""
        return min(config.local.n_ctx, model.context_length or config.local.n_ctx)

    def _load(
        self, model: ModelSchema, path: str, embedding: bool, *, vocab_only: bool = False
    ) -> LoadedGguf:
        import llama_cpp

        quiet_llama_cpp()
        kwargs: dict[str, Any] = {
            "n_ctx": self.context_window(model, self.ctx.config),
            "vocab_only": vocab_only,
            "n_batch": self.settings.n_batch,
            "n_gpu_layers": self.settings.n_gpu_layers,
            "verbose": False,
            "embedding": embedding,
        }
        threads = self.settings.n_threads or ggml_cpu.default_threads()
        if threads:
            kwargs["n_threads"] = threads
        source = model.source
        if embedding:
            # A chat model's GGUF names no pooling; mean over tokens gives one vector per text.
            pooling = (source.pooling if isinstance(source, GgufSource) else None) or "mean"
            kwargs["pooling_type"] = {"none": 0, "mean": 1, "cls": 2, "last": 3}[pooling]
        elif not vocab_only and (projector := mmproj_path(model)) is not None:
            kwargs["chat_handler"] = chat_handler(model, projector)  # images: backends/vision.py
        ggml_cpu.apply(self.settings.repack_weights)  # no AMX repacking where it crashes
        try:
            llm = llama_cpp.Llama(path, **kwargs)
        except (ValueError, RuntimeError) as exc:
            raise InferenceFailed(f"llama.cpp could not load {model.id} from {path}: {exc}") from exc
        meta = llm.metadata
        vocab = llm._model.vocab

        def piece(token_id: int) -> str:
            if token_id < 0:
                return ""
            return llm._model.token_get_text(token_id)

        return LoadedGguf(
            llm=llm,
            template=meta.get("tokenizer.chat_template"),
            bos=piece(llm.token_bos()),
            eos=piece(llm.token_eos()),
            add_bos=meta.get("tokenizer.ggml.add_bos_token", "true") == "true",
            n_ctx=llm.n_ctx(),
            vocab=vocab,
        )

    def warm_up(self, model: ModelSchema) -> None:
        LLAMA_THREAD.submit(self._entry, model).result()

    def vocab(self, model: ModelSchema) -> LoadedGguf:
        """The tokenizer of ``model``: the loaded model's when it is in the cache, else a
        vocabulary-only load (no weights: ~0.2 s, a few MB), kept for the next request."""
        entry = self.ctx.cache.get(f"gguf:{model.id}")
        if entry is not None:
            return entry.instance
        with self._vocab_lock:
            loaded = self._vocabs.get(model.id)
            if loaded is None:
                loaded = self._load(model, str(local_path(model)), False, vocab_only=True)
                self._vocabs[model.id] = loaded
                while len(self._vocabs) > MAX_VOCABS:
                    self._vocabs.popitem(last=False)
            else:
                self._vocabs.move_to_end(model.id)
            return loaded

    def count_prompt_tokens(self, model: ModelSchema, request: GenerateRequest) -> int:
        """The prompt tokens of ``request`` before any truncation: what routing compares with the
        window. Blocking (tokenizing); read-only on the vocabulary, so no model lock is taken."""
        return len(self._render_tokens(self.vocab(model), request, _default_system(model)))

    def count_text_tokens(self, model: ModelSchema, text: str) -> int:
        """The tokens of an answer's ``text`` as written: usage for a server that reports none."""
        return len(self.vocab(model).tokenize(text, special=False)) if text else 0

    # --- generation --------------------------------------------------------------------------

    def _render_tokens(self, loaded: LoadedGguf, request: GenerateRequest, system: str | None) -> list[int]:
        """The prompt's tokens; ``system`` (the catalog's default system prompt) when the request
        brings no system text of its own."""
        params = request.params
        if params.raw_prompt:
            tokens = loaded.tokenize(request.prompt, special=True, add_bos=loaded.add_bos)
        else:
            tools = request.tools
            if tools and (not loaded.template or "tools" not in loaded.template):
                if request.calls_tools():
                    reason = "this model's chat template has no tool support"
                    raise UnsupportedMode("tool-use", "gguf", reason, param="tools")
                tools = None  # tool_choice "none": context only, and this template cannot show them
            choice = params.tool_choice
            if tools and choice not in (None, "auto", "none"):
                # Not enforced, it answered in text (finish "stop") or called another tool.
                reason = (
                    f"tool_choice {choice!r} cannot be enforced on a local model (it may answer in "
                    'text or call another tool): send "auto", or use a hosted model'
                )
                raise UnsupportedMode("tool_choice", "gguf", reason, param="tool_choice")

            def render(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
                if system and not any(m["role"] == "system" for m in messages):
                    messages = [{"role": "system", "content": system}, *messages]
                return render_chat(
                    loaded.template,
                    messages,
                    bos_token=loaded.bos,
                    eos_token=loaded.eos,
                    tools=tools,
                    thinking=params.thinking,
                )

            as_text = not loaded.template or "tool_calls" not in loaded.template
            tokens = loaded.tokenize_prompt(
                render, chat_messages(request, "gguf", calls_as_text=as_text), tools
            )
        return tokens

    def _prompt_tokens(
        self,
        loaded: LoadedGguf,
        request: GenerateRequest,
        system: str | None,
        rendered: list[int] | None = None,
    ) -> tuple[list[int], bool]:
        params = request.params
        tokens = self._render_tokens(loaded, request, system) if rendered is None else rendered
        # Keep the tail of an over-long prompt, leaving min(max_tokens, ctx/4) for the answer.
        headroom = min(params.max_tokens, loaded.n_ctx // 4)
        max_prompt = loaded.n_ctx - headroom
        if len(tokens) <= max_prompt:
            return tokens, False
        keep_bos = tokens[:1] if loaded.add_bos and tokens and tokens[0] == loaded.llm.token_bos() else []
        return keep_bos + tokens[len(tokens) - max_prompt + len(keep_bos) :], True

    def _prepare(self, model: ModelSchema, request: GenerateRequest) -> tuple[Any, Any]:
        """What a generation needs before its turn: the prompt's tokens (before truncation) and the
        JSON grammar (a 60,000-value enum compiles in seconds), on the vocabulary alone; for images,
        the vision chat's messages with every image fetched (a slow URL held every GGUF client)."""
        if has_images(request):
            check_vision(model, request)
            system, private_ok = _default_system(model), self.ctx.private_urls_ok  # (a client's URLs)
            return vision_messages(request, system, private_ok=private_ok), None
        vocab = self.vocab(model)
        return self._render_tokens(vocab, request, _default_system(model)), json_grammar(request, vocab.llm)

    def _run(
        self,
        model: ModelSchema,
        request: GenerateRequest,
        cancelled: Event,
        *,
        rendered: Any,
        grammar: Any,
    ) -> Iterator[StreamEvent]:
        """The blocking token loop; yields stream events, ending with ``Done``. ``rendered`` and
        ``grammar``: ``_prepare``'s (``rendered`` the vision chat's messages for images)."""
        entry = self._entry(model)
        params = request.params
        with entry.lock:
            loaded: LoadedGguf = entry.instance
            llm = loaded.llm
            if has_images(request):
                yield from run_vision(llm, model, request, rendered, cancelled)
                return
            tokens, truncated = self._prompt_tokens(loaded, request, _default_system(model), rendered)
            max_tokens = min(params.max_tokens, loaded.n_ctx - len(tokens))
            llm.set_seed(seed32(params.seed) if params.seed is not None else random.getrandbits(32))
            if params.temperature == 0 or params.seed is not None:
                # Reusing the cached KV prefix changes the last position's logits in the low bits
                # (a 1-token batch instead of the whole prompt), enough to flip a greedy choice.
                # Requests that ask for reproducibility get a full prefill; others reuse the prefix.
                llm.reset()
            # A raw prompt's answer is raw text: its "<think>" was split off and /v1/completions,
            # which shows no thinking, lost it without a trace.
            tags = {"think"} if not params.raw_prompt else set()
            splitter = TagSplitter(tags | {"tool_call"} if request.calls_tools() else tags)
            stops = StopMatcher(params.stop)
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            acc = StreamAccumulator()
            tool_index = 0
            generated = 0

            def events(segments: list[tuple[str, str]]) -> Iterator[StreamEvent]:
                nonlocal tool_index
                for kind, piece in segments:
                    for event in self._segment_events(kind, piece, params.thinking, tool_index):
                        acc.push(event)
                        yield event
                    tool_index += kind == "tool_call"

            behind = getattr(cancelled, "behind", None)  # the reader left its stream unread

            def pause_due() -> bool:
                return LLAMA_THREAD.others_waiting() or (behind is not None and behind())

            # Greedy decoding draws nothing: its seed does not keep other clients waiting to the end.
            seed = None if params.temperature == 0 else params.seed
            turns = Turns(llm, entry.lock, pause_due, allowed=resumable(llm, seed=seed))
            for _ in loaded.prefill_steps(tokens):
                if cancelled.is_set():
                    return  # the caller went away while the prompt was read
                if turns.due():
                    yield from turns.pause()

            stopped = False
            start = functools.partial(_sample, llm, params, grammar)
            with contextlib.closing(turns.tokens(start, tokens)) as generation:
                for token in generation:
                    if token is PAUSE:
                        yield token
                    elif cancelled.is_set() or loaded.is_eog(token):
                        break
                    else:
                        generated += 1
                        text, stopped = stops.feed(decoder.decode(llm.detokenize([token])))
                        yield from events(splitter.feed(text))
                        if stopped or generated >= max_tokens:
                            break
            # A character whose bytes did not all come before the end (max_tokens cut an emoji in
            # two) is left out: decoded whole, it was a U+FFFD the model never wrote.
            decoder.reset()
            tail = "" if stopped else stops.flush()
            yield from events(splitter.feed(tail) + splitter.flush())
        usage = TokenUsage(
            prompt_tokens=len(tokens),
            completion_tokens=generated,
            total_tokens=len(tokens) + generated,
            context_window=loaded.n_ctx,
            cost_usd=0.0,
            needs_compaction=truncated,
        )
        yield _done(acc, usage, cut=generated >= max_tokens and not stopped)

    @staticmethod
    def _segment_events(kind: str, piece: str, thinking: ThinkingMode, index: int) -> Iterator[StreamEvent]:
        if kind == "text":
            yield TextDelta(text=piece)
        elif kind == "think":
            if thinking is not ThinkingMode.OFF:
                yield ThinkingDelta(text=piece)
        else:
            parsed = parse_tool_call_block(piece)
            if parsed is None:
                yield TextDelta(text=f"<tool_call>{piece}</tool_call>")
            else:
                name, arguments = parsed
                # unique, as OpenAI's: "call_0" in every answer collided across a tool loop's turns
                yield ToolCallStart(index=index, id=f"call_{uuid.uuid4().hex[:24]}", name=name)
                yield ToolCallDelta(index=index, arguments=arguments)

    async def stream(self, model: ModelSchema, request: GenerateRequest) -> AsyncGenerator[StreamEvent, None]:
        # The prompt is rendered and tokenized on a worker thread (the vocabulary is read-only),
        # not in a turn of the llama.cpp thread: a huge prompt (4,096 turns: 1.3 s here) delays
        # its own request, not every other client's.
        rendered, grammar = await asyncio.to_thread(self._prepare, model, request)
        run = functools.partial(self._run, model, request, rendered=rendered, grammar=grammar)
        async with contextlib.aclosing(iterate_in_thread(run, LLAMA_THREAD)) as events:
            async for event in events:
                yield event

    async def generate(self, model: ModelSchema, request: GenerateRequest) -> GenerationOutput:
        start = time.perf_counter()
        ttft: float | None = None
        async with contextlib.aclosing(self.stream(model, request)) as events:
            async for event in events:
                if ttft is None and not isinstance(event, Done):
                    ttft = (time.perf_counter() - start) * 1000
                if isinstance(event, Done):
                    return GenerationOutput.from_done(event, ttft)
        raise InferenceFailed(f"{model.id}: generation ended without a result")

    # --- tokens ------------------------------------------------------------------------------

    # Tokens go through the vocabulary alone (no weights) on a worker thread, not a turn of the shared
    # llama thread: detokenizing 500,000 ids (a Python loop) held another client's answer 45 s.
    async def tokenize(self, model: ModelSchema, text: str) -> list[int]:
        return await asyncio.to_thread(lambda: self.vocab(model).tokenize(text, special=False))

    async def detokenize(self, model: ModelSchema, tokens: list[int]) -> str:
        def text() -> str:
            llm = self.vocab(model).llm
            n_vocab = llm.n_vocab()
            bad = [t for t in tokens if not 0 <= t < n_vocab]
            if bad:
                raise TokenizationError(f"token ids out of range for {model.id} (vocab {n_vocab}): {bad[:5]}")
            return llm.detokenize(tokens).decode("utf-8", errors="replace")

        return await asyncio.to_thread(text)

    # --- embeddings, rerank, classify ---------------------------------------------------------

    async def _turns(
        self, model: ModelSchema, items: Sequence[_I], step: Callable[[LoadedGguf, _I, Event], _R], **kw: bool
    ) -> list[_R]:
        """``step`` on each item, a turn of the llama.cpp thread each (``fair.FairExecutor``): other
        clients' work runs between items (a document of 1,000 took 0.1 s, all of them 100 s in one
        turn), and a caller that went away stops at the next one."""

        def work(item: _I, stop: Event) -> _R:
            entry = self._entry(model, **kw)
            with entry.lock:
                return step(entry.instance, item, stop)

        return [await run_stoppable(functools.partial(work, item), LLAMA_THREAD) for item in items]

    async def embed(self, model: ModelSchema, request: EmbedRequest) -> EmbedResult:
        instruction = request.instruction or model.query_instruction
        texts = [
            f"Instruct: {instruction}\nQuery: {t}" if request.is_query and instruction else t
            for t in request.texts
        ]
        parts = [texts[i : i + EMBED_SLICE] for i in range(0, len(texts), EMBED_SLICE)]

        def counted(loaded: LoadedGguf, part: list[str], _: Event) -> tuple[list[int], int]:
            """Each text's tokens, uncut, and the window llama.cpp cuts embeddings at (n_batch)."""
            return [len(loaded.llm.tokenize(t.encode("utf-8"))) for t in part], loaded.llm.n_batch

        counts = await self._turns(model, parts, counted, embedding=True)
        window = counts[0][1] if counts else 0
        cut = over_window(model, [n for part, _ in counts for n in part], window, request.truncate)
        done = await self._turns(
            model,
            parts,
            lambda loaded, part, _: loaded.llm.embed(part, normalize=request.normalize),
            embedding=True,
        )
        vectors = [v for part in done for v in part]
        dims = len(vectors[0]) if vectors else 0
        return EmbedResult.model_construct(
            embeddings=vectors,
            model_used=model.id,
            dimensions=dims,
            prompt_tokens=sum(min(n, window) for part, _ in counts for n in part),
            truncated=cut,
        )

    async def rerank(self, model: ModelSchema, request: RerankRequest) -> RerankResult:
        """Yes/no reranking: one forward pass per document (the shared prefix stays in the KV cache
        unless another request ran between two documents); score = sigmoid(logit("yes") -
        logit("no")) at the last position."""
        instruction = request.instruction or DEFAULT_RERANK_INSTRUCTION

        def score(loaded: LoadedGguf, doc: str, stop: Event) -> float:
            yes, no = (loaded.tokenize(word, special=False)[0] for word in ("yes", "no"))
            tokens = loaded.fit_prompt(
                lambda d, q, i: rerank_prompt(i, q, d), doc, request.query, instruction,
                room=loaded.n_ctx - 1, what="query and instruction", bos=False,
            )  # fmt: skip
            logits = loaded.last_logits(tokens, stop)
            return 1.0 / (1.0 + math.exp(-(logits[yes] - logits[no])))

        scores = await self._turns(model, request.documents, score)
        return ranked_result(request, scores, model.id, "yes-no-logits")

    async def classify(self, model: ModelSchema, request: ClassifyRequest) -> Classification:
        """Zero-shot: log P(label | prompt) for each label, each followed by end-of-turn, summed
        over the label's tokens (and its capitalised spelling), normalised across labels."""

        def spellings(loaded: LoadedGguf, label: str) -> list[list[int]]:
            eot = loaded.llm.token_eos()
            named = dict.fromkeys([label, label[:1].upper() + label[1:]])
            return [[*loaded.tokenize(spelling, special=False), eot] for spelling in named]

        def prompt_tokens(loaded: LoadedGguf, _: object, __: Event) -> list[int]:
            def render(text: str, labels: list[str]) -> str:
                return render_chat(
                    loaded.template,
                    [{"role": "user", "content": classify_prompt(text, labels)}],
                    bos_token=loaded.bos,
                    eos_token=loaded.eos,
                    thinking=ThinkingMode.OFF,
                )

            # Every label is scored after the same prompt, with room for the longest of them
            # (past the window, the text is cut; its end was kept, and the labels went).
            longest = max(len(c) for label in request.labels for c in spellings(loaded, label))
            if longest - 1 > MAX_LABEL_TOKENS:
                label = max(request.labels, key=lambda x: max(len(c) for c in spellings(loaded, x)))
                raise InvalidInput(
                    f"label {_clip(label)!r} is {longest - 1} tokens: likelihood classification takes"
                    f' class names of at most {MAX_LABEL_TOKENS} tokens (method "embedding" takes'
                    " longer ones)",
                    param="labels",
                )
            room = loaded.n_ctx - longest - 1
            return loaded.fit_prompt(render, request.text, request.labels, room=room, what="labels")

        def logp(loaded: LoadedGguf, label: str, stop: Event) -> float:
            scores = [
                math.fsum(loaded.continuation_logprobs(base, continuation, stop))
                for continuation in spellings(loaded, label)
            ]
            return _logsumexp(scores)

        [base] = await self._turns(model, [None], prompt_tokens)
        logps = await self._turns(model, request.labels, logp)
        return label_distribution(request.labels, logps, model.id, "likelihood")


def seed32(seed: int) -> int:
    """A request's seed (64-bit) as llama.cpp's 32-bit one: itself where it fits, else a hash of it
    into 0..2**32 - 2. It was cut to 32 bits: -1 became 0xFFFFFFFF, llama.cpp's "pick a random
    seed" (a seeded request answered differently each time), and 2**32 + 42 answered as 42."""
    if 0 <= seed < 0xFFFFFFFF:
        return seed
    digest = hashlib.blake2b(seed.to_bytes(9, "little", signed=True), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 0xFFFFFFFF


def _default_system(model: ModelSchema) -> str | None:
    return model.source.system_prompt if isinstance(model.source, GgufSource) else None


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _logsumexp(values: list[float]) -> float:
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def _sample(llm: Any, params: GenerateParams, grammar: Any, ids: list[int]) -> Generator[int, Any, None]:
    """llama.cpp's token generator for ``ids`` under the request's sampling parameters."""
    return llm.generate(
        ids,
        top_k=params.top_k if params.top_k is not None else 40,
        top_p=params.top_p,
        min_p=0.05,
        temp=params.temperature,
        repeat_penalty=params.repeat_penalty,
        frequency_penalty=params.frequency_penalty,
        presence_penalty=params.presence_penalty,
        grammar=grammar,
    )


def _done(acc: StreamAccumulator, usage: TokenUsage, *, cut: bool) -> Done:
    """The last event: what was written, with the reason it ended (``cut``: at ``max_tokens``)."""
    calls = acc.tool_calls()
    finish = "tool_calls" if calls else "length" if cut else "stop"
    return Done(text=acc.text, tool_calls=calls, thinking=acc.thinking, usage=usage, finish_reason=finish)
