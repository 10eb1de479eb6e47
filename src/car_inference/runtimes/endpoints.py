"""Ask an OpenAI-compatible server (vLLM, Ollama's /v1, llama.cpp server, LM Studio) which
models it serves: ``GET {base_url}/models``. Used by ``car models discover`` and at server start
for endpoints marked ``discover = true``; never on the routing path."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from typing import TYPE_CHECKING

import httpx

from ..catalog import EndpointConfig
from ..errors import ProviderError

if TYPE_CHECKING:
    from ..registry import UnifiedRegistry

__all__ = ["EndpointDiscovery", "list_served_models", "list_served_models_now"]

log = logging.getLogger(__name__)
# A served model's name: no spaces or control characters, at most 256 characters (Ollama's
# "llama3.2:3b", vLLM's "Qwen/Qwen3-8B", LM Studio's "lmstudio-community/...-GGUF").
_MODEL_ID = re.compile(r"[^\s\x00-\x1f]{1,256}")


async def list_served_models(endpoint: EndpointConfig, *, timeout_s: float = 5.0) -> list[str]:
    """Model ids the endpoint lists. ``ProviderError`` (retryable when the server is down) if the
    server cannot be reached or answers with something that is not an OpenAI model list."""
    url, headers = _request(endpoint)
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            response = await client.get(url, headers=headers)
    except httpx.HTTPError as exc:
        raise _unreachable(endpoint, url, exc) from None
    return _served(endpoint, url, response)


def list_served_models_now(endpoint: EndpointConfig, *, timeout_s: float = 5.0) -> list[str]:
    """``list_served_models`` for a caller without an event loop to await it on."""
    url, headers = _request(endpoint)
    try:
        with httpx.Client(timeout=timeout_s) as client:
            response = client.get(url, headers=headers)
    except httpx.HTTPError as exc:
        raise _unreachable(endpoint, url, exc) from None
    return _served(endpoint, url, response)


def _request(endpoint: EndpointConfig) -> tuple[str, dict[str, str]]:
    headers = {}
    if endpoint.api_key_env and (key := os.environ.get(endpoint.api_key_env)):
        headers["Authorization"] = f"Bearer {key}"
    return endpoint.base_url.rstrip("/") + "/models", headers


def _unreachable(endpoint: EndpointConfig, url: str, exc: httpx.HTTPError) -> ProviderError:
    return ProviderError(
        f"cannot reach {url}: {type(exc).__name__}", provider=endpoint.name, model="*", retryable=True
    )


def _served(endpoint: EndpointConfig, url: str, response: httpx.Response) -> list[str]:
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


# A discoverable endpoint is asked again for a name it did not serve after this long at most.
ASK_AGAIN_S = 30.0


class EndpointDiscovery:
    """The registry's ``on_miss``: a name ``<endpoint>/<model>`` no model has, whose endpoint says
    ``discover = true``, has that endpoint asked what it serves (at most every ``ASK_AGAIN_S``)
    and its models registered. `car models discover` listed them but `car generate -m` said
    "model not found": only `car serve` discovered, at its start."""

    def __init__(self, registry: UnifiedRegistry, timeout_s: float) -> None:
        self._registry = registry
        self._timeout_s = min(timeout_s, 5.0)  # a name on the request path: a down server costs this
        self._asked: dict[str, float] = {}
        self._lock = threading.Lock()

    def __call__(self, name: str) -> bool:
        prefix, sep, rest = name.partition("/")
        if not sep or not rest:
            return False
        endpoint = next(
            (e for e in self._registry.endpoints if e.discover and e.name.lower() == prefix.lower()), None
        )
        if endpoint is None:
            return False
        with self._lock:
            now = time.monotonic()
            if now - self._asked.get(endpoint.name, -ASK_AGAIN_S) < ASK_AGAIN_S:
                return False
            self._asked[endpoint.name] = now
        try:
            served = list_served_models_now(endpoint, timeout_s=self._timeout_s)
        except ProviderError as exc:
            log.warning("%s: %s", endpoint.name, exc)
            return False
        for schema in endpoint.to_schemas(served):
            if self._registry.find(schema.id) is None:
                self._registry.register(schema)
        return True
