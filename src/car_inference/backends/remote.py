"""What the hosted-API backends share: key rotation, stream assembly, error translation, conversions.

``RemoteBackend`` is the base of the OpenAI-compatible, Anthropic and Gemini backends. A subclass
says where a model lives (``endpoint``), builds the SDK call from a ``GenerateRequest`` (``build``,
before any network, so ``UnsupportedMode`` costs nothing), opens an SDK client (``make_client``),
turns the SDK's stream into our events (``events``) and maps SDK exceptions (``translate``).
The base does the rest:

- per request it takes a key (``KeyProvider.acquire``), reports how it fared (``report``: 200 on
  success, the HTTP status, None when nothing answered), and on 429/401/403 before any output
  retries at once with another key not tried yet: key rotation. SDK retries are always off.
- it folds events into ``Done(text, tool_calls, thinking, usage)``, drops thinking text when the
  request said ``thinking=off``, and times the first token; ``generate`` consumes the stream.
- every failure leaves as ``ProviderError`` (status, ``retryable``, ``retry_after``); no message,
  log record or exception chain carries an API key (scrubbed, and SDK exceptions not chained).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import threading
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar, TypedDict, TypeVar

from ..errors import INPUT_STATUSES, InferenceFailed, ModelUnavailable, ProviderError, ProviderRejectedInput
from ..requests import (
    GenerateRequest,
    ThinkingMode,
)
from ..schema import GenerateParam, ModelSchema, _RemoteApi
from ..secrets import no_usable_key
from ..stream import Done, StreamAccumulator, StreamEvent, TextDelta, ThinkingDelta, UsageEvent
from .base import BackendContext, GenerationOutput, KeyProvider
from .chat_template import StopMatcher
from .image_urls import has_image_urls, inline_image_urls, on_private_network
from .remote_keys import EnvKeys, KeylessRest, resting, soonest

# The backends import the conversion helpers below too; these are the names others may use.
__all__ = [
    "Endpoint",
    "ErrorSite",
    "Finish",
    "RemoteBackend",
    "mask_key",
    "parse_retry_after",
    "scrub",
    "status_error",
    "transport_error",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Sent to servers that take no key (Ollama, a local vLLM): the SDKs refuse an empty key, and an
# explicit value stops them from reading e.g. OPENAI_API_KEY and sending it to a third party.
PLACEHOLDER_KEY = "no-key-needed"

# Statuses after which another key may do better: rate limited, or this key is refused.
ROTATE_ON = frozenset({429, 401, 403})
RETRYABLE_STATUS = frozenset({408, 409, 429})


def mask_key(key: str) -> str:
    """``sk-…1a2b`` for a long key; short ones show nothing of themselves."""
    return f"{key[:3]}…{key[-4:]}" if len(key) >= 12 else "…"


_SECRET_PATTERNS = (
    (re.compile(r"(?i)\b(bearer\s+)[^\s\"',;]+"), r"\1***"),
    (re.compile(r"(?i)([?&](?:key|api_key)=)[^&\s\"']+"), r"\1***"),
    (
        re.compile(r"(?i)((?:x-goog-api-key|x-api-key|api[_-]?key)[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+"),
        r"\1***",
    ),
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}"), "sk-***"),
)


def scrub(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with the given secrets masked and anything that looks like a credential starred."""
    for secret in secrets:
        if secret and len(secret) >= 4 and secret != PLACEHOLDER_KEY:
            text = text.replace(secret, mask_key(secret))
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


# --- errors -------------------------------------------------------------------------------------


class StreamIncomplete(Exception):
    """The provider's stream ended without its final event (finish reason / message_stop)."""


class MalformedResponse(ValueError):
    """What the provider sent does not have the wire format's shape (a field of the wrong type,
    a line past ``MAX_EVENT_BYTES``): a provider error, so the next key or model is tried."""


@dataclass(frozen=True)
class Finish:
    """Yielded by ``events`` (not a stream event): why generation stopped, in OpenAI's words
    (stop, length, tool_calls, content_filter) where the provider's reason has one."""

    reason: str


@dataclass(frozen=True)
class ProviderItems:
    """Yielded by ``events`` (not a stream event): opaque items the provider needs back with this
    turn (Anthropic thinking blocks with signatures), for ``Done.provider_output_items``."""

    items: list[dict[str, Any]]


