"""The engine's side of managed runtimes: which runtime serves a model, starting it on first use,
and a backend that speaks OpenAI to it once it answers.

``RuntimeSupervisor.backend_for(model, lookup)`` is the engine's hook in its backend lookup: a
model whose source says ``managed = true`` gets a ``ManagedBackend``, which starts (or attaches
to) the model's server on its first request and hands the request to the OpenAI-compatible
backend with the model pointed at the server's URL. Other models get ``lookup(model)`` unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from ..backends.base import PromptCounter
from ..config import CarConfig
from ..errors import (
    InferenceError,
    InferenceFailed,
    InvalidInput,
    ModelNotFound,
    ProviderError,
    close_matches,
)
from ..requests import TokenUsage
from ..schema import ModelSchema, OpenAISource
from ..stream import Done, UsageEvent
from .ollama import ollama_host
from .specs import RUNTIME_FOR_KIND, RuntimeSpec, is_managed, runtime_specs
from .state import RunFiles, pid_alive, run_dir, tree_rss_mb
from .supervisor import ManagedRuntime, RuntimeSettings, RuntimeState, RuntimeStatus

if TYPE_CHECKING:
    from ..backends.base import Backend

__all__ = ["ManagedBackend", "RuntimeSupervisor", "disk_status", "stop_elsewhere"]

BackendLookup = Callable[[ModelSchema], "Backend"]

log = logging.getLogger(__name__)


class RuntimeSupervisor:
    """Every runtime instance this process uses, by name. ``registry`` (optional) receives the
    models a started server serves that the catalog lacks (Ollama's pulled tags)."""

    def __init__(
        self, config: CarConfig, registry: Any = None, settings: RuntimeSettings | None = None
    ) -> None:
        self.config = config
        self.home: Path = config.home
        self.registry = registry
        self.settings = settings or config.runtimes.model_copy()  # [runtimes] in config.toml
        self.specs = runtime_specs(self.home)
        self._runtimes: dict[str, ManagedRuntime] = {}
        self._backends: dict[str, ManagedBackend] = {}
        self._served_queue: list[tuple[str, str, list[str]]] = []
        self._lock = threading.Lock()
        if registry is not None and hasattr(registry, "on_miss"):  # `ollama/<tag>` of a running Ollama
            registry.on_miss = functools.partial(self._on_miss, registry.on_miss)

    # --- lookup --------------------------------------------------------------------------------

    def spec_for(self, model: ModelSchema) -> RuntimeSpec:
        return self.specs[RUNTIME_FOR_KIND[model.kind]]

    def runtime_for(self, model: ModelSchema) -> ManagedRuntime:
        """The instance that serves ``model`` (created, not started)."""
        spec = self.spec_for(model)
        name = spec.instance(model)
        with self._lock:
            runtime = self._runtimes.get(name)
            if runtime is None:
                runtime = self._runtimes[name] = ManagedRuntime(
                    spec,
                    name,
                    self.home,
                    lambda: spec.launch(model, self.config),
                    self.settings,
                    model_id=model.id if spec.per_model else None,
                    on_ready=functools.partial(self._register_served, spec.name),
                )
            return runtime

    def backend_for(self, model: ModelSchema, lookup: BackendLookup) -> Backend:
        """The engine's hook: ``lookup(model)`` for a model we do not start, else its
        ``ManagedBackend`` (nothing starts until the first request)."""
        if not is_managed(model):
            return lookup(model)
        runtime = self.runtime_for(model)
        with self._lock:
            backend = self._backends.get(runtime.name)
            if backend is None:
                backend = self._backends[runtime.name] = ManagedBackend(
                    runtime, lookup, self.apply_served, self.config
                )
            return backend

    def managed_models(self) -> list[ModelSchema]:
        return [m for m in self.registry.list() if is_managed(m)] if self.registry is not None else []

    def find(self, name: str) -> ManagedRuntime:
        """A runtime instance by its name, by a managed model's id or name, or ``ollama``.
        ``ModelNotFound`` with close names otherwise."""
        if name in self._runtimes:
            return self._runtimes[name]
        models = self.managed_models()
        for model in models:
            spec = self.spec_for(model)
            if name == spec.instance(model) or (name == spec.name and not spec.per_model):
                return self.runtime_for(model)
        found = self.registry.find(name) if self.registry is not None else None
        if found is not None and is_managed(found):
            return self.runtime_for(found)
        hint = "mark a model `managed = true` in its [models.source] in models.toml"
        if found is not None:  # known, but runs in-process or on a server nobody starts for it
            raise InvalidInput(f"{found.id} is not a managed model, so no runtime runs it: {hint}")
        if name in RUNTIME_FOR_KIND.values():
            on_it = [self.spec_for(m).instance(m) for m in models if self.spec_for(m).name == name]
            if on_it:  # one server per model: which one is meant
                raise InvalidInput(
                    f"{name} runs one server per model: name one of its instances ({', '.join(on_it)}) "
                    "or a managed model"
                )
            raise InvalidInput(f"no managed model runs on {name}: {hint}")
        names = [self.spec_for(m).instance(m) for m in models] + [m.id for m in models]
        raise ModelNotFound(name, close_matches(name, names, n=3))

    # --- what the servers serve ----------------------------------------------------------------

    def _register_served(self, runtime: str, base_url: str, served: list[str]) -> None:
        """Called on the monitor thread (or a request's): queue what a server serves for
        ``apply_served``, which runs where the registry is used (the registry is not thread-safe)."""
        with self._lock:
            self._served_queue.append((runtime, base_url, served))

    def apply_served(self) -> None:
        """Add the served models the catalog does not know yet (e.g. every pulled Ollama tag)."""
        with self._lock:
            queued, self._served_queue = self._served_queue, []
        for runtime, base_url, served in queued:
            self._register(runtime, base_url, served)

    def _register(self, runtime: str, base_url: str, served: list[str]) -> None:
        if self.registry is None:
            return
        spec = self.specs[runtime]
        # A tag the catalog has under another id (local/qwen-ollama for qwen3:0.6b) is not added twice.
        known = {name for m in self.registry.list() if (name := spec.serves_as(m, base_url))}
        for wire_name in served:
            source = spec.served_source(base_url, wire_name)
            model_id = f"{spec.name}/{wire_name}"
            if source is None or wire_name in known or self.registry.find(model_id) is not None:
                continue
            self.registry.register(
                ModelSchema.model_validate({
                    "id": model_id, "name": wire_name, "provider": spec.name,
                    "capabilities": ["generate"], "source": source, "tags": ["runtime"],
                })
            )  # fmt: skip

    def _on_miss(self, previous: Callable[[str], bool] | None, name: str) -> bool:
        """The registry's hook for a name it does not know, after the one it had: ``ollama/<tag>``
        when an Ollama the catalog's managed models use answers (run by any process, or a system
        service) registers the tags it lists. Nothing is started for it."""
        if previous is not None and previous(name):
            return True
        spec = self.specs["ollama"]
        if not name.lower().startswith(spec.name + "/"):
            return False
        hosts = {str(getattr(m.source, "host", "")) for m in self.managed_models() if m.kind == spec.kind}
        for host in sorted(h for h in hosts if h):
            base_url = ollama_host(host)
            try:
                served = spec.served(base_url, timeout_s=1.0)
            except (httpx.HTTPError, ValueError, KeyError, TypeError):
                continue
            self._register(spec.name, base_url, served)
        return self.registry is not None and self.registry.find(name) is not None

    # --- reports and control -------------------------------------------------------------------

    def statuses(self) -> list[RuntimeStatus]:
        """This process's instances, those other processes run (their records on disk), and the
        catalog's managed models that nothing runs."""
        self.apply_served()
        found: dict[str, RuntimeStatus] = {name: r.status() for name, r in self._runtimes.items()}
        folder = run_dir(self.home)
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            name = path.stem
            if name in found and found[name].state is not RuntimeState.STOPPED:
                continue
            status = disk_status(self.home, name)
            if status is not None:
                found[name] = status
        for model in self.managed_models():
            spec = self.spec_for(model)
            name = spec.instance(model)
            found.setdefault(
                name,
                RuntimeStatus(
                    name=name, runtime=spec.name, model_id=model.id if spec.per_model else None,
                    state=RuntimeState.STOPPED, log_path=str(RunFiles(self.home, name).log_path),
                ),
            )  # fmt: skip
        return [found[k] for k in sorted(found)]

    def close(self) -> None:
        """Stop every server this process started."""
        for runtime in list(self._runtimes.values()):
            runtime.stop()


def disk_status(home: Path, name: str) -> RuntimeStatus | None:
    """An instance as its record on disk shows it: running while its owner holds the lock,
    ``stopped`` (with the error ``owner gone``) when the owner died without cleaning up."""
    files = RunFiles(home, name)
    record = files.read_state()
    if record is None:
        return None
    owned = files.locked_elsewhere()
    failed = record.get("state") == RuntimeState.FAILED  # its owner gave up: the record says why
    state = RuntimeState(record.get("state", "stopped")) if owned or failed else RuntimeState.STOPPED
    error = record.get("error") if failed else None if owned else "owner gone; record left behind"
    used = files.used_at()
    return RuntimeStatus(
        name=name,
        runtime=str(record.get("runtime", "?")),
        model_id=record.get("model_id"),
        state=state,
        base_url=record.get("base_url") if owned else None,
        pid=record.get("pid"),
        owner_pid=record.get("owner_pid"),
        restarts=int(record.get("restarts") or 0),
        started_at=record.get("started_at"),
        idle_s=None if used is None or not owned else round(time.time() - used, 1),
        served=list(record.get("served") or []),
        rss_mb=tree_rss_mb(pid) if owned and isinstance(pid := record.get("pid"), int) else None,
        log_path=str(files.log_path),
        error=error,
    )


def stop_elsewhere(home: Path, name: str, timeout_s: float = 30.0) -> bool:
    """Ask the process that owns ``name`` to stop it and wait until it has. A record whose owner
    died (its lock is free) is cleaned up, and a server still alive from it is sent SIGTERM.
    False when nothing was running; ``InferenceFailed`` when it still runs after ``timeout_s``
    (its owner stops it when it sees the request)."""
    files = RunFiles(home, name)
    if not files.locked_elsewhere():
        record = files.read_state()
        files.clear_state()
        pid = (record or {}).get("pid")
        if isinstance(pid, int) and pid_alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
            return True
        return False
    files.request_stop()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not files.locked_elsewhere():
            files.clear_stop()
            return True
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    if not files.locked_elsewhere():
        files.clear_stop()
        return True
    owner = (files.read_state() or {}).get("owner_pid")
    raise InferenceFailed(
        f"{name}: still stopping after {timeout_s:g} s; its owner"
        + (f" (pid {owner})" if owner else "")
        + " was asked and stops it when it sees the request (`car runtimes list` shows when)"
    )


class ManagedBackend:
    """The backend of a model whose server we start: ensure the server answers, then hand the
    call to the OpenAI-compatible backend with the model pointed at that server."""

    def __init__(
        self,
        runtime: ManagedRuntime,
        lookup: BackendLookup,
        after_start: Callable[[], None],
        config: CarConfig,
    ) -> None:
        self.runtime = runtime
        self._config = config
        self._lookup = lookup
        self._after_start = after_start
        self._targets: dict[tuple[str, str], ModelSchema] = {}
        self._llama_wire: Any = None

    async def _ready(self, model: ModelSchema) -> tuple[Any, ModelSchema]:
        url = self.runtime.ready_url()
        if url is None:
            stop = threading.Event()
            try:
                url = await asyncio.to_thread(self.runtime.ensure, stop)
            except asyncio.CancelledError:
                stop.set()  # the waiting thread gives up at its next tick
                raise
            self._after_start()  # on the loop: what it serves joins the registry here
        target = self._target(model, url)
        return self._wire(self._lookup(target)), target

    def _wire(self, backend: Any) -> Any:
        """The OpenAI-compatible backend, or for a llama.cpp server the one that writes a JSON
        schema the way that server takes it (``llamacpp_wire.LlamaServerWire``)."""
        if self.runtime.spec.name != "llamacpp" or not hasattr(backend, "ctx"):
            return backend
        if self._llama_wire is None:
            from .llamacpp_wire import LlamaServerWire

            self._llama_wire = LlamaServerWire(backend.ctx)
        return self._llama_wire

    async def _preflight(self, model: ModelSchema, request: Any) -> int | None:
        """A llama.cpp server's request checked as in-process before it goes (or the server
        starts): what it cannot take is the client's error, never the model's failure. The
        prompt's tokens when counted."""
        if self.runtime.spec.name != "llamacpp":
            return None
        try:
            counter = self._lookup(model)
        except InferenceError:
            return None
        from .llamacpp_wire import preflight

        window = self.runtime.spec.context_window(model, self._config)
        return await asyncio.to_thread(preflight, counter, model, request, window)

    def _upstream(self, exc: ProviderError) -> ProviderError:
        if self.runtime.spec.name != "llamacpp":
            return exc
        from .llamacpp_wire import upstream_error

        return upstream_error(exc)

    async def _back_after_crash(self, exc: ProviderError, pid: int | None) -> bool:
        """Whether a call that failed because its server (``pid`` when the call went out) died
        under it can run once more: True once the restarted server answers, whether this process
        runs it or another one does (an attached process failed at once before). False for any
        other failure (the same server still answers), for an external server, and when none
        answers again within the start timeout."""
        if exc.status is not None or exc.timeout:
            return False
        runtime = self.runtime
        same = pid is None or runtime.server_pid() == pid  # None: an owner gone took its record along
        if same and runtime.alive() and await asyncio.to_thread(runtime.answers):
            return False
        deadline = time.monotonic() + runtime.start_timeout_s
        while time.monotonic() < deadline:
            back = await asyncio.to_thread(runtime.comeback)
            if back is not None:
                return back  # False: it gave up restarting, or was stopped: the call's error stands
            await asyncio.sleep(0.1)
        return False

    def _target(self, model: ModelSchema, url: str) -> ModelSchema:
        key = (model.id, url)
        target = self._targets.get(key)
        if target is None:
            key_env = getattr(model.source, "api_key_env", None)
            source = OpenAISource(
                base_url=url + "/v1",
                model_name=self.runtime.spec.wire_name(model),
                api_key_env=key_env,
                needs_key=key_env is not None,
                # What the model does in-process, the server's way: a GGUF's system prompt and
                # its repeat penalty (SmolLM2's catalog defaults) in the server's body field.
                system_prompt=getattr(model.source, "system_prompt", None),
                repeat_penalty_field=self.runtime.spec.repeat_penalty_field,
            )
            target = self._targets[key] = model.model_copy(update={"source": source})
        return target

    def warm_up(self, model: ModelSchema) -> None:
        self.runtime.ensure()

    async def generate(self, model: ModelSchema, request: Any) -> Any:
        prompt = await self._preflight(model, request)
        again = False
        while True:  # twice at most: once more when the server died under the first call
            backend, target = await self._ready(model)
            pid = self.runtime.server_pid()
            with self.runtime.busy():
                try:
                    output = await backend.generate(target, request)
                    break
                except ProviderError as exc:
                    if again or not await self._back_after_crash(exc, pid):
                        raise self._upstream(exc) from None
            again = True
        if output.usage is None:
            usage = await self._count_usage(model, request, output, prompt)
            if usage is not None:
                output = output.model_copy(update={"usage": usage})
        return output

    async def stream(self, model: ModelSchema, request: Any) -> AsyncGenerator[Any, None]:
        prompt = await self._preflight(model, request)
        for again in (False, True):
            backend, target = await self._ready(model)
            pid, sent = self.runtime.server_pid(), False
            with self.runtime.busy():
                events = backend.stream(target, request)
                try:
                    async with contextlib.aclosing(events):
                        async for event in events:
                            sent = True
                            if isinstance(event, Done) and event.usage is None:
                                usage = await self._count_usage(model, request, event, prompt)
                                if usage is not None:
                                    yield UsageEvent(usage=usage)
                                    yield event.model_copy(update={"usage": usage})
                                    continue
                            yield event
                    return
                except ProviderError as exc:  # before any event: the restarted server takes it
                    if sent or again or not await self._back_after_crash(exc, pid):
                        raise self._upstream(exc) from None

    async def _count_usage(
        self, model: ModelSchema, request: Any, answer: Any, prompt: int | None = None
    ) -> TokenUsage | None:
        """Usage the server left out (llama-cpp-python's server sends none in a stream, and our
        backend always streams), counted on the model's own vocabulary in-process: the prompt as
        the chat template renders it, the answer as written. None where the model's kind has no
        local tokenizer here; counting never fails the answer."""
        try:
            counter = self._lookup(model)
        except InferenceError:
            return None
        if not isinstance(counter, PromptCounter):
            return None
        written = (answer.thinking or "") + answer.text
        written += "".join(json.dumps(c.arguments) for c in answer.tool_calls)

        def count() -> tuple[int, int]:
            counted = prompt if prompt is not None else counter.count_prompt_tokens(model, request)
            return counted, counter.count_text_tokens(model, written)

        try:
            prompt_tokens, completion = await asyncio.to_thread(count)
        except (InferenceError, OSError, ValueError, RuntimeError) as exc:
            log.debug("could not count the tokens of %s's answer: %s", model.id, exc)
            return None
        return TokenUsage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion,
            total_tokens=prompt_tokens + completion,
            context_window=self.runtime.spec.context_window(model, self._config),
        )

    async def embed(self, model: ModelSchema, request: Any) -> Any:
        backend, target = await self._ready(model)
        with self.runtime.busy():
            return await backend.embed(target, request)
