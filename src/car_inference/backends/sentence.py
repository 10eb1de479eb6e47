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
from .base import BackendContext, label_distribution, openmp_thread, ranked_result, run_blocking
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
# sentence model shares (``_slices``): other requests' work runs between them, and a request whose
# caller has gone stops at the next one. A slice holds at most SLICE texts and about SLICE_CHARS
# characters (a text counts up to the ~2,000 characters a 512-token window reads): 2,048 texts of
# 2,000 characters took 96 s in one turn, during which a one-text embedding waited.
SLICE = 256
SLICE_CHARS = 32_768
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


async def _in_turns(
    run: Callable[[list[_X]], Any], items: Sequence[_X], size: Callable[[_X], int]
) -> list[Any]:
    """``run`` on each slice of ``items`` (``_slices``), a turn on the torch thread each."""
    return [await run_blocking(functools.partial(run, part), TORCH_THREAD) for part in _slices(items, size)]


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

    def warm_up(self, model: ModelSchema) -> None:
        TORCH_THREAD.submit(self._entry, model).result()

    def _encode_part(self, model: ModelSchema, texts: list[str], normalize: bool) -> tuple[Any, int]:
        """One slice: a (len(texts), dim) float32 array and the number of tokens the model read
        (special tokens included, each text cut at its window); blocking."""
        if self._is_cross_encoder(model):
            raise UnsupportedMode(
                "embed", "sentence cross-encoder", f"{model.id} scores pairs; it has no embeddings"
            )
        entry = self._entry(model)
        with entry.lock:
            vectors = entry.instance.encode(
                texts,
                batch_size=BATCH_SIZE,
                normalize_embeddings=normalize,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            # The fast tokenizer again, ids only: about 1% of the encode time.
            limit = entry.instance.max_seq_length
            ids = entry.instance.tokenizer(texts, truncation=True, max_length=limit)["input_ids"]
            return vectors, sum(len(i) for i in ids)

    async def _encode(self, model: ModelSchema, texts: list[str], normalize: bool) -> tuple[Any, int]:
        """All of ``texts`` (``_encode_part``), a slice a turn on the torch thread."""
        import numpy as np

        parts = await _in_turns(lambda part: self._encode_part(model, part, normalize), texts, len)
        return np.concatenate([v for v, _ in parts]), sum(n for _, n in parts)

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
        vectors, tokens = await self._encode(model, texts, request.normalize)
        # model_construct: these are floats from numpy already; validating 1000x384 of them one by
        # one would cost more than the lists themselves.
        return EmbedResult.model_construct(
            embeddings=vectors.tolist(),
            model_used=model.id,
            dimensions=int(vectors.shape[1]),
            prompt_tokens=tokens,
        )

    async def rerank(self, model: ModelSchema, request: RerankRequest) -> RerankResult:
        if not request.documents:
            return RerankResult(ranked=[], model_used=model.id, method="none")
        if self._is_cross_encoder(model):
            parts = await _in_turns(
                lambda part: self._predict_part(model, part),
                [(request.query, d) for d in request.documents],
                lambda pair: len(pair[0]) + len(pair[1]),
            )
            scores, method = [float(x) for part in parts for x in part], "cross-encoder"
        else:
            query = self._query_texts(model, [request.query], request.instruction)
            vectors, _ = await self._encode(model, query + request.documents, normalize=True)
            scores, method = [float(x) for x in vectors[1:] @ vectors[0]], "embedding-similarity"
        return ranked_result(request, scores, model.id, method)

    async def classify(self, model: ModelSchema, request: ClassifyRequest) -> Classification:
        """Cosine similarity between the text and each label, softmax-normalised."""
        vectors, _ = await self._encode(model, [request.text, *request.labels], normalize=True)
        logits = [float(x) / CLASSIFY_TEMPERATURE for x in vectors[1:] @ vectors[0]]
        return label_distribution(request.labels, logits, model.id, "embedding")
