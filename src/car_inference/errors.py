"""The exception hierarchy: one root, ``InferenceError``, and a class per failure kind.

Every exception raised across the public API is an ``InferenceError``. Backends translate SDK and
HTTP errors into ``ProviderError`` at their boundary, so nothing above them sees a vendor type.
Messages never contain secrets: provider errors carry status and message text only.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from typing import Any

__all__ = [
    "AllModelsFailed",
    "CircuitOpen",
    "ConfigError",
    "DeviceError",
    "DownloadFailed",
    "InferenceError",
    "InferenceFailed",
    "InvalidInput",
    "ModelNotFound",
    "ModelUnavailable",
    "ProviderError",
    "ProviderRejectedInput",
    "SpendLimitExceeded",
    "StateUnavailable",
    "TokenizationError",
    "TraceNotFound",
    "UnsupportedMode",
    "close_matches",
    "expect",
    "money",
    "validation_summary",
]


class InferenceError(Exception):
    """Root of every error this package raises."""


class ModelNotFound(InferenceError):
    """No model in the catalog matches the name; ``suggestions`` holds close names."""

    def __init__(self, name: str, suggestions: Iterable[str] = (), why: str | None = None) -> None:
        self.name = shortened(name)
        self.suggestions = list(suggestions)
        self.why = why  # what may have kept it from being found (an endpoint that did not answer)
        # A name with an unpaired surrogate ("\ud800") made a message print() could not write.
        shown = self.name.encode("utf-8", "backslashreplace").decode("utf-8")
        message = f"model not found: {shown}"
        if self.suggestions:
            message += f" (did you mean: {', '.join(self.suggestions)}?)"
        if why:
            message += f"; {why}"
        super().__init__(message)


class ModelUnavailable(InferenceError):
    """The model is in the catalog but cannot run here: files not pulled, key not set, no backend."""

    def __init__(self, model_id: str, reason: str) -> None:
        self.model_id = model_id
        self.reason = reason
        self.no_model_for_capability = False  # True from none_for: no model at all, not this one
        super().__init__(f"model {model_id} is not available: {reason}")

    @classmethod
    def none_for(cls, capability: str, reason: str) -> ModelUnavailable:
        """No model of ``capability`` can run (``model_id`` is the capability's name)."""
        error = cls(capability, reason)
        error.args = (f"no {capability} model can run here: {reason}",)
        error.no_model_for_capability = True
        return error


class DownloadFailed(InferenceError):
    """Fetching model files (an explicit pull) failed."""


class InferenceFailed(InferenceError):
    """The model ran but could not produce a result."""


class InvalidInput(InferenceError):
    """The request's input cannot be used: an audio file that is missing or cannot be decoded,
    empty text, a language or voice the model does not have. The caller must change the request
    (a 400 from the server, exit status 2 from the CLI); no other model would do better.
    ``param`` names the request field at fault where one is (the server's error ``param``)."""

    def __init__(self, message: str = "", *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class UnsupportedMode(InferenceError):
    """A backend or model does not implement a mode (tokenize on a remote model) or cannot take
    the request's input (video to a model that reads no video). Caused by the request: no verdict
    on the model's health."""

    def __init__(self, mode: str, backend: str, reason: str, *, param: str | None = None) -> None:
        self.mode = mode
        self.backend = backend
        self.reason = reason
        self.param = param  # the request field that asks for it, where one does (an error's ``param``)
        super().__init__(f"mode {mode} not implemented on backend {backend}: {reason}")


class TokenizationError(InferenceError):
    """Text could not be tokenized or token ids could not be decoded."""


class DeviceError(InferenceError):
    """The accelerator or memory needed to load a model is not there."""


class ConfigError(InferenceError):
    """A configuration or catalog file is invalid; the message names file, line and field."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.path = path
        self.line = line
        self.field = field
        where = ""
        if path:
            where = path + (f":{line}" if line else "")
            if field:
                where += f" [{field}]"
            where += ": "
        super().__init__(where + message)


# Statuses with which a provider refuses the request itself: malformed, too large, or invalid.
INPUT_STATUSES = frozenset({400, 413, 422})


class ProviderError(InferenceError):
    """A remote provider or external server answered with an error, or did not answer.

    ``status`` is the HTTP status (None for connection errors and timeouts); ``retryable`` says
    whether another attempt (another key, model or later) may succeed; ``retry_after`` is the
    provider's Retry-After in seconds when it gave one; ``timeout`` that nothing came back in time.
    """

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        model: str,
        status: int | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
        timeout: bool = False,
    ) -> None:
        self.provider = provider
        self.model = model
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after
        self.timeout = timeout  # no answer in time (ours or the provider's 408/504)
        # "openai/gpt-4o-mini returned 429", not "openai openai/gpt-4o-mini ..."
        prefix = model if model.startswith(f"{provider}/") else f"{provider} {model}"
        if status is not None:
            prefix += f" returned {status}"
        super().__init__(f"{prefix}: {message}")

    @property
    def is_client_error(self) -> bool:
        """A 4xx other than 429: the request or credentials are wrong, not the provider's load."""
        return self.status is not None and 400 <= self.status < 500 and self.status != 429

    @property
    def caused_by_request(self) -> bool:
        """The provider refused this request's input (400, 413, 422): says nothing of its health."""
        return self.status in INPUT_STATUSES

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(provider={self.provider!r}, model={self.model!r}, "
            f"status={self.status!r}, retryable={self.retryable!r}, "
            f"retry_after={self.retry_after!r})"
        )


class ProviderRejectedInput(ProviderError, InvalidInput):
    """A provider refused the request's input (400/413/422: an invalid tool schema, a parameter it
    does not take): the caller must change the request. Another model may accept it, so fallbacks
    still run, but it never counts toward the provider's circuit breaker."""


def money(usd: float) -> str:
    """Dollars with cents, and with the significant digits of an amount under a cent
    (a $0.0001 limit is not "$0.00")."""
    if usd == 0 or not math.isfinite(usd):
        return f"${usd:.2f}"
    decimals = min(10, max(2, 2 - math.floor(math.log10(abs(usd)))))
    text = f"{usd:,.{decimals}f}"
    whole, _, frac = text.partition(".")
    frac = frac.rstrip("0").ljust(2, "0")
    return f"${whole}.{frac}"


class SpendLimitExceeded(InferenceError):
    """A request would take spend over a configured limit; refused before the call."""

    def __init__(
        self,
        scope: str,
        period: str,
        limit_usd: float,
        spent_usd: float,
        estimate_usd: float,
        held_usd: float | None = None,
    ) -> None:
        """``spent_usd``: spent and held by calls in flight together; ``held_usd``: the part
        held, when known (None: the fleet's Redis counted both as one)."""
        self.scope = scope
        self.period = period
        self.limit_usd = limit_usd
        self.spent_usd = spent_usd
        self.estimate_usd = estimate_usd
        # Set by the engine when the model the caller chose is over the limit: no fallback then.
        self.refuses_request = False
        # Estimates held by calls in flight were reported as "spent" ($0.0451 while $0.0001 was).
        if held_usd is None:
            so_far = f"spent or held by calls in flight {money(spent_usd)}"
        elif held_usd > 0:
            so_far = f"spent {money(spent_usd - held_usd)} and {money(held_usd)} held by calls in flight"
        else:
            so_far = f"spent {money(spent_usd)}"
        super().__init__(
            f"{period} spend limit for {scope} is {money(limit_usd)}; {so_far}, "
            f"this request would add about {money(estimate_usd)}"
        )


class StateUnavailable(InferenceError):
    """The learned-state store cannot be used now: the shared one (PostgreSQL) is unreachable
    (writes wait in memory meanwhile, so nothing is lost), or another process keeps ``state.db``
    write-locked past its busy timeout (that write was not made). Retry after ``retry_after``
    seconds."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class CircuitOpen(InferenceFailed):
    """The model failed repeatedly; its circuit breaker is open until the cooldown ends."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        super().__init__(f"{model_id}: circuit open after repeated failures; skipped until its cooldown ends")


class TraceNotFound(InferenceError):
    """Feedback named a trace id the outcome store has never seen."""

    def __init__(self, trace_id: str, hint: str = "") -> None:
        self.trace_id = trace_id
        message = f"no such trace: {shortened(trace_id)}"  # a 1 MB id is not echoed back
        super().__init__(f"{message} ({hint})" if hint else message)


class AllModelsFailed(InferenceFailed):
    """Every candidate (the routed model and its fallbacks) failed; ``attempts`` lists each one."""

    def __init__(self, attempts: list[tuple[str, InferenceError]]) -> None:
        self.attempts = attempts
        lines = "; ".join(f"{model}: {err}" for model, err in attempts)
        super().__init__(f"all {len(attempts)} candidate model(s) failed: {lines}")


# No model name is longer; a longer one is not compared with the catalog (``difflib`` over a
# megabyte "name" took 0.14 s a request, on the event loop of every client) nor echoed whole.
MAX_NAME_CHARS = 256


def shortened(name: str) -> str:
    """``name`` as an error message shows it: at most ``MAX_NAME_CHARS`` characters."""
    return name if len(name) <= MAX_NAME_CHARS else f"{name[:MAX_NAME_CHARS]}... ({len(name):,} characters)"


def close_matches(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Names among ``candidates`` that look like ``name`` (case-insensitive), best first; none for
    a name longer than any model's (``MAX_NAME_CHARS``)."""
    if len(name) > MAX_NAME_CHARS:
        return []
    pool = list(dict.fromkeys(candidates))
    lowered = {c.lower(): c for c in pool}
    needle = name.lower()
    found = [lowered[m] for m in difflib.get_close_matches(needle, list(lowered), n=n, cutoff=0.5)]
    if len(found) < n:
        # Substring hits catch "qwen3" -> "qwen/qwen3-0.6b:q8_0" that ratio matching misses.
        for c in pool:
            if needle and needle in c.lower() and c not in found:
                found.append(c)
            if len(found) >= n:
                break
    return found


def validation_summary(exc: Any) -> str:
    """A pydantic ``ValidationError`` in one line: each field's location and message."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", "")).removeprefix("Value error, ")  # a validator's own words
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) or str(exc)


def expect(value: Any, kind: type, what: str) -> None:
    """``InvalidInput`` unless ``value`` is a ``kind``: a public method handed a string or a dict
    where it takes a request says so (``generate takes a GenerateRequest, not str``) instead of
    failing on an attribute deep inside."""
    if not isinstance(value, kind):
        article = "an" if kind.__name__[:1] in "AEIOU" else "a"
        raise InvalidInput(f"{what} takes {article} {kind.__name__}, not {type(value).__name__}")
