"""Ask an OpenAI-compatible server (vLLM, Ollama's /v1, llama.cpp server, LM Studio) which
models it serves: ``GET {base_url}/models``. Used by ``car models discover`` and at server start
for endpoints marked ``discover = true``; never on the routing path."""

from __future__ import annotations

import os

import httpx

from ..catalog import EndpointConfig
from ..errors import ProviderError

__all__ = ["list_served_models"]


async def list_served_models(endpoint: EndpointConfig, *, timeout_s: float = 5.0) -> list[str]:
    """Model ids the endpoint lists. ``ProviderError`` (retryable when the server is down) if the
    server cannot be reached or answers with something that is not an OpenAI model list."""
    headers = {}
    if endpoint.api_key_env and (key := os.environ.get(endpoint.api_key_env)):
        headers["Authorization"] = f"Bearer {key}"
    url = endpoint.base_url.rstrip("/") + "/models"
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            response = await client.get(url, headers=headers)
    except httpx.HTTPError as exc:
        raise ProviderError(
            f"cannot reach {url}: {type(exc).__name__}", provider=endpoint.name, model="*", retryable=True
        ) from None
    if response.status_code != 200:
        raise ProviderError(
            f"GET {url} failed", provider=endpoint.name, model="*", status=response.status_code,
            retryable=response.status_code >= 500,
        )  # fmt: skip
    try:
        data = response.json()["data"]
        return [str(item["id"]) for item in data]
    except (ValueError, KeyError, TypeError):
        raise ProviderError(
            f"{url} did not answer with an OpenAI model list", provider=endpoint.name, model="*"
        ) from None
