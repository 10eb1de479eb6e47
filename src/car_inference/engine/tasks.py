"""The tasks besides generation: tokenize, detokenize, embed, rerank, classify.

With no model named, each uses the configured model for its capability (``[preferred]`` then
``[defaults]`` in config.toml), else the first available local model that can do it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..backends.base import Tokenizer
from ..errors import ModelUnavailable, UnsupportedMode
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
from ..schema import ModelCapability, ModelSchema
from .media import image_cost, run_media, video_cost
from .speech import charged, list_voices, speech_model, synthesis_cost, transcription_cost

if TYPE_CHECKING:
    from ..backends.base import Backend
    from ..backends.voices import VoiceList
    from ..config import CarConfig
    from ..registry import UnifiedRegistry
    from ..routing import SpendControl

__all__ = ["TaskMixin"]

_MEDIA_METHODS = {
    ModelCapability.IMAGE_GENERATION: "generate_image",
    ModelCapability.VIDEO_GENERATION: "generate_video",
}


class TaskMixin:
    # Provided by InferenceEngine.
    registry: UnifiedRegistry
    config: CarConfig
    spend: SpendControl

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
        schema, backend = self._tokenizer(model)
        return TokenizeResult(model_used=schema.id, tokens=await backend.tokenize(schema, text))

    async def detokenize(self, model: str, tokens: list[int]) -> TokenizeResult:
        schema, backend = self._tokenizer(model)
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
                return model
        available = self.registry.query(capabilities=[capability], available_only=True, local_only=True)
        if available:
            return available[0]
        raise ModelUnavailable(str(capability), f"no model is configured for {capability}")

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        model = self._model_for(request.model, ModelCapability.EMBED)
        return await self._task_method(model, ModelCapability.EMBED, "embed")(model, request)

    async def rerank(self, request: RerankRequest) -> RerankResult:
        """Documents ordered by relevance. With no model: the configured reranker, else embedding
        similarity on the default embedding model."""
        if not request.documents:
            return RerankResult(ranked=[], model_used=None, method="none")
        model = self._model_for(request.model, ModelCapability.RERANK, ModelCapability.EMBED)
        # A reranker reranks, an embedding model ranks by similarity; a model that is neither
        # is told it cannot rerank (not that it cannot embed).
        reranks, embeds = (model.has_capability(c) for c in (ModelCapability.RERANK, ModelCapability.EMBED))
        capability = ModelCapability.EMBED if embeds and not reranks else ModelCapability.RERANK
        return await self._task_method(model, capability, "rerank")(model, request)

    async def classify(self, request: ClassifyRequest) -> Classification:
        """Zero-shot classification: label log-likelihoods on a generative model, or similarity
        on an embedding model. With no model: the configured classifier, else the default
        embedding model, else the default generation model."""
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
        from .grounding import ground

        return await ground(self, request)  # type: ignore[arg-type]  # self is the InferenceEngine

    # --- speech and media ------------------------------------------------------------------------
    # Speech runs on the model the [speech] policy picks (engine/speech.py); media on the model
    # named, else the configured one for the capability. Each goes through the backend of its
    # kind; one not installed or lacking the task raises ModelUnavailable / UnsupportedMode.

    async def transcribe(self, request: TranscribeRequest) -> TranscribeResult:
        model = speech_model(self, request.model, ModelCapability.SPEECH_TO_TEXT)
        method = self._task_method(model, ModelCapability.SPEECH_TO_TEXT, "transcribe")
        cost = transcription_cost(model, request.audio_path)  # hosted speech counts against spend limits
        return await charged(self.spend, model, cost, lambda: method(model, request))

    async def synthesize(self, request: SynthesizeRequest) -> SynthesizeResult:
        model = speech_model(self, request.model, ModelCapability.TEXT_TO_SPEECH)
        method = self._task_method(model, ModelCapability.TEXT_TO_SPEECH, "synthesize")
        cost = synthesis_cost(model, request.text)
        return await charged(self.spend, model, cost, lambda: method(model, request))

    async def list_voices(self, model: str | None = None) -> VoiceList:
        """The voices ``voice`` takes on ``model`` (else the speech policy's model; engine/speech.py)."""
        return await list_voices(self, model)

    async def generate_image(
        self, request: GenerateImageRequest, progress: Callable[[int, int], None] | None = None
    ) -> GenerateImageResult:
        """An image (or an edit of ``request.image_paths``) written to a file. ``progress(done,
        total)`` is called from a worker thread as steps finish (local models) or a job advances."""
        model = self._media_model(request.model, ModelCapability.IMAGE_GENERATION)
        method = self._task_method(model, ModelCapability.IMAGE_GENERATION, "generate_image")
        # Priced (hosted: per image) and recorded as an outcome like a text call (engine/media.py).
        return await run_media(
            self,  # type: ignore[arg-type]  # self is the InferenceEngine
            model,
            InferenceTask.GENERATE_IMAGE,
            request.prompt,
            lambda result: image_cost(model, request, result),
            lambda: method(model, request, progress=progress),
        )

    async def generate_video(
        self, request: GenerateVideoRequest, progress: Callable[[int, int], None] | None = None
    ) -> GenerateVideoResult:
        model = self._media_model(request.model, ModelCapability.VIDEO_GENERATION)
        method = self._task_method(model, ModelCapability.VIDEO_GENERATION, "generate_video")
        # Priced (hosted: per second of video) and recorded as an outcome (engine/media.py).
        return await run_media(
            self,  # type: ignore[arg-type]  # self is the InferenceEngine
            model,
            InferenceTask.GENERATE_VIDEO,
            request.prompt,
            lambda result: video_cost(model, request, result),
            lambda: method(model, request, progress=progress),
        )

    def media_model(self, name: str | None, capability: ModelCapability) -> ModelSchema:
        """The model a media request would run on; raises now what running it would raise (an
        unknown, unavailable or unsuitable model), e.g. before a video job is accepted."""
        model = self._media_model(name, capability)
        self._task_method(model, capability, _MEDIA_METHODS[capability])
        return model

    def _media_model(self, name: str | None, capability: ModelCapability) -> ModelSchema:
        """The named model; else the configured one; else the available model that can do it with
        the best quality prior, local ones first under ``routing.prefer_local`` (and on ties)."""
        if name or self.default_model(capability) is not None:
            return self._model_for(name, capability)
        available = self.registry.query(capabilities=[capability], available_only=True)
        if not available:
            return self._model_for(None, capability)  # raises, saying none is configured
        local_first = self.config.routing.prefer_local

        def rank(m: ModelSchema) -> tuple[bool, float, bool, str]:
            return (local_first and m.is_remote, -(m.quality or 0.0), m.is_remote, m.id)

        return min(available, key=rank)
