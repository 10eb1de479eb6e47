"""Ollama's native API for `car models pull ollama/<tag>` and for listing what Ollama has pulled.

``POST /api/pull`` streams NDJSON: status lines (``{"status": "pulling manifest"}``), one line per
chunk of each layer (``{"status": "pulling <digest>", "digest": "sha256:...", "total": N,
"completed": M}``), then ``verifying sha256 digest``, ``writing manifest`` and ``success``. A
failure is a line ``{"error": "..."}`` (or an HTTP error with that body). Ollama itself resumes
interrupted layers and checks each layer's sha256, so a pull here is resumable and verified too.
``GET /api/tags`` lists the pulled models with their size, digest and quantization.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import httpx
from pydantic import BaseModel

from ..errors import DownloadFailed

__all__ = [
    "OLLAMA_DEFAULT_HOST",
    "OllamaModel",
    "OllamaProgress",
    "ollama_answers",
    "ollama_host",
    "ollama_pull",
    "ollama_tags",
]

OLLAMA_DEFAULT_HOST = "http://127.0.0.1:11434"


class OllamaProgress(BaseModel):
    """One line of ``/api/pull``'s stream."""

    status: str = ""
    digest: str | None = None
    total: int | None = None
    completed: int | None = None


class OllamaModel(BaseModel):
    """One entry of ``/api/tags``."""

    name: str
    size: int = 0
    digest: str = ""
    modified_at: str = ""
    parameter_size: str | None = None
    quantization_level: str | None = None
    family: str | None = None


def ollama_host(configured: str | None = None) -> str:
    """The model's host, else ``$OLLAMA_HOST`` (Ollama's own variable, ``host:port`` or a URL),
    else Ollama's default."""
    host = configured or os.environ.get("OLLAMA_HOST") or OLLAMA_DEFAULT_HOST
    host = host if "://" in host else f"http://{host}"
    return host.rstrip("/").removesuffix("/v1")


def ollama_answers(host: str, timeout_s: float = 2.0) -> bool:
    try:
        return httpx.get(host + "/api/version", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def _error_of(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error") or response.text)
    except ValueError:
        return response.text.strip() or f"HTTP {response.status_code}"


def ollama_pull(
    host: str,
    tag: str,
    on_progress: Callable[[OllamaProgress], None] | None = None,
    *,
    timeout_s: float = 10.0,
) -> list[OllamaProgress]:
    """Pull ``tag`` through the Ollama at ``host``; returns the stream's status lines (no chunk lines).
    ``DownloadFailed`` with Ollama's own message when it refuses or the stream ends early."""
    statuses: list[OllamaProgress] = []
    timeout = httpx.Timeout(timeout_s, read=None)  # a layer may take minutes between lines
    try:
        with httpx.stream(
            "POST", host + "/api/pull", json={"model": tag, "stream": True}, timeout=timeout
        ) as r:
            if r.status_code >= 400:
                r.read()
                raise DownloadFailed(f"Ollama at {host} could not pull {tag}: {_error_of(r)}")
            for line in r.iter_lines():
                if not line.strip():
                    continue
                data: dict[str, Any] = json.loads(line)
                if data.get("error"):
                    raise DownloadFailed(f"Ollama at {host} could not pull {tag}: {data['error']}")
                event = OllamaProgress.model_validate(data)
                if event.digest is None:
                    statuses.append(event)
                if on_progress is not None:
                    on_progress(event)
    except httpx.TransportError as exc:
        raise DownloadFailed(f"cannot reach Ollama at {host} to pull {tag} ({exc})") from None
    except json.JSONDecodeError:
        raise DownloadFailed(f"Ollama at {host} sent a line that is not JSON while pulling {tag}") from None
    if not statuses or statuses[-1].status != "success":
        last = statuses[-1].status if statuses else "nothing"
        raise DownloadFailed(f"Ollama at {host} stopped pulling {tag} after {last!r}; pull again to continue")
    return statuses


def ollama_tags(host: str, timeout_s: float = 5.0) -> list[OllamaModel]:
    """What the Ollama at ``host`` has pulled (``GET /api/tags``)."""
    try:
        response = httpx.get(host + "/api/tags", timeout=timeout_s)
    except httpx.TransportError as exc:
        raise DownloadFailed(f"cannot reach Ollama at {host} ({exc})") from None
    if response.status_code >= 400:
        raise DownloadFailed(f"Ollama at {host} could not list its models: {_error_of(response)}")
    try:
        items = response.json().get("models", [])
    except (ValueError, AttributeError):
        raise DownloadFailed(f"{host} does not answer like Ollama (GET /api/tags is not its JSON)") from None
    models = []
    for item in items:
        details = item.get("details") or {}
        models.append(
            OllamaModel(
                name=item["name"], size=int(item.get("size") or 0), digest=str(item.get("digest") or ""),
                modified_at=str(item.get("modified_at") or ""), parameter_size=details.get("parameter_size"),
                quantization_level=details.get("quantization_level"), family=details.get("family"),
            )
        )  # fmt: skip
    return models
