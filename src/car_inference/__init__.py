"""car-inference: one API over local and remote AI models, with an adaptive router.

    from car_inference import InferenceEngine, GenerateRequest
    engine = InferenceEngine()                  # reads $CAR_HOME (default ~/.car)
    result = await engine.generate(GenerateRequest(prompt="Hello"))

Names are imported on first use, so ``import car_inference`` stays cheap; heavy engines
(llama.cpp, torch, provider SDKs) load only when a model that needs them runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # errors
    "InferenceError": "errors",
    "ModelNotFound": "errors",
    "ModelUnavailable": "errors",
    "DownloadFailed": "errors",
    "InferenceFailed": "errors",
    "InvalidInput": "errors",
    "UnsupportedMode": "errors",
    "TokenizationError": "errors",
    "DeviceError": "errors",
    "ConfigError": "errors",
    "ProviderError": "errors",
    "SpendLimitExceeded": "errors",
    "StateUnavailable": "errors",
    "AllModelsFailed": "errors",
    "TraceNotFound": "errors",
    # schema
    "ModelCapability": "schema",
    "ModelSchema": "schema",
    "GenerateParam": "schema",
    # requests and results
    "GenerateRequest": "requests",
    "GenerateParams": "requests",
    "Message": "requests",
    "TextBlock": "requests",
    "ImageBlock": "requests",
    "ToolCall": "requests",
    "ThinkingMode": "requests",
    "IntentHint": "requests",
    "TaskHint": "requests",
    "RoutingWorkload": "requests",
    "ResponseFormat": "requests",
    "InferenceResult": "requests",
    "TokenUsage": "requests",
    "EmbedRequest": "requests",
    "EmbedResult": "requests",
    "RerankRequest": "requests",
    "RerankResult": "requests",
    "ClassifyRequest": "requests",
    "Classification": "requests",
    "GroundRequest": "requests",
    "TranscribeRequest": "requests",
    "SynthesizeRequest": "requests",
    "GenerateImageRequest": "requests",
    "GenerateVideoRequest": "requests",
    "TokenizeResult": "requests",
    "GroundResult": "requests",
    "TranscribeResult": "requests",
    "SynthesizeResult": "requests",
    "GenerateImageResult": "requests",
    "GenerateVideoResult": "requests",
    # streaming
    "StreamAccumulator": "stream",
    "TextDelta": "stream",
    "ThinkingDelta": "stream",
    "Done": "stream",
    "RouteEvent": "stream",
    "ToolCallStart": "stream",
    "ToolCallDelta": "stream",
    "UsageEvent": "stream",
    "ErrorEvent": "stream",
    "StreamEvent": "stream",
    # routing
    "RoutingDecision": "routing",
    # registry and config
    "UnifiedRegistry": "registry",
    "ModelFilter": "registry",
    "CarConfig": "config",
    "load_config": "config",
    # engine
    "InferenceEngine": "engine",
    "SyncInferenceEngine": "engine",
}

# A literal list (mypy --strict reads no other form): a user's `from car_inference import X` was an
# attr-defined error for every name. tests/test_package.py checks it is exactly _EXPORTS.
__all__ = [
    "AllModelsFailed",
    "CarConfig",
    "Classification",
    "ClassifyRequest",
    "ConfigError",
    "DeviceError",
    "Done",
    "DownloadFailed",
    "EmbedRequest",
    "EmbedResult",
    "ErrorEvent",
    "GenerateImageRequest",
    "GenerateImageResult",
    "GenerateParam",
    "GenerateParams",
    "GenerateRequest",
    "GenerateVideoRequest",
    "GenerateVideoResult",
    "GroundRequest",
    "GroundResult",
    "ImageBlock",
    "InferenceEngine",
    "InferenceError",
    "InferenceFailed",
    "InferenceResult",
    "IntentHint",
    "InvalidInput",
    "Message",
    "ModelCapability",
    "ModelFilter",
    "ModelNotFound",
    "ModelSchema",
    "ModelUnavailable",
    "ProviderError",
    "RerankRequest",
    "RerankResult",
    "ResponseFormat",
    "RouteEvent",
    "RoutingDecision",
    "RoutingWorkload",
    "SpendLimitExceeded",
    "StateUnavailable",
    "StreamAccumulator",
    "StreamEvent",
    "SyncInferenceEngine",
    "SynthesizeRequest",
    "SynthesizeResult",
    "TaskHint",
    "TextBlock",
    "TextDelta",
    "ThinkingDelta",
    "ThinkingMode",
    "TokenUsage",
    "TokenizationError",
    "TokenizeResult",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallStart",
    "TraceNotFound",
    "TranscribeRequest",
    "TranscribeResult",
    "UnifiedRegistry",
    "UnsupportedMode",
    "UsageEvent",
    "__version__",
    "load_config",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'car_inference' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover
    from .config import (
        CarConfig,
        load_config,
    )
    from .engine import (
        InferenceEngine,
        SyncInferenceEngine,
    )
    from .errors import (
        AllModelsFailed,
        ConfigError,
        DeviceError,
        DownloadFailed,
        InferenceError,
        InferenceFailed,
        InvalidInput,
        ModelNotFound,
        ModelUnavailable,
        ProviderError,
        SpendLimitExceeded,
        StateUnavailable,
        TokenizationError,
        TraceNotFound,
        UnsupportedMode,
    )
    from .registry import (
        ModelFilter,
        UnifiedRegistry,
    )
    from .requests import (
        Classification,
        ClassifyRequest,
        EmbedRequest,
        EmbedResult,
        GenerateImageRequest,
        GenerateImageResult,
        GenerateParams,
        GenerateRequest,
        GenerateVideoRequest,
        GenerateVideoResult,
        GroundRequest,
        GroundResult,
        ImageBlock,
        InferenceResult,
        IntentHint,
        Message,
        RerankRequest,
        RerankResult,
        ResponseFormat,
        RoutingWorkload,
        SynthesizeRequest,
        SynthesizeResult,
        TaskHint,
        TextBlock,
        ThinkingMode,
        TokenizeResult,
        TokenUsage,
        ToolCall,
        TranscribeRequest,
        TranscribeResult,
    )
    from .routing import (
        RoutingDecision,
    )
    from .schema import (
        GenerateParam,
        ModelCapability,
        ModelSchema,
    )
    from .stream import (
        Done,
        ErrorEvent,
        RouteEvent,
        StreamAccumulator,
        StreamEvent,
        TextDelta,
        ThinkingDelta,
        ToolCallDelta,
        ToolCallStart,
        UsageEvent,
    )
