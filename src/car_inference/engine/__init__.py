"""The engine: one facade over routing, backends and outcome tracking."""

from .core import InferenceEngine
from .generation import Routing
from .health import ModelHealthReport
from .sync import SyncInferenceEngine

__all__ = ["InferenceEngine", "ModelHealthReport", "Routing", "SyncInferenceEngine"]
