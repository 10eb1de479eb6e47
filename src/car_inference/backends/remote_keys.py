"""Which key a hosted call goes out with, and the 429s that make it wait: the environment's keys
for a backend built without a key pool (``EnvKeys``), the rest of a server reached without any key
(``KeylessRest``), and the errors a rate-limited model is answered with without a call."""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING

from ..errors import ProviderError
from ..schema import ModelSchema

if TYPE_CHECKING:
    from ..config import RemoteSettings
    from .base import BackendContext
    from .remote import Endpoint

__all__ = ["EnvKeys", "KeylessRest", "resting", "soonest"]


def resting(endpoint: Endpoint, model: ModelSchema, left: float) -> ProviderError:
    """Every usable key rests after the provider's 429 (or the keyless server asked to be left
    alone): answered as the provider's 429 would be, without calling it (each request probed it
    once more, and three such 429s opened the model's circuit: a 503 for its cooldown where the
    key was free again in seconds)."""
    whose = f"every key in {endpoint.key_env} is" if endpoint.key_env else "it is"
    return ProviderError(
        f"{model.id}: {whose} rate limited by {endpoint.provider} for {left:.1f} s more (its Retry-After)",
        provider=endpoint.provider,
        model=model.id,
        status=429,
        retryable=True,
        retry_after=left,
    )


def soonest(before: ProviderError | None, error: ProviderError) -> ProviderError:
    """The error a key rotation ends with: the last key's, but when every key tried was rate
    limited, waiting for the soonest of their ``Retry-After``s (the last key's 12 s was passed
    on while the first was free again after 7)."""
    limited = before is not None and before.status == error.status == 429
    wait = before.retry_after if limited and before is not None else None
    if wait is not None and (error.retry_after is None or wait < error.retry_after):
        error.retry_after = wait
    return error


class EnvKeys:
    """Keys straight from the environment and config, for a backend built without a key pool."""

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx

    def acquire(self, env_var: str, *, resting: bool = True) -> str | None:
        candidates = [os.environ.get(env_var, ""), *os.environ.get(env_var + "S", "").split(",")]
        candidates += self.ctx.config.keys.get(env_var, [])
        return next((k.strip() for k in candidates if k.strip()), None)

    def report(self, env_var: str, key: str, *, status: int | None, retry_after: float | None) -> None:
        return None

    def refused(self, env_var: str) -> bool:
        return False  # nothing is remembered without a pool

    def rest_left(self, env_var: str) -> float:
        return 0.0


class KeylessRest:
    """A server reached without a key (a vLLM or Ollama of one's own, a ``--base-url``) that
    answered 429 rests as a key would: its ``Retry-After``, else ``rate_limit_cooldown_s``. Key
    pools only know keys, so every request probed it again, each one refused, and three refusals
    opened the model's circuit. Per address and headers, in this process."""

    def __init__(self, settings: RemoteSettings) -> None:
        self.settings = settings
        self._until: dict[tuple[str | None, tuple[tuple[str, str], ...]], float] = {}
        self._lock = threading.Lock()

    def report(self, endpoint: Endpoint, status: int | None, retry_after: float | None) -> None:
        where = (endpoint.base_url, endpoint.headers)
        with self._lock:
            if status == 429:
                wait = retry_after if retry_after is not None else self.settings.rate_limit_cooldown_s
                self._until[where] = time.monotonic() + wait
            elif status is not None and status < 400:
                self._until.pop(where, None)

    def left(self, endpoint: Endpoint) -> float:
        with self._lock:
            until = self._until.get((endpoint.base_url, endpoint.headers))
        return 0.0 if until is None else max(0.0, until - time.monotonic())
