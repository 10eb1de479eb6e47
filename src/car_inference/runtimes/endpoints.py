"""Ask an OpenAI-compatible server (vLLM, Ollama's /v1, llama.cpp server, LM Studio) which
models it serves: ``GET {base_url}/models``. Used by ``car models discover``, at server start for
endpoints marked ``discover = true``, and when a request names a model of such an endpoint that
is not known yet (``EndpointDiscovery``)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING

import httpx

from ..catalog import EndpointConfig
from ..errors import ProviderError

if TYPE_CHECKING:
    from ..registry import UnifiedRegistry
    from ..schema import ModelSchema

__all__ = ["SERVER_LOOP_WAIT_S", "EndpointDiscovery", "list_served_models", "list_served_models_now"]

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
# How long a name on a server's event loop waits for the endpoint's list (a healthy one answers
# in milliseconds).
SERVER_LOOP_WAIT_S = 0.25


def claimable(registry: UnifiedRegistry, endpoint: EndpointConfig, served: list[str]) -> list[ModelSchema]:
    """The models ``endpoint`` says it serves, less those whose id a catalog model that is not an
    endpoint's already has (warned): an endpoint named ``openai`` that discovered ``gpt-4o-mini``
    took `openai/gpt-4o-mini` from OpenAI in `car serve`, sending its prompts to that server
    without its key, while `car generate` still sent them to OpenAI. Listed ones are refused
    when models.toml is read (catalog)."""
    claimed = []
    for schema in endpoint.to_schemas(served):
        existing = registry.get(schema.id)
        if existing is not None and "endpoint" not in existing.tags:
            log.warning(
                "endpoint %r serves %s, a catalog model's id: not registered (give the endpoint another"
                " name, or point the provider elsewhere with [hosts.%s])",
                endpoint.name, schema.id, endpoint.name,
            )  # fmt: skip
            continue
        claimed.append(schema)
    return claimed


class EndpointDiscovery:
    """The registry's ``on_miss``: a name ``<endpoint>/<model>`` no model has, whose endpoint says
    ``discover = true``, has that endpoint asked what it serves (at most every ``ASK_AGAIN_S``)
    and its models registered. `car models discover` listed them but `car generate -m` said
    "model not found": only `car serve` discovered, at its start.

    A server sets ``loop_wait_s`` (``SERVER_LOOP_WAIT_S``): on its event loop the question goes
    to a thread and is waited for that long at most. An endpoint slower than that (one that
    accepts connections and never answers held the whole loop, every client's requests, for the
    5 s timeout) gets the name answered "not found", and what it lists is registered on the loop
    when it comes. Elsewhere (the CLI, a script) the caller waits for the answer."""

    def __init__(self, registry: UnifiedRegistry, timeout_s: float) -> None:
        self._registry = registry
        self._timeout_s = min(timeout_s, 5.0)  # a name on the request path: a down server costs this
        self._asked: dict[str, float] = {}
        self._unanswered: dict[str, str] = {}  # endpoint -> why its last question found nothing
        self._lock = threading.Lock()
        self.loop_wait_s: float | None = None  # None: wait for the answer, even on a loop

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
        loop = _running_loop() if self.loop_wait_s is not None else None
        answer: Future[list[str]] = Future()
        if loop is None:  # nobody else waits on this thread: ask here
            self._ask(endpoint, answer)
        else:
            threading.Thread(target=self._ask, args=(endpoint, answer), daemon=True).start()
        try:
            served = answer.result(timeout=None if loop is None else self.loop_wait_s)
        except FutureTimeout:
            assert loop is not None
            log.info("%s: asked what it serves; %s is not known until it answers", endpoint.name, name)
            self._unanswered[endpoint.name] = (
                f"endpoint {endpoint.name} was asked what it serves and has not answered yet"
            )
            answer.add_done_callback(functools.partial(_on_loop, loop, self._late, endpoint))
            return False
        except ProviderError as exc:
            log.warning("%s: %s", endpoint.name, exc)
            self._unanswered[endpoint.name] = f"endpoint {endpoint.name} could not say what it serves: {exc}"
            return False
        self._register(endpoint, served)
        return True

    def why(self, name: str) -> str | None:
        """Why ``name`` may be missing: its ``discover`` endpoint's last question went unanswered
        (a "model not found" said nothing of the endpoint that never answered)."""
        prefix = name.partition("/")[0].lower()
        return next((why for e, why in self._unanswered.items() if e.lower() == prefix), None)

    def _ask(self, endpoint: EndpointConfig, answer: Future[list[str]]) -> None:
        try:
            answer.set_result(list_served_models_now(endpoint, timeout_s=self._timeout_s))
        except BaseException as exc:  # the caller's to see (ProviderError), or to log (a bug)
            answer.set_exception(exc)

    def _late(self, endpoint: EndpointConfig, answer: Future[list[str]]) -> None:
        """An answer that came after the caller stopped waiting, on the loop."""
        try:
            self._register(endpoint, answer.result())
        except ProviderError as exc:
            log.warning("%s: %s", endpoint.name, exc)
            self._unanswered[endpoint.name] = f"endpoint {endpoint.name} could not say what it serves: {exc}"
        except Exception:  # a bug: logged whole
            log.warning("%s: asking what it serves failed", endpoint.name, exc_info=True)

    def _register(self, endpoint: EndpointConfig, served: list[str]) -> None:
        self._unanswered.pop(endpoint.name, None)
        for schema in endpoint.to_schemas(served):
            if self._registry.find(schema.id) is None:
                self._registry.register(schema)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _on_loop(loop: asyncio.AbstractEventLoop, call: Callable[..., None], *args: object) -> None:
    """``call(*args)`` on ``loop``, unless the loop is gone (the process or test ended first)."""
    with contextlib.suppress(RuntimeError):  # "Event loop is closed"
        loop.call_soon_threadsafe(call, *args)
