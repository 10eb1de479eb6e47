"""sentence-transformers models in-process: embeddings, embedding-similarity rerank and classify,
and cross-encoder rerank.

Models load from a local folder only (``local_files_only``): a packaged model or a pulled
snapshot. Queries of models that declare a ``query_instruction`` (Qwen3-Embedding) are written as
``Instruct: {instruction}\\nQuery: {text}``; other models embed queries as they are.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
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
from .base import BackendContext, label_distribution, openmp_thread, ranked_result, run_stoppable
from .cache import CachedModel

__all__ = ["TORCH_THREAD", "SentenceBackend"]

# Every sentence-transformers (torch) call of the process runs on this one thread
# (``base.openmp_thread``: why).
TORCH_THREAD = openmp_thread("car-torch")

# Similarities (cosine, in [-1, 1]) become a distribution with softmax(sim / T); T = 0.05 turns a
# 0.1 gap in similarity into a 7x odds ratio, roughly how far apart an obvious label sits.
CLASSIFY_TEMPERATURE = 0.05
BATCH_SIZE = 32
# A large request is encoded this many texts at a time, checking between slices whether its caller
# has gone (``_sliced``): a slice of short texts takes 0.1-0.5 s here, long ones a few seconds.
SLICE = 256
_X = TypeVar("_X")


def _sliced(run: Callable[[list[_X]], Any], items: Sequence[_X], stop: threading.Event | None) -> Any:
    """``run(items)`` a ``SLICE`` at a time, results concatenated (numpy rows), stopping with
    ``InferenceFailed`` once ``stop`` is set: an abandoned request frees the model's thread, which
    every sentence model shares, within a slice."""
    import numpy as np

    if len(items) <= SLICE:
        return run(list(items))
    parts = []
    for start in range(0, len(items), SLICE):
        if stop is not None and stop.is_set():
            raise InferenceFailed("stopped: the caller went away")
        parts.append(run(list(items[start : start + SLICE])))
    return np.concatenate(parts)


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

    def _encode(
        self,
        model: ModelSchema,
        texts: list[str],
        normalize: bool,
        count: bool = False,
        stop: threading.Event | None = None,
    ) -> Any:
        """A (len(texts), dim) float32 array, and with ``count`` the number of tokens the model
        read (special tokens included, each text cut at its window); blocking, stopping between
        slices once ``stop`` is set."""
        if self._is_cross_encoder(model):
            raise UnsupportedMode(
                "embed", "sentence cross-encoder", f"{model.id} scores pairs; it has no embeddings"
            )
        entry = self._entry(model)
        with entry.lock:
            vectors = _sliced(
                lambda part: entry.instance.encode(
                    part,
                    batch_size=BATCH_SIZE,
                    normalize_embeddings=normalize,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                ),
                texts,
                stop,
            )
            if not count:
                return vectors
            # The fast tokenizer again, ids only: about 1% of the encode time.
            limit = entry.instance.max_seq_length
            ids = entry.instance.tokenizer(texts, truncation=True, max_length=limit)["input_ids"]
            return vectors, sum(len(i) for i in ids)

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

        def work(stop: threading.Event) -> EmbedResult:
            if not texts:
                return EmbedResult.model_construct(embeddings=[], model_used=model.id, dimensions=0)
            vectors, tokens = self._encode(model, texts, request.normalize, count=True, stop=stop)
            # model_construct: these are floats from numpy already; validating 1000x384 of them
            # one by one would cost more than the lists themselves.
            return EmbedResult.model_construct(
                embeddings=vectors.tolist(),
                model_used=model.id,
                dimensions=int(vectors.shape[1]),
                prompt_tokens=tokens,
            )

        return await run_stoppable(work, TORCH_THREAD)

    async def rerank(self, model: ModelSchema, request: RerankRequest) -> RerankResult:
        if not request.documents:
            return RerankResult(ranked=[], model_used=model.id, method="none")

        def work(stop: threading.Event) -> tuple[list[float], str]:
            if self._is_cross_encoder(model):
                entry = self._entry(model)
                with entry.lock:
                    scores = _sliced(
                        lambda part: entry.instance.predict(
                            part, batch_size=BATCH_SIZE, show_progress_bar=False
                        ),
                        [(request.query, d) for d in request.documents],
                        stop,
                    )
                return [float(s) for s in scores], "cross-encoder"
            query = self._query_texts(model, [request.query], request.instruction)
            vectors = self._encode(model, query + request.documents, normalize=True, stop=stop)
            sims = vectors[1:] @ vectors[0]
            return [float(s) for s in sims], "embedding-similarity"

        scores, method = await run_stoppable(work, TORCH_THREAD)
        return ranked_result(request, scores, model.id, method)

    async def classify(self, model: ModelSchema, request: ClassifyRequest) -> Classification:
        """Cosine similarity between the text and each label, softmax-normalised."""

        def work(stop: threading.Event) -> list[float]:
            vectors = self._encode(model, [request.text, *request.labels], normalize=True, stop=stop)
            return [float(s) / CLASSIFY_TEMPERATURE for s in vectors[1:] @ vectors[0]]

        logits = await run_stoppable(work, TORCH_THREAD)
        return label_distribution(request.labels, logits, model.id, "embedding")
