"""Ask an OpenAI-compatible server (vLLM, Ollama's /v1, llama.cpp server, LM Studio) which
models it serves: ``GET {base_url}/models``. Used by ``car models discover`` and at server start
for endpoints marked ``discover = true``; never on the routing path."""

from __future__ import annotations

import logging
import os
import re

import httpx

from ..catalog import EndpointConfig
from ..errors import ProviderError

__all__ = ["list_served_models"]

log = logging.getLogger(__name__)
# A served model's name: no spaces or control characters, at most 256 characters (Ollama's
# "llama3.2:3b", vLLM's "Qwen/Qwen3-8B", LM Studio's "lmstudio-community/...-GGUF").
_MODEL_ID = re.compile(r"[^\s\x00-\x1f]{1,256}")


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
        ids = [item["id"] for item in data]
    except (ValueError, KeyError, TypeError):
        raise ProviderError(
            f"{url} did not answer with an OpenAI model list", provider=endpoint.name, model="*"
        ) from None
    # Ids become catalog ids ``<endpoint>/<id>`` and go back upstream as they are: a null, a
    # number, an empty or spaced name or a path-like one is no model name; repeats are one model.
    usable = [i for i in ids if isinstance(i, str) and _MODEL_ID.fullmatch(i) and ".." not in i]
    if len(usable) < len(ids):
        log.warning(
            "%s: %d model id(s) of %s skipped (not a model name)", endpoint.name, len(ids) - len(usable), url
        )
    return list(dict.fromkeys(usable))
