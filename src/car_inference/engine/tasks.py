"""The tasks besides generation: tokenize, detokenize, embed, rerank, classify.

With no model named, each uses the configured model for its capability (``[preferred]`` then
``[defaults]`` in config.toml), else the first available local model that can do it.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .. import tracing
from ..backends.base import SegmentCallback, Tokenizer, VideoChecker, cosine, ranked_result
from ..backends.media_files import readable_file
from ..errors import (
    CircuitOpen,
    ConfigError,
    InferenceError,
    InvalidInput,
    ModelUnavailable,
    ProviderError,
    SpendLimitExceeded,
    UnsupportedMode,
    expect,
)
from ..requests import (
    Classification,
    ClassifyRequest,
    EmbedRequest,
    EmbedResult,
    GenerateImageRequest,
    GenerateImageResult,
    GenerateVideoRequest,
    GenerateVideoResult,
    GroundRequest,
    GroundResult,
    RerankRequest,
    RerankResult,
    SynthesizeRequest,
    SynthesizeResult,
    TokenizeResult,
    TranscribeRequest,
    TranscribeResult,
)
from ..routing import InferenceTask
from ..routing.media import MEDIA_FAMILY, choose_media
from ..schema import ModelCapability, ModelSchema
from ..textcheck import unpaired_surrogate
from .lifecycle import Lifecycle
from .media import image_cost, run_media, video_cost, with_suffix_format
from .speech import (
    charged,
    list_voices,
    speech_model,
    synthesis_cost,
    transcription_cost,
    with_output_format,
    within_spend,
)

if TYPE_CHECKING:
    from ..backends.base import Backend
    from ..backends.voices import VoiceList
    from ..config import CarConfig
    from ..registry import UnifiedRegistry
    from ..routing import AdaptiveRouter, OutcomeTracker, SpendControl

__all__ = ["TaskMixin"]

STT, TTS = ModelCapability.SPEECH_TO_TEXT, ModelCapability.TEXT_TO_SPEECH
log = logging.getLogger("car_inference.engine")

_MEDIA_TASK = {
    ModelCapability.IMAGE_GENERATION: InferenceTask.GENERATE_IMAGE,
    ModelCapability.VIDEO_GENERATION: InferenceTask.GENERATE_VIDEO,
}
_MEDIA_METHODS = {
    ModelCapability.IMAGE_GENERATION: "generate_image",
    ModelCapability.VIDEO_GENERATION: "generate_video",
}


class TaskMixin(Lifecycle):
    # Provided by InferenceEngine.
    registry: UnifiedRegistry
    config: CarConfig
    spend: SpendControl
    tracker: OutcomeTracker
    router: AdaptiveRouter

    if TYPE_CHECKING:  # provided by InferenceEngine and the other mixins

        def resolve(self, name: str) -> ModelSchema: ...
        def default_model(self, capability: ModelCapability) -> ModelSchema | None: ...
        def _runnable(self, model: ModelSchema) -> Backend: ...
        def _task_method(
            self, model: ModelSchema, capability: ModelCapability, method: str
        ) -> Callable[..., Any]: ...

    # --- tokens ------------------------------------------------------------------------------

    def _tokenizer(self, name: str) -> tuple[ModelSchema, Tokenizer]:
        model = self.resolve(name)
        if not model.is_local:
            raise UnsupportedMode(
                "tokenize/detokenize",
                "remote",
                "remote provider tokenizer is not exposed by the runtime; use a local model "
                "(a GGUF model) for tokenizer-correctness checks",
            )
        backend = self._runnable(model)
        if not isinstance(backend, Tokenizer):
            raise UnsupportedMode(
                "tokenize/detokenize", model.kind, f"the {model.kind} backend has no tokenizer"
            )
        return model, backend

    async def tokenize(self, model: str, text: str) -> TokenizeResult:
        """``text``'s token ids in ``model``'s vocabulary, as the model sees them (no template)."""
        self._check_open()
        expect(model, str, "tokenize's model")  # was "resolve takes a str", naming no argument
        expect(text, str, "tokenize's text")
        bad = unpaired_surrogate(text)
        if bad is not None:
            raise InvalidInput(f"text contains an unpaired surrogate ({bad}): not valid Unicode text")
        schema, backend = self._tokenizer(model)
        with tracing.span("inference.tokenize", model=schema.id, provider=schema.provider):
            tokens = await backend.tokenize(schema, text)
        return TokenizeResult(model_used=schema.id, tokens=tokens)

    async def detokenize(self, model: str, tokens: list[int]) -> TokenizeResult:
        """The text ``tokens`` (ids in ``model``'s vocabulary) spell; an id out of range is InvalidInput."""
        self._check_open()
        expect(model, str, "detokenize's model")
        if not isinstance(tokens, list | tuple) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in tokens
        ):
            raise InvalidInput("detokenize takes a list of token ids (whole numbers)")
        schema, backend = self._tokenizer(model)
        with tracing.span("inference.detokenize", model=schema.id, provider=schema.provider):
            text = await backend.detokenize(schema, tokens)
        return TokenizeResult(model_used=schema.id, tokens=list(tokens), text=text)

    # --- embeddings, rerank, classify --------------------------------------------------------

    def _model_for(
        self, name: str | None, capability: ModelCapability, fallback: ModelCapability | None = None
    ) -> ModelSchema:
        if name:
            return self.resolve(name)
        for cap in (capability, fallback):
            if cap is not None and (model := self.default_model(cap)) is not None:
                if not model.has_capability(cap):  # "mode embed not implemented on backend gguf"
                    pinned = self.config.preferred.for_capability(cap)
                    found = self.registry.find(pinned) if pinned else None
                    section = "preferred" if found is not None and found.id == model.id else "defaults"
                    raise ConfigError(
                        f"config [{section}] {cap} names {model.id}, which does not do {cap}: name a "
                        f"model that does, or leave the key out"
                    )
                return model
        available = self.registry.query(capabilities=[capability], available_only=True, local_only=True)
        if available:
            return available[0]
        raise ModelUnavailable.none_for(str(capability), self.registry.why_none(capability))

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """One vector per text, in order, on the named model or the default embedding model."""
        self._check_open()
        expect(request, EmbedRequest, "embed")
        model = self._model_for(request.model, ModelCapability.EMBED)
        result = await self._task_method(model, ModelCapability.EMBED, "embed")(model, request)
        return _checked_vectors(model, result, len(request.texts))

    async def rerank(self, request: RerankRequest) -> RerankResult:
        """Documents ordered by relevance. With no model: the configured reranker, else embedding
        similarity on the default embedding model."""
        self._check_open()
        expect(request, RerankRequest, "rerank")
        model = self._model_for(request.model, ModelCapability.RERANK, ModelCapability.EMBED)
        # A reranker reranks, an embedding model ranks by similarity; a model that is neither
        # is told it cannot rerank (not that it cannot embed).
        reranks, embeds = (model.has_capability(c) for c in (ModelCapability.RERANK, ModelCapability.EMBED))
        scorer: Callable[[ModelSchema, RerankRequest], Awaitable[RerankResult]]
        if embeds and not reranks and not hasattr(self._runnable(model), "rerank"):
            # A hosted embedder: "mode embed not implemented ... does not implement rerank".
            self._task_method(model, ModelCapability.EMBED, "embed")
            scorer = self._similarity
        else:
            capability = ModelCapability.EMBED if embeds and not reranks else ModelCapability.RERANK
            scorer = self._task_method(model, capability, "rerank")
        if not request.documents:  # after the model is known to rerank: an unknown one was a 200
            return _no_documents(model)
        return await _distinct_scores(model, request, scorer)

    async def _similarity(self, model: ModelSchema, request: RerankRequest) -> RerankResult:
        """Documents ranked by cosine similarity to the query on an embedding model whose backend
        embeds only (a hosted one), as the sentence backend ranks on its own."""
        instruction = request.instruction
        query = await self.embed(
            EmbedRequest(texts=[request.query], model=model.id, is_query=True, instruction=instruction)
        )
        q = query.embeddings[0]
        vectors = (await self.embed(EmbedRequest(texts=request.documents, model=model.id))).embeddings
        scores = [cosine(sum(a * b for a, b in zip(q, v, strict=True))) for v in vectors]
        return ranked_result(request, scores, model.id, "embedding-similarity")

    async def classify(self, request: ClassifyRequest) -> Classification:
        """Zero-shot classification: label log-likelihoods on a generative model, or similarity
        on an embedding model. With no model: the configured classifier, else the default
        embedding model, else the default generation model."""
        self._check_open()
        expect(request, ClassifyRequest, "classify")
        seen: set[str] = set()
        for label in request.labels:
            if not label.strip() or label in seen:
                why = "an empty label" if not label.strip() else f"the label {label!r} twice"
                raise InvalidInput(f"labels hold {why}: each label must be a distinct, non-empty name")
            seen.add(label)
        model = self._classifier(request)
        if request.method == "embedding" and not model.has_capability(ModelCapability.EMBED):
            raise UnsupportedMode("classify/embedding", model.kind, f"{model.id} has no embeddings")
        if request.method == "likelihood" and not model.spec.scores_labels:
            raise UnsupportedMode(
                "classify/likelihood", model.kind, f"{model.id} exposes no token likelihoods"
            )
        return await self._task_method(model, ModelCapability.CLASSIFY, "classify")(model, request)

    def _classifier(self, request: ClassifyRequest) -> ModelSchema:
        if request.model:
            return self.resolve(request.model)
        order = {
            "auto": (ModelCapability.CLASSIFY, ModelCapability.EMBED, ModelCapability.GENERATE),
            "embedding": (ModelCapability.EMBED,),
            "likelihood": (ModelCapability.GENERATE,),
        }[request.method]
        for capability in order:
            model = self.default_model(capability)
            if model is not None and model.available and model.has_capability(ModelCapability.CLASSIFY):
                return model
        return self._model_for(None, order[0])

    async def ground(self, request: GroundRequest) -> GroundResult:
        """Boxes for ``request.prompt`` in pixels of the image (engine/grounding.py)."""
        self._check_open()
        expect(request, GroundRequest, "ground")
        from .grounding import ground

        return await ground(self, request)  # type: ignore[arg-type]  # self is the InferenceEngine

    # --- speech and media ------------------------------------------------------------------------
    # Speech runs on the model the [speech] policy picks (engine/speech.py); media on the model
    # named, else the configured one for the capability. Each goes through the backend of its
    # kind; one not installed or lacking the task raises ModelUnavailable / UnsupportedMode.

    async def transcribe(
        self, request: TranscribeRequest, on_segment: SegmentCallback | None = None
    ) -> TranscribeResult:
        """Speech in ``request.audio_path`` as text. ``on_segment(segment)`` is called from a
        worker thread with each stretch of the transcript as it is decoded, by models that decode
        in steps (local Whisper); a hosted model's whole answer comes at once, without calls."""
        self._check_open()
        expect(request, TranscribeRequest, "transcribe")
        if request.model:
            self.resolve(request.model)  # a name in no catalog is said first, as everywhere
        readable_file(request.audio_path, "audio file")  # then a typo in the path, not a missing extra
        model = speech_model(self, request.model, STT)
        cost = transcription_cost(model, request.audio_path)  # hosted speech counts against spend limits
        if (affordable := within_spend(self, request.model, STT, model, cost)) is not model:
            model, cost = affordable, transcription_cost(affordable, request.audio_path)
        method = self._task_method(model, STT, "transcribe")
        return await charged(self.spend, model, cost, lambda: method(model, request, on_segment=on_segment))

    async def synthesize(self, request: SynthesizeRequest) -> SynthesizeResult:
        """Speech for ``request.text`` (audio bytes in the asked format), on the model the speech
        policy picks when none is named."""
        self._check_open()
        expect(request, SynthesizeRequest, "synthesize")
        request = with_output_format(request)
        model = speech_model(self, request.model, TTS)
        cost = synthesis_cost(model, request.text)
        if (affordable := within_spend(self, request.model, TTS, model, cost)) is not model:
            model, cost = affordable, synthesis_cost(affordable, request.text)
        method = self._task_method(model, TTS, "synthesize")
        return await charged(self.spend, model, cost, lambda: method(model, request))

    async def list_voices(self, model: str | None = None) -> VoiceList:
        """The voices ``voice`` takes on ``model`` (else the speech policy's model; engine/speech.py)."""
        return await list_voices(self, model)

    async def generate_image(
        self, request: GenerateImageRequest, progress: Callable[[int, int], None] | None = None
    ) -> GenerateImageResult:
        """An image (or an edit of ``request.image_paths``) written to a file. ``progress(done,
        total)`` is called from a worker thread as steps finish (local models) or a job advances."""
        self._check_open()
        expect(request, GenerateImageRequest, "generate_image")
        request = with_suffix_format(request)
        return await self._media(
            request.model, ModelCapability.IMAGE_GENERATION, request.prompt,
            lambda m, result: image_cost(m, request, result),
            lambda method, m: method(m, request, progress=progress),
        )  # fmt: skip

    async def generate_video(
        self, request: GenerateVideoRequest, progress: Callable[[int, int], None] | None = None
    ) -> GenerateVideoResult:
        """A video for ``request.prompt``; ``progress(done, total)`` is called from a worker thread."""
        self._check_open()
        expect(request, GenerateVideoRequest, "generate_video")
        request = with_suffix_format(request)
        return await self._media(
            request.model, ModelCapability.VIDEO_GENERATION, request.prompt,
            lambda m, result: video_cost(m, request, result),
            lambda method, m: method(m, request, progress=progress),
        )  # fmt: skip

    async def _media(
        self,
        name: str | None,
        capability: ModelCapability,
        prompt: str,
        cost: Callable[[ModelSchema, Any], float],
        call: Callable[[Callable[..., Any], ModelSchema], Awaitable[Any]],
    ) -> Any:
        """Run a media request on its model, priced (hosted: per image, per second of video) and
        recorded as an outcome like a text call (engine/media.py). A routed request that its first
        model cannot serve as asked (``steps`` on a hosted model, say), that a spend limit or an
        open circuit keeps from it, goes to the next one (a free local pipeline, say); the first
        refusal is the answer when none can."""
        models = self._media_models(name, capability, lambda m: cost(m, None))
        refused: InferenceError | None = None
        for model in models:
            method = self._task_method(model, capability, _MEDIA_METHODS[capability])
            try:
                return await run_media(
                    self,  # type: ignore[arg-type]  # self is the InferenceEngine
                    model, _MEDIA_TASK[capability], prompt,
                    lambda result, m=model: cost(m, result),  # type: ignore[misc]
                    lambda method=method, m=model: call(method, m),  # type: ignore[misc]
                )  # fmt: skip
            except (InvalidInput, UnsupportedMode, SpendLimitExceeded, CircuitOpen) as exc:
                if len(models) == 1:  # a model named (or the only one): its refusal is the answer
                    raise
                log.info("%s cannot serve this %s request: %s", model.id, capability, exc)
                refused = refused or exc
        assert refused is not None
        raise refused

    def media_model(
        self, name: str | None, capability: ModelCapability, request: GenerateVideoRequest | None = None
    ) -> ModelSchema:
        """The model a media request would run on; raises now what running it would raise (an
        unknown, unavailable or unsuitable model), e.g. before a video job is accepted. Given the
        video ``request``, a model it must run on (named, configured, the only one) also refuses
        now what it would refuse of it (a field its API has no place for; a spend limit its
        estimate would pass): a job that could only fail is not started."""
        models = self._media_models(name, capability)
        model = models[0]
        self._task_method(model, capability, _MEDIA_METHODS[capability])
        if request is not None and len(models) == 1:  # routed: a refusal hands it on instead
            backend = self._runnable(model)
            if isinstance(backend, VideoChecker):
                backend.check_video(model, request)
            breach = self.spend.breach(model.provider, video_cost(model, request, None))
            if breach is not None:
                raise breach
        return model

    def _media_models(
        self,
        name: str | None,
        capability: ModelCapability,
        price: Callable[[ModelSchema], float] | None = None,
    ) -> list[ModelSchema]:
        """The named model; else the configured one; else the router's ranking of the available
        models that can do it (``routing/media.py``: what their calls showed, latency and
        ``price``, the cost of this request on a model)."""
        if name or self.default_model(capability) is not None:
            return [self._model_for(name, capability)]
        available = self.registry.query(capabilities=[capability], available_only=True)
        if not available:
            return [self._model_for(None, capability)]  # raises, saying none is configured
        blocked = self.router.breakers.blocked()
        choice = choose_media(
            available,
            family=MEDIA_FAMILY[_MEDIA_TASK[capability]],
            price=price or (lambda m: 0.0),
            tracker=self.tracker,
            settings=self.config.routing,
            rng=self.router.rng,
            blocked=blocked.__contains__,
        )
        log.debug("%s routed to %s: %s", capability, choice.model.id, choice.reason)
        return choice.models


