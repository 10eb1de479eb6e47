"""`car models pull`: fetch a model's files from Hugging Face into the HF cache.

This is the only place that downloads weights, and it runs only when the user asks for a pull.
Files land where ``huggingface_hub`` keeps them (``HF_HOME``/``HF_HUB_CACHE``), which is where
``locate`` looks, so a pulled model becomes available without any other step.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DownloadFailed, UnsupportedMode
from ..schema import DiffusersSource, GgufSource, ModelSchema, PiperSource, SentenceSource, WhisperSource
from .locate import local_path

__all__ = ["pull_model"]


def pull_model(model: ModelSchema) -> Path:
    source = model.source
    repo = getattr(source, "hf_repo", None)
    if not model.in_process or not repo:
        if model.in_process:
            return local_path(model)  # packaged or a local path: nothing to fetch
        raise UnsupportedMode(
            "pull", model.kind, f"{model.id} is served remotely; there is nothing to download"
        )
    try:
        import huggingface_hub
    except ImportError as exc:
        raise DownloadFailed("pulling needs huggingface_hub: pip install huggingface_hub") from exc
    revision = getattr(source, "revision", None)
    try:
        if isinstance(source, GgufSource | PiperSource) and source.filename:
            path = huggingface_hub.hf_hub_download(repo, source.filename, revision=revision)
            if isinstance(source, GgufSource) and source.mmproj:
                huggingface_hub.hf_hub_download(repo, source.mmproj, revision=revision)
            if isinstance(source, PiperSource):
                huggingface_hub.hf_hub_download(repo, source.filename + ".json", revision=revision)
            return Path(path)
        if isinstance(source, DiffusersSource):  # one folder per component; patterns skip spare copies
            allow, ignore = source.allow_patterns or None, source.ignore_patterns or None
            return Path(
                huggingface_hub.snapshot_download(
                    repo, revision=revision, allow_patterns=allow, ignore_patterns=ignore
                )
            )
        if isinstance(source, SentenceSource | WhisperSource):
            return Path(huggingface_hub.snapshot_download(repo, revision=revision))
    except Exception as exc:  # huggingface_hub raises many types (HTTP, offline, disk)
        raise DownloadFailed(f"could not pull {model.id} from {repo}: {exc}") from exc
    raise DownloadFailed(f"{model.id}: its source does not say which file of {repo} to fetch")