# The longest wait a provider's Retry-After is taken at: it cools the key it came on, and a
# broken or hostile server's "99999999" would otherwise shelve a key for years.
MAX_RETRY_AFTER_S = 3600.0


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: delta seconds, or an HTTP-date; at most
    ``MAX_RETRY_AFTER_S``."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(MAX_RETRY_AFTER_S, max(0.0, seconds)) if math.isfinite(seconds) else None


class ErrorSite(TypedDict):
    """Where a provider error happened: the keyword arguments of ``status_error`` and
    ``transport_error`` that every backend passes the same way."""

    provider: str
    model: str
    secrets: list[str | None]


def status_error(
    status: int,
    message: str,
    *,
    provider: str,
    model: str,
    headers: Mapping[str, str] | None = None,
    secrets: Iterable[str | None] = (),
    retry_after: float | None = None,
) -> ProviderError:
    """An HTTP error status as ``ProviderError``: 429, 408, 409 and 5xx are retryable, other 4xx
    are not; 400, 413 and 422 (the request's input refused) are ``ProviderRejectedInput``. A
    2xx/3xx here means an error event inside an accepted stream: retryable, status None."""
    if retry_after is None and headers is not None:
        retry_after = parse_retry_after(headers.get("retry-after"))
    text = _clip(scrub(message or f"HTTP {status}", secrets))  # scrub first: a cut key would pass
    if status < 400:
        return ProviderError(text, provider=provider, model=model, retryable=True, retry_after=retry_after)
    retryable = status in RETRYABLE_STATUS or status >= 500
    cls = ProviderRejectedInput if status in INPUT_STATUSES else ProviderError
    return cls(
        text, provider=provider, model=model, status=status, retryable=retryable, retry_after=retry_after
    )


def answer_budget(max_tokens: int) -> int:
    """The most characters an answer of ``max_tokens`` tokens can hold, generously (a token is a
    few characters; 32 covers long runs of spaces or digits): past it, an upstream that streams
    on is ignoring ``max_tokens``, and reading on would only grow memory."""
    return 32 * max_tokens + 4096


def transport_error(
    exc: BaseException,
    *,
    provider: str,
    model: str,
    secrets: Iterable[str | None] = (),
    connection: bool = False,
) -> ProviderError | None:
    """Timeouts, refused or dropped connections, cut streams and unparsable responses: retryable,
    status None. ``connection`` says the SDK already classed ``exc`` as a connection failure.
    None for an exception that is none of these (a bug: let it propagate)."""
    timeout = isinstance(exc, TimeoutError) or "timeout" in type(exc).__name__.lower()
    if isinstance(exc, StreamIncomplete):
        what = f"stream ended early: {exc}"
    elif timeout:
        what = "timed out"
    elif isinstance(exc, json.JSONDecodeError | UnicodeDecodeError):
        what = f"malformed response: {type(exc).__name__}"
    elif connection or _is_transport(exc):
        what = f"connection failed: {type(exc).__name__}: {exc}"
    elif isinstance(exc, ValueError):  # the SDK could not parse what came back
        what = f"malformed response: {type(exc).__name__}: {exc}"
    else:
        return None
    return ProviderError(
        _clip(scrub(what, secrets)), provider=provider, model=model, retryable=True, timeout=timeout
    )


async def _cut_at_stops(events: AsyncIterator[Any], stops: list[str]) -> AsyncGenerator[Any, None]:
    """The answer's text up to the first of ``stops``, then a ``Finish("stop")`` and the end (the
    upstream closed), for a model whose API takes no ``stop`` (OpenAI's reasoning models): it was
    dropped, and the answer ran on past it with finish_reason "stop"."""
    matcher = StopMatcher(stops)
    async for event in events:
        if not isinstance(event, TextDelta):
            yield event
            continue
        text, hit = matcher.feed(event.text)
        if text:
            yield TextDelta(text=text)
        if hit:
            yield Finish("stop")
            return
    if rest := matcher.flush():
        yield TextDelta(text=rest)


