"""sentence-transformers models in-process: embeddings, embedding-similarity rerank and classify,
and cross-encoder rerank.

Models load from a local folder only (``local_files_only``): a packaged model or a pulled
snapshot. Queries of models that declare a ``query_instruction`` (Qwen3-Embedding) are written as
``Instruct: {instruction}\\nQuery: {text}``; other models embed queries as they are.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from ..catalog.locate import local_path
from ..errors import InferenceFailed, UnsupportedMode
from ..requests import (
    Classification,
    ClassifyRequest,
    EmbedRequest,
    EmbedResult,
    RerankRequest,
    RerankResult,
)
from ..schema import ModelSchema, SentenceSource
from .base import (
    BackendContext,
    cosine,
    label_distribution,
    openmp_thread,
    over_window,
    ranked_result,
    run_blocking,
)
from .cache import CachedModel

__all__ = ["TORCH_THREAD", "SentenceBackend"]

# Every sentence-transformers (torch) call of the process runs on this one thread
# (``base.openmp_thread``: why).
TORCH_THREAD = openmp_thread("car-torch")

# Similarities (cosine, in [-1, 1]) become a distribution with softmax(sim / T); T = 0.05 turns a
# 0.1 gap in similarity into a 7x odds ratio, roughly how far apart an obvious label sits.
CLASSIFY_TEMPERATURE = 0.05
BATCH_SIZE = 32
# A large request is encoded a slice at a time, each slice its own turn on the thread every
# sentence model shares: other requests' work runs between them, and a request whose caller has
# gone stops at the next one. Texts are first cut into coarse slices (``_slices``: at most SLICE
# texts and about SLICE_CHARS characters, a text counting up to the ~2,000 characters a 512-token
# window reads) and each coarse slice is tokenized in a short turn of its own (about 1% of the
# encode time); it is then encoded in turns of at most SLICE_TOKENS tokens (``_by_tokens``). By
# characters alone a slice of 256 CJK or punctuation texts of 128 characters (33,000 tokens, 4.5x
# what as many English ones read) took 7.6 s on two cores, during which a one-text embedding
# waited; 4,096 tokens are about 0.8 s of all-MiniLM-L6-v2 there. (2,048 texts of 2,000
# characters in one turn took 96 s before slicing.)
SLICE = 256
SLICE_CHARS = 32_768
SLICE_TOKENS = 4_096
_X = TypeVar("_X")


def _slices(items: Sequence[_X], size: Callable[[_X], int]) -> Iterator[list[_X]]:
    part: list[_X] = []
    chars = 0
    for item in items:
        n = min(size(item), 2_048)
        if part and (len(part) >= SLICE or chars + n > SLICE_CHARS):
            yield part
            part, chars = [], 0
        part.append(item)
        chars += n
    if part:
        yield part


def _by_tokens(items: list[_X], counts: list[int], budget: int = SLICE_TOKENS) -> Iterator[list[_X]]:
    """``items`` in runs of at most ``budget`` tokens (``counts``: each item's), one item at least."""
    start, total = 0, 0
    for i, n in enumerate(counts):
        if i > start and total + n > budget:
            yield items[start:i]
            start, total = i, 0
        total += n
    if start < len(items):
        yield items[start:]


async def _in_turns(
    run: Callable[[list[_X]], Any],
    count: Callable[[list[_X]], list[int]],
    items: Sequence[_X],
    size: Callable[[_X], int],
) -> tuple[list[Any], int]:
    """``run`` on runs of ``items`` of at most SLICE_TOKENS tokens (``count``: each item's
    tokens, blocking), a turn on the torch thread each; the results and the tokens read."""
    results, tokens = [], 0
    for coarse in _slices(items, size):
        counts = await run_blocking(functools.partial(count, coarse), TORCH_THREAD)
        tokens += sum(counts)
        for part in _by_tokens(coarse, counts):
            results.append(await run_blocking(functools.partial(run, part), TORCH_THREAD))
    return results, tokens


def _quiet_transformers() -> None:
    """No download or "Loading weights" progress bars on the user's terminal."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - sentence-transformers always brings transformers
        pass


class SentenceBackend:
    kind = "sentence"

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx

    def _entry(self, model: ModelSchema) -> CachedModel:
        path = local_path(model)
        size = model.cost.size_mb or 500

        def load() -> Any:
            source = model.source
            _quiet_transformers()
            try:
                if isinstance(source, SentenceSource) and source.cross_encoder:
                    from sentence_transformers import CrossEncoder

                    return CrossEncoder(str(path), device="cpu", local_files_only=True)
                from sentence_transformers import SentenceTransformer

                return SentenceTransformer(str(path), device="cpu", local_files_only=True)
            except (OSError, ValueError) as exc:
                raise InferenceFailed(f"could not load {model.id} from {path}: {exc}") from exc

        return self.ctx.cache.get_or_load(f"sentence:{model.id}", size, load)

    @staticmethod
    def _is_cross_encoder(model: ModelSchema) -> bool:
        return isinstance(model.source, SentenceSource) and model.source.cross_encoder

    def _no_cross_encoder(self, model: ModelSchema) -> None:
        if self._is_cross_encoder(model):
            raise UnsupportedMode(
                "embed", "sentence cross-encoder", f"{model.id} scores pairs; it has no embeddings"
            )

    def warm_up(self, model: ModelSchema) -> None:
        TORCH_THREAD.submit(self._entry, model).result()

    @staticmethod
    def _window(instance: Any) -> int:
        return getattr(instance, "max_seq_length", None) or getattr(instance, "max_length", None) or 512

    def _token_counts(self, model: ModelSchema, items: list[Any]) -> list[int]:
        """The tokens the model reads of each text or (query, document) pair, special tokens
        included and cut at its window; blocking (the fast tokenizer, ids only)."""
        entry = self._entry(model)
        instance = entry.instance
        limit = self._window(instance)
        with entry.lock:
            if items and isinstance(items[0], tuple):
                firsts, seconds = [a for a, _ in items], [b for _, b in items]
                ids = instance.tokenizer(firsts, seconds, truncation=True, max_length=limit)["input_ids"]
            else:
                ids = instance.tokenizer(items, truncation=True, max_length=limit)["input_ids"]
        return [len(i) for i in ids]

    def _cut_texts(self, model: ModelSchema, texts: list[str], truncate: bool) -> tuple[list[int], list[int]]:
        """The indices of ``texts`` longer than the model's window (``over_window``) and the
        tokens the model reads of each (cut at it); blocking."""
        entry = self._entry(model)
        with entry.lock:
            ids = entry.instance.tokenizer(texts, truncation=False, verbose=False)["input_ids"]
        window, full = self._window(entry.instance), [len(i) for i in ids]
        return over_window(model, full, window, truncate), [min(n, window) for n in full]

    def _encode_part(self, model: ModelSchema, texts: list[str], normalize: bool) -> Any:
        """One run: a (len(texts), dim) float32 array; blocking."""
        entry = self._entry(model)
        with entry.lock:
            return entry.instance.encode(
                texts,
                batch_size=BATCH_SIZE,
                normalize_embeddings=normalize,
                convert_to_numpy=True,
                show_progress_bar=False,
            )

    async def _encode(
        self, model: ModelSchema, texts: list[str], normalize: bool, counts: list[int] | None = None
    ) -> tuple[Any, int]:
        """All of ``texts`` (``_encode_part``), a run a turn on the torch thread; the vectors and
        the tokens read. ``counts``: each text's tokens, when counted already (not twice)."""
        import numpy as np

        self._no_cross_encoder(model)
        count: Callable[[list[str]], list[int]] = functools.partial(self._token_counts, model)
        if counts is not None:
            left = iter(counts)  # the slices come in order

            def count(part: list[str]) -> list[int]:
                return [next(left) for _ in part]

        parts, tokens = await _in_turns(
            lambda part: self._encode_part(model, part, normalize), count, texts, len
        )
        return np.concatenate(parts), tokens

    def _predict_part(self, model: ModelSchema, pairs: list[tuple[str, str]]) -> Any:
        entry = self._entry(model)
        with entry.lock:
            return entry.instance.predict(pairs, batch_size=BATCH_SIZE, show_progress_bar=False)

    @staticmethod
    def _query_texts(model: ModelSchema, texts: list[str], instruction: str | None) -> list[str]:
        instruction = instruction or model.query_instruction
        if not (instruction and model.query_instruction):
            return texts
        return [f"Instruct: {instruction}\nQuery: {t}" for t in texts]

    async def embed(self, model: ModelSchema, request: EmbedRequest) -> EmbedResult:
        texts = (
            self._query_texts(model, request.texts, request.instruction)
            if request.is_query
            else request.texts
        )
        if not texts:
            return EmbedResult.model_construct(embeddings=[], model_used=model.id, dimensions=0)
        self._no_cross_encoder(model)
        # Cut silently, two texts sharing their first 256 tokens came back as one vector.
        check = functools.partial(self._cut_texts, model, texts, request.truncate)
        cut, counts = await run_blocking(check, TORCH_THREAD)
        vectors, tokens = await self._encode(model, texts, request.normalize, counts)
        # model_construct: these are floats from numpy already; validating 1000x384 of them one by
        # one would cost more than the lists themselves.
        return EmbedResult.model_construct(
            embeddings=vectors.tolist(),
            model_used=model.id,
            dimensions=int(vectors.shape[1]),
            prompt_tokens=tokens,
            truncated=cut,
        )

    async def rerank(self, model: ModelSchema, request: RerankRequest) -> RerankResult:
        if not request.documents:
            return RerankResult(ranked=[], model_used=model.id, method="none")
        if self._is_cross_encoder(model):
            parts, _ = await _in_turns(
                lambda part: self._predict_part(model, part),
                functools.partial(self._token_counts, model),
                [(request.query, d) for d in request.documents],
                lambda pair: len(pair[0]) + len(pair[1]),
            )
            scores, method = [float(x) for part in parts for x in part], "cross-encoder"
        else:
            query = self._query_texts(model, [request.query], request.instruction)
            vectors, _ = await self._encode(model, query + request.documents, normalize=True)
            scores, method = [cosine(x) for x in vectors[1:] @ vectors[0]], "embedding-similarity"
        return ranked_result(request, scores, model.id, method)

    async def classify(self, model: ModelSchema, request: ClassifyRequest) -> Classification:
        """Cosine similarity between the text and each label, softmax-normalised."""
        vectors, _ = await self._encode(model, [request.text, *request.labels], normalize=True)
        logits = [float(x) / CLASSIFY_TEMPERATURE for x in vectors[1:] @ vectors[0]]
        return label_distribution(request.labels, logits, model.id, "embedding")
