"""A WebSocket client as the runner of delegated models: the host supplies inference over JSON-RPC.

The client sends ``runner.register`` with the models it runs (ids of delegated models in the
catalog, or model objects, which are added until it goes), an optional ``name`` and ``timeout_s``.
From then on those models are available and routed like any other; each call on one becomes an
``infer`` request from the server to the client::

    server -> client  {"jsonrpc": "2.0", "id": "car-runner-1", "method": "infer",
                       "params": {"prompt": "...", "model": {...ModelSchema},
                                  "request": {...GenerateRequest}, "stream": false}}
    client -> server  {"jsonrpc": "2.0", "id": "car-runner-1", "result": {"text": "..."}}

The result has ``GenerationOutput``'s fields (``text``, ``tool_calls``, ``usage``, ...); an error
object fails the attempt (``data.retryable`` says whether another model may succeed). While
answering, the client may send ``runner.event`` notifications ``{"id", "event"}`` with stream events
(``text_delta``...), which a streaming caller receives as they come. When the caller gives up or the
registration's timeout passes, the server sends the notification ``cancel {"id"}``. When the client
disconnects, its calls in flight fail at once (retryable: the router's fallbacks take over) and its
models are unavailable again. ``runner.unregister`` ends the registration without closing the socket.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter, ValidationError

from ..backends.base import GenerationOutput
from ..backends.delegated import RunnerRegistration, as_output, result_events, stream_problem
from ..backends.remote import answer_budget
from ..errors import InferenceError, ProviderError
from ..kinds import Locality
from ..requests import GenerateRequest
from ..schema import NAMED_ONLY, ModelSchema
from ..stream import Done, StreamAccumulator, StreamEvent, TextDelta
from .errors import ApiError

if TYPE_CHECKING:
    from .jsonrpc import Session
    from .rpc_methods import Params

__all__ = ["RUNNER_METHODS", "RpcRunner"]

_EVENTS: TypeAdapter[StreamEvent] = TypeAdapter(StreamEvent)
_call_ids = itertools.count(1)


class RpcRunner:
    """The runner one WebSocket session registered: engine calls become ``infer`` requests to it."""

    def __init__(self, session: Session, name: str) -> None:
        self.session = session
        self.name = name
        self.registration: RunnerRegistration | None = None
        self.closed = False
        self._why = "disconnected"  # how it ended: "disconnected", or "unregistered" (socket open)
        self._calls: dict[str, _Call] = {}  # our calls in flight, by id
        self._background: set[asyncio.Task[Any]] = set()

    # --- the runner protocol (backends/delegated.py) ------------------------------------------

    async def generate(self, model: ModelSchema, request: GenerateRequest) -> GenerationOutput:
        async for item in self._exchange(model, request, stream=False):
            if isinstance(item, GenerationOutput):
                return item
            if isinstance(item, _Cut):  # events nobody asked for, past the answer's budget
                message = "streamed past the answer's max_tokens to a call that asked for a result"
                raise ProviderError(message, provider=f"runner {self.name}", model=model.id)
        raise self._gone(model)  # pragma: no cover - _exchange ends with a result or raises

    async def stream(self, model: ModelSchema, request: GenerateRequest) -> AsyncGenerator[StreamEvent, None]:
        accumulator = StreamAccumulator()
        async for item in self._exchange(model, request, stream=True):
            if isinstance(item, _Cut):  # past the answer's budget: what came, ended as max_tokens would
                text, calls = accumulator.finish()
                thinking, usage = accumulator.thinking, accumulator.usage
                yield Done(
                    text=text, tool_calls=calls, thinking=thinking, usage=usage, finish_reason="length"
                )
                return
            if isinstance(item, GenerationOutput):
                for event in result_events(item, accumulator, model.id, self.name):
                    yield event
                return
            accumulator.push(item)
            yield item

    async def _exchange(
        self, model: ModelSchema, request: GenerateRequest, *, stream: bool
    ) -> AsyncGenerator[StreamEvent | GenerationOutput | _Cut, None]:
        """Send one ``infer`` call; yield the events the client streams, then its result (or
        ``_CUT`` where its answer passed the budget of the request's ``max_tokens``)."""
        if self.closed:
            raise self._gone(model)
        call_id = f"car-runner-{next(_call_ids)}"
        budget = answer_budget(request.params.max_tokens)
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._calls[call_id] = _Call(model.id, queue, budget)
        answered = False
        try:
            params = {
                "prompt": request.last_user_text(),  # for a runner that needs no more than that
                "model": model.model_dump(mode="json"),
                "request": request.model_dump(mode="json", exclude_none=True),
                "stream": stream,
            }
            await self.session.send({"jsonrpc": "2.0", "id": call_id, "method": "infer", "params": params})
            while True:
                what, value = await queue.get()
                if what == "event":
                    yield value
                    continue
                if what == "cut":  # the runner is told to stop (cancel) and the caller gets it
                    yield _CUT
                    return
                if what == "invalid":  # we refuse what it streams: the call is over, tell it so
                    raise value
                if what == "gone":  # unanswered: told to cancel unless its socket went
                    raise self._gone(model)
                answered = True
                if what == "error":
                    raise value
                out = as_output(value, model.id, self.name, model.context_length)
                if len(out.text) > budget:  # as an upstream that ignores max_tokens is cut
                    out = out.model_copy(update={"text": out.text[:budget], "finish_reason": "length"})
                yield out
                return
        finally:
            self._calls.pop(call_id, None)
            # The caller gave up, the timeout passed, or the runner unregistered with the call
            # in flight: it is told to stop, unless its socket is gone.
            if not answered and (not self.closed or self._why == "unregistered"):
                self._in_background(self.session.notify("cancel", {"id": call_id}))

    def _gone(self, model: ModelSchema) -> ProviderError:
        return ProviderError(
            f"the runner {self._why} before answering", provider=f"runner {self.name}", model=model.id,
            retryable=True,
        )  # fmt: skip

    def _in_background(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def waiting(self) -> bool:
        """Whether calls of ours wait for this runner's answers."""
        return bool(self._calls)

    def calls(self, call_id: Any) -> bool:
        """Whether ``call_id`` is one of our calls in flight to this runner."""
        return isinstance(call_id, str) and call_id in self._calls

    # --- what the client sends -------------------------------------------------------------------

    def deliver(self, message: dict[str, Any]) -> bool:
        """A response to one of our calls; False when it answers no call in flight."""
        call = self._calls.get(message.get("id"))  # type: ignore[arg-type]
        if call is None or call.cut:
            return call is not None
        model_id, queue = call.model_id, call.queue
        error = message.get("error")
        if error is None:
            queue.put_nowait(("result", message.get("result")))
            return True
        info = error if isinstance(error, dict) else {"message": error if isinstance(error, str) else None}
        data = info.get("data")
        retryable = isinstance(data, dict) and bool(data.get("retryable", False))
        failure = ProviderError(
            str(info.get("message") or "the runner failed"),
            provider=f"runner {self.name}",
            model=model_id,
            retryable=retryable,
        )
        queue.put_nowait(("error", failure))
        return True

    def event(self, call_id: Any, raw: Any) -> None:
        call = self._calls.get(call_id)
        if call is None or call.cut:
            return  # a late event for a call that is over, or past its budget
        try:
            event = _EVENTS.validate_python(raw)
        except ValidationError as exc:
            problem = exc.errors()[0]["msg"]
            message = f"streamed an invalid event: {problem}"
            failure = ProviderError(message, provider=f"runner {self.name}", model=call.model_id)
            call.queue.put_nowait(("invalid", failure))
            return
        if wrong := stream_problem(event, call.started):
            failure = ProviderError(wrong, provider=f"runner {self.name}", model=call.model_id)
            call.queue.put_nowait(("invalid", failure))
            return
        written = getattr(event, "text", None) or getattr(event, "arguments", None) or ""
        if isinstance(written, str) and written:
            room = call.budget - call.spent
            call.spent += len(written)
            if call.spent > call.budget:  # a runner streaming past max_tokens: 315 MB reached a caller
                call.cut = True
                if isinstance(event, TextDelta) and room > 0:  # the head of the piece that crosses
                    call.queue.put_nowait(("event", TextDelta(text=event.text[:room])))
                call.queue.put_nowait(("cut", None))
                return
        call.queue.put_nowait(("event", event))

    def close(self, *, unregistered: bool = False) -> None:
        """The socket closed (or, ``unregistered``, the runner asked to stop running models with
        its socket open): every call in flight fails now, and the registration ends."""
        self.closed = True
        if unregistered:
            self._why = "unregistered"
        for call in self._calls.values():
            call.queue.put_nowait(("gone", None))
        if self.registration is not None:
            self.session.engine.unregister_runner(self.registration)
            self.registration = None


@dataclass(slots=True)
class _Call:
    """One of our calls to the runner: its model, what it answers (in order), and how many
    characters of answer it may stream (``remote.answer_budget``) and has."""

    model_id: str
    queue: asyncio.Queue[tuple[str, Any]]
    budget: int
    spent: int = 0
    cut: bool = False
    started: set[int] = field(default_factory=set)  # the tool calls it started streaming


class _Cut:
    """What ``_exchange`` yields where the runner's answer passed its budget."""


_CUT = _Cut()

# A host application brings a handful of models: 16,000 in one registration (350 KB) made every
# later registration slow for every client.
MAX_RUNNER_MODELS = 1000


# --- methods ------------------------------------------------------------------------------------------


def _model(item: Any, index: int, *, routed: bool, taken: frozenset[str]) -> str | ModelSchema:
    """A model id, or the schema of a model the client brings (``NAMED_ONLY`` unless ``routed``:
    another client's request without a model must not reach a stranger's runner). Its id is in a
    namespace of its own, not one of ``taken`` (this server's providers, hosts and endpoints), and
    it has no aliases: `openai/gpt-4o` with the alias `gpt-4` took other clients' prompts, HTTP
    ones included, that meant OpenAI."""
    if isinstance(item, str) and item:
        return item
    model_id = item.get("id") if isinstance(item, dict) else None
    provider, _, name = model_id.partition("/") if isinstance(model_id, str) else ("", "", "")
    if (
        not provider
        or not name
        or len(model_id or "") > 200
        or not (model_id or "").isprintable()
        or any(c.isspace() for c in model_id or "")  # "openai /gpt-4o" beside openai's in every listing
        or not provider.isascii()  # a Cyrillic "о" in "оpenai/gpt-4o": a look-alike namespace
    ):
        raise ApiError(400, "each of `models` is a model id or an object with an id like host/name",
                       code="invalid_value", param=f"models.{index}")  # fmt: skip
    if provider.lower() in taken:
        raise ApiError(400, f"`{provider}/` is a provider of this server's catalog: a model a client brings "
                       "takes a namespace of its own (e.g. app/...)", code="invalid_value",
                       param=f"models.{index}.id")  # fmt: skip
    if item.get("aliases") or item.get("name", name) != name:
        raise ApiError(400, "a model a client brings is found by its id only: no `aliases` or other `name`",
                       code="invalid_value", param=f"models.{index}")  # fmt: skip
    data = {"name": name, "provider": provider, "capabilities": ["generate"], "source": {"kind": "delegated"}}
    schema = ModelSchema.model_validate({**data, **item, "provider": provider, "name": name})
    if not routed and NAMED_ONLY not in schema.tags:
        schema.tags.append(NAMED_ONLY)
    return schema


async def _register(session: Session, params: Params, rid: Any) -> Any:
    models = params.get("models")
    if not isinstance(models, list) or not models:
        raise ApiError(400, "`models` must be a non-empty list of the models this runner serves",
                       code="invalid_value", param="models")  # fmt: skip
    if len(models) > MAX_RUNNER_MODELS:
        raise ApiError(400, f"a runner serves at most {MAX_RUNNER_MODELS:,} models ({len(models):,} given)",
                       code="invalid_value", param="models")  # fmt: skip
    timeout_s = params.get("timeout_s")
    if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float)
                                  or timeout_s <= 0):  # fmt: skip
        raise ApiError(400, "`timeout_s` must be a positive number", code="invalid_value", param="timeout_s")
    name = params.get("name")
    if name is not None and not (
        isinstance(name, str) and name.strip() and len(name) <= 100 and name.isprintable()
    ):
        # It is in every caller's error about this runner's models: 100 KB, or a forged log line.
        raise ApiError(400, "`name` must be a string of 1 to 100 printable characters",
                       code="invalid_value", param="name")  # fmt: skip
    settings = session.state.settings
    routed = settings.route_client_models
    registry = session.engine.registry
    taken = frozenset(
        name.lower()
        for name in (
            *(m.provider for m in registry.list() if m.spec.locality is not Locality.RUNNER),
            *registry.hosts,
            *(e.name for e in registry.endpoints),
        )
    )
    wanted = [_model(item, i, routed=routed, taken=taken) for i, item in enumerate(models)]
    if timeout_s is not None:  # a runner never holds a caller longer than a request may last
        timeout_s = min(float(timeout_s), settings.request_timeout_s)
    previous = session.runner
    # What the engine would refuse, refused before anything is replaced: a refused registration
    # failed the calls in flight on the one it was to replace ("the runner unregistered").
    session.engine.runner_models(wanted, replacing=previous.registration if previous else None)
    kept = _kept(session, previous)
    if previous is not None:  # registering again replaces what this session runs
        previous.close(unregistered=True)
    try:
        runner = _registered(session, name or f"ws-{id(session):x}", wanted, timeout_s)
    except InferenceError:
        session.runner = None
        if previous is not None and kept is not None:  # a refused registration replaces nothing
            session.runner = _registered(session, previous.name, *kept)
        raise
    session.runner = runner
    served = sorted((runner.registration.models if runner.registration else None) or ())
    return {"runner": runner.name, "models": served, "timeout_s": timeout_s}