async def _paced(events: AsyncIterator[T], gap_s: float) -> AsyncGenerator[T, None]:
    """``events``, each within ``gap_s`` of the one before (the first: of the request): the HTTP
    read timeout restarts at every byte, so an upstream that sent only SSE keep-alive comments
    (": keep-alive", every second) held a call for ever, its fallbacks never tried. Not the
    consumer's time: only the wait for the next event is bounded. One timer for the whole
    stream, moved on lazily when it fires (an ``asyncio.timeout`` per event cost about 3 µs each,
    a millisecond on a long answer); on expiry the waiting task is cancelled, as
    ``asyncio.timeout`` does, and the wait ends in ``TimeoutError``."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    waiting_since: float | None = loop.time()
    expired = False
    handle: asyncio.TimerHandle

    def check() -> None:
        nonlocal handle, expired
        left = gap_s if waiting_since is None else waiting_since + gap_s - loop.time()
        if left > 0:
            handle = loop.call_later(left, check)
        elif task is not None:
            expired = True
            task.cancel()

    handle = loop.call_later(gap_s, check)
    try:
        while True:
            try:
                event = await anext(events)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if expired and task is not None and task.uncancel() == 0:
                    raise TimeoutError(f"no stream event within {gap_s:g} s") from None
                raise
            waiting_since = None  # the consumer's turn: not timed
            yield event
            waiting_since = loop.time()
    finally:
        handle.cancel()


def _is_transport(exc: BaseException) -> bool:
    if isinstance(exc, ConnectionError | OSError | asyncio.IncompleteReadError):
        return True
    module = type(exc).__module__.split(".", 1)[0]
    return module in ("httpx", "httpx2", "httpcore", "h11", "aiohttp")


def _size(event: Any) -> int:
    """Characters of the answer an event carries (text, thinking or tool arguments)."""
    return len(getattr(event, "text", None) or getattr(event, "arguments", None) or "")


def _within(event: Any, room: int) -> Any:
    """The first ``room`` characters of a text or thinking piece; None for anything else (a tool
    call's arguments cut are no JSON) or when nothing of it fits."""
    if room <= 0 or not isinstance(event, TextDelta | ThinkingDelta):
        return None
    return event.model_copy(update={"text": event.text[:room]})


def _clip(text: str, limit: int = 600) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- where a model lives ------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """A model's wire address: ``provider`` labels errors (the host, else the model's provider)."""

    provider: str
    base_url: str | None
    key_env: str | None
    wire_model: str
    headers: tuple[tuple[str, str], ...] = ()
    needs_key: bool = True


# --- the base backend ---------------------------------------------------------------------------


class RemoteBackend:
    """A hosted API reached through an official SDK. Subclasses implement the five hooks."""

    kind: ClassVar[str] = "remote"
    source_types: ClassVar[tuple[type[_RemoteApi], ...]] = ()  # the sources ``endpoint`` reads
    needs_base_url: ClassVar[bool] = False  # True where the SDK has no default address
    # The wire protocol continues a final assistant turn (prefill): how a broken stream resumes.
    assistant_prefill: ClassVar[bool] = False

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx
        self.settings = ctx.config.remote
        self._keys: KeyProvider = ctx.keys if ctx.keys is not None else EnvKeys(ctx)
        self._keyless = KeylessRest(self.settings)
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[Any, ...], Any]]
        self._clients = weakref.WeakKeyDictionary()
        self._clients_lock = threading.Lock()

    # --- hooks ---------------------------------------------------------------------------------

    def endpoint(self, model: ModelSchema) -> Endpoint:
        """Where a hosted model lives: its source (merged with the catalog's host) as an Endpoint."""
        source = model.source
        if not isinstance(source, self.source_types):
            raise ModelUnavailable(model.id, f"the {self.kind} backend cannot serve {source.kind!r} sources")
        if not source.base_url and self.needs_base_url:
            raise ModelUnavailable(model.id, "its source has no base_url (and no host that sets one)")
        return Endpoint(
            source.host or model.provider or source.kind,  # an [[endpoints]] server: its name, not "openai"
            source.base_url,
            source.api_key_env,
            source.model_name or model.id.split("/", 1)[1],
            tuple(sorted(source.headers.items())),
            needs_key=getattr(source, "needs_key", True),
        )

    def build(self, model: ModelSchema, endpoint: Endpoint, request: GenerateRequest) -> dict[str, Any]:
        """The SDK call's keyword arguments. Runs before any network: raises ``UnsupportedMode``."""
        raise NotImplementedError

    def make_client(self, endpoint: Endpoint, key: str) -> Any:
        raise NotImplementedError

    def events(
        self, client: Any, endpoint: Endpoint, model: ModelSchema, payload: dict[str, Any]
    ) -> AsyncGenerator[StreamEvent | Finish | ProviderItems, None]:
        """Content events, a ``Finish``, a ``UsageEvent`` and optionally ``ProviderItems``; raises SDK
        errors or ``StreamIncomplete``."""
        raise NotImplementedError

    def translate(
        self, exc: Exception, endpoint: Endpoint, model: ModelSchema, key: str
    ) -> ProviderError | None:
        """The SDK exception as ``ProviderError``; None when it is not a provider failure."""
        return transport_error(exc, provider=endpoint.provider, model=model.id, secrets=[key])

    # --- clients and keys ----------------------------------------------------------------------

    def _client(self, endpoint: Endpoint, key: str) -> Any:
        """One SDK client per event loop, endpoint and key (clients pool connections)."""
        loop = asyncio.get_running_loop()
        cache_key = (endpoint.base_url, endpoint.headers, key)
        with self._clients_lock:
            per_loop = self._clients.setdefault(loop, {})
            client = per_loop.get(cache_key)
            if client is None:
                client = per_loop[cache_key] = self.make_client(endpoint, key)
            return client

    def _next_key(self, endpoint: Endpoint, model: ModelSchema, tried: set[str]) -> str | None:
        """A key not tried yet; None when the rotation is exhausted. The first call raises
        ``ModelUnavailable`` when the model needs a key and none is usable, and the provider's 429
        when every usable key (or the keyless server) rests after one."""
        if not endpoint.key_env:
            if endpoint.needs_key and not tried:
                raise ModelUnavailable(model.id, "its source names no API key variable (api_key_env)")
            return self._keyless_key(endpoint, model) if not tried else None
        if not tried and (left := self._keys.rest_left(endpoint.key_env)) > 0:
            raise resting(endpoint, model, left)
        # After a failure, only a key not resting: with every key cooling after 429s, a request
        # sent one call per key (each refused for its Retry-After) instead of one probe.
        key = self._keys.acquire(endpoint.key_env, resting=not tried)
        if key is None:
            if tried:
                return None
            if endpoint.needs_key:
                reason = no_usable_key(endpoint.key_env, self._keys.refused(endpoint.key_env))
                raise ModelUnavailable(model.id, reason)  # as the registry says it
            return self._keyless_key(endpoint, model)
        return None if key in tried else key

    def _keyless_key(self, endpoint: Endpoint, model: ModelSchema) -> str:
        if (left := self._keyless.left(endpoint)) > 0:
            raise resting(endpoint, model, left)
        return PLACEHOLDER_KEY

    def _report(self, endpoint: Endpoint, key: str, status: int | None, retry_after: float | None) -> None:
        if key == PLACEHOLDER_KEY:
            self._keyless.report(endpoint, status, retry_after)
        elif endpoint.key_env:
            self._keys.report(endpoint.key_env, key, status=status, retry_after=retry_after)

    def _failed(self, endpoint: Endpoint, key: str, error: ProviderError, started: bool) -> bool:
        """Report a failure; True when the same request should go again with another key."""
        self._report(endpoint, key, error.status, error.retry_after)
        rotate = not started and error.status in ROTATE_ON and key != PLACEHOLDER_KEY
        if rotate:
            log.info(
                "%s returned %s on key %s; trying another", endpoint.provider, error.status, mask_key(key)
            )
        return rotate

    async def with_keys(self, model: ModelSchema, call: Callable[[Any, Endpoint], Awaitable[T]]) -> T:
        """Run one non-streaming SDK call under key rotation and error translation."""
        endpoint = self.endpoint(model)
        tried: set[str] = set()
        last: ProviderError | None = None
        while (key := self._next_key(endpoint, model, tried)) is not None:
            tried.add(key)
            error: ProviderError | None = None
            try:
                result = await call(self._client(endpoint, key), endpoint)
            except Exception as exc:
                error = self.translate(exc, endpoint, model, key)
                if error is None:
                    raise
            if error is None:
                self._report(endpoint, key, 200, None)
                return result
            last = soonest(last, error)
            if not self._failed(endpoint, key, error, started=False):
                break
        assert last is not None
        raise last

    # --- the task protocol ---------------------------------------------------------------------

    def _guarded_images(self, base_url: str, request: GenerateRequest) -> GenerateRequest:
        """An upstream on this network would fetch a client's image URLs from inside it: they are
        fetched here instead, private addresses refused, and sent inline (``image_urls``)."""
        if not on_private_network(base_url):
            return request  # a hosted provider fetches them from the internet
        return inline_image_urls(request, self.ctx.config.remote.timeout_s)

    async def generate(self, model: ModelSchema, request: GenerateRequest) -> GenerationOutput:
        """Consumes the stream, so every answer has a measured time to first token."""
        async with contextlib.aclosing(self.stream(model, request)) as events:
            async for event in events:
                if isinstance(event, Done):
                    return GenerationOutput.from_done(event, event.time_to_first_token_ms)
        raise InferenceFailed(f"{model.id}: the stream ended without a result")

    async def stream(self, model: ModelSchema, request: GenerateRequest) -> AsyncGenerator[StreamEvent, None]:
        start = time.perf_counter()
        endpoint = self.endpoint(model)
        if not self.ctx.private_urls_ok and endpoint.base_url and has_image_urls(request):
            request = await asyncio.to_thread(self._guarded_images, endpoint.base_url, request)
        payload = self.build(model, endpoint, request)
        hide_thinking = request.params.thinking is ThinkingMode.OFF
        budget = answer_budget(request.params.max_tokens)
        stops = [] if model.supports_param(GenerateParam.STOP) else [s for s in request.params.stop if s]
        tried: set[str] = set()
        last: ProviderError | None = None
        while (key := self._next_key(endpoint, model, tried)) is not None:
            tried.add(key)
            acc = StreamAccumulator()
            finish: str | None = None
            items: list[dict[str, Any]] = []
            ttft: float | None = None
            started = False
            error: ProviderError | None = None
            spent = 0  # characters of the answer so far, thinking and tool arguments included
            try:
                client = self._client(endpoint, key)
                gap_s = self.ctx.config.remote.timeout_s
                async with (
                    contextlib.aclosing(self.events(client, endpoint, model, payload)) as events,
                    contextlib.aclosing(_paced(events, gap_s)) as paced,  # its timer ends with it
                    contextlib.aclosing(_cut_at_stops(paced, stops) if stops else paced) as cut,
                ):
                    async for event in cut:
                        if isinstance(event, Finish):
                            finish = event.reason
                        elif isinstance(event, ProviderItems):
                            items = event.items
                        elif isinstance(event, UsageEvent):
                            acc.push(event)
                        else:
                            # An upstream that ignores max_tokens is cut at the budget, keeping
                            # the part of the piece that crosses it (one huge piece was all lost).
                            size = len(
                                getattr(event, "text", None) or getattr(event, "arguments", None) or ""
                            )
                            over = spent + size > budget
                            kept = _within(event, budget - spent) if over else event
                            spent += size
                            if kept is not None and not (hide_thinking and isinstance(kept, ThinkingDelta)):
                                ttft = ttft or round((time.perf_counter() - start) * 1000, 3)
                                acc.push(kept)
                                started = True
                                yield kept
                            if over:
                                log.warning("%s answered past max_tokens; the answer is cut", model.id)
                                finish = "length"
                                break
            except Exception as exc:
                error = self.translate(exc, endpoint, model, key)
                if error is None:
                    raise
            if error is None:
                self._report(endpoint, key, 200, None)
                usage = acc.usage
                if usage is not None:
                    usage = usage.model_copy(update={"context_window": model.context_length})
                    yield UsageEvent(usage=usage)
                yield Done(
                    text=acc.text,
                    tool_calls=acc.tool_calls(),
                    thinking=acc.thinking,
                    usage=usage,
                    time_to_first_token_ms=ttft,
                    finish_reason=finish,
                    provider_output_items=items,
                )
                return
            last = soonest(last, error)
            if not self._failed(endpoint, key, error, started):
                break
        assert last is not None
        raise last