def _no_documents(model: ModelSchema) -> RerankResult:
    return RerankResult(ranked=[], model_used=model.id, method="none")


async def _distinct_scores(
    model: ModelSchema,
    request: RerankRequest,
    scorer: Callable[[ModelSchema, RerankRequest], Awaitable[RerankResult]],
) -> RerankResult:
    """``scorer``'s ranking with each distinct document scored once and an empty one scored 0
    unseen (as the docs say): a local model ranked "" first, and two copies of one document got
    scores a batch's float noise apart, the later one first against "ties keep input order"."""
    distinct = list(dict.fromkeys(d for d in request.documents if d))
    if not distinct:
        return ranked_result(request, [0.0] * len(request.documents), model.id, "none")
    result = await scorer(model, request.model_copy(update={"documents": distinct, "top_n": None}))
    if sorted(r.index for r in result.ranked) != list(range(len(distinct))):
        raise ProviderError(
            f"answered {len(result.ranked)} scores for {len(distinct)} documents",
            provider=model.provider,
            model=model.id,
        )
    score = {distinct[r.index]: r.score for r in result.ranked}
    scores = [score.get(d, 0.0) for d in request.documents]
    return ranked_result(request, scores, result.model_used or model.id, result.method or "rerank")


def _checked_vectors(model: ModelSchema, result: EmbedResult, count: int) -> EmbedResult:
    """``result`` if it holds one finite vector of ``dimensions`` per text, else ``ProviderError``
    saying what came: a backend (a runner, a plug-in) that answered one vector for two texts was
    passed on, misaligned with them."""
    vectors = result.embeddings
    problem = (
        f"{len(vectors)} vectors"
        if len(vectors) != count
        else f"vectors of other than its {result.dimensions} dimensions"
        if any(len(v) != result.dimensions for v in vectors)
        else "a number that is not finite (NaN or infinity)"
        if not all(map(math.isfinite, itertools.chain.from_iterable(vectors)))
        else None
    )
    if problem is not None:
        raise ProviderError(
            f"the embeddings answer holds {problem} for {count} texts",
            provider=model.provider,
            model=model.id,
        )
    return result