def _registered(
    session: Session, name: str, models: list[str | ModelSchema], timeout_s: float | None
) -> RpcRunner:
    runner = RpcRunner(session, name)
    runner.registration = session.engine.register_runner(
        runner, models, timeout_s=float(timeout_s) if timeout_s is not None else None, name=name
    )
    # What a client's runner says its answers cost is not the server owner's money: it neither
    # reserves against nor adds to the spend limits (a runner reporting $10 an answer used up the
    # global daily limit, and every client's paid and free calls were refused).
    runner.registration.spends = False
    return runner


def _kept(session: Session, runner: RpcRunner | None) -> tuple[list[str | ModelSchema], float | None] | None:
    """What ``runner`` serves, to register again if its replacement is refused (a second
    `runner.register` naming a model no runner may take dropped the first's models for all)."""
    registration = runner.registration if runner is not None else None
    if registration is None or registration.models is None:
        return None
    registry = session.engine.registry
    models: list[str | ModelSchema] = []
    for model_id in sorted(registration.models):
        schema = registry.get(model_id) if model_id in registration.owned_models else None
        models.append(schema if schema is not None else model_id)
    return models, registration.timeout_s


async def _unregister(session: Session, params: Params, rid: Any) -> Any:
    runner, session.runner = session.runner, None
    if runner is None:
        return {"unregistered": False}
    runner.close(unregistered=True)
    return {"unregistered": True}


async def _event(session: Session, params: Params, rid: Any) -> Any:
    call_id = params.get("id")
    if isinstance(call_id, bool) or not isinstance(call_id, str | int):  # a list raised TypeError
        raise ApiError(400, "`id` must be the id of one of our calls", code="invalid_value", param="id")
    if session.runner is not None:
        session.runner.event(call_id, params.get("event"))
    return None


RUNNER_METHODS = {"runner.register": _register, "runner.unregister": _unregister, "runner.event": _event}
