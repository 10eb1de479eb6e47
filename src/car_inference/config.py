"""Settings: ``$CAR_HOME/config.toml`` (default ``~/.car``) with environment overrides.

Precedence, lowest first: built-in defaults, ``config.toml``, environment variables. Any setting can
be overridden as ``CAR_<SECTION>__<KEY>`` (e.g. ``CAR_ROUTING__PREFER_LOCAL=true``); a few have
short names: ``CAR_BACKEND_CACHE_MB``, ``CAR_SERVER_API_KEYS`` (comma-separated),
``CAR_DEFAULT_MODEL``. A bad file or variable raises ``ConfigError`` naming where it is.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ._tomlfile import read_toml, readable_exists, validate_file
from .errors import ConfigError
from .redaction import checked_userinfo, mask_secret, redact_url
from .schema import ModelCapability

log = logging.getLogger("car_inference.config")

__all__ = [
    "BreakerSettings",
    "CarConfig",
    "CarPaths",
    "CoordinationSettings",
    "LocalSettings",
    "ModelChoices",
    "RemoteSettings",
    "RoutingSettings",
    "ServerSettings",
    "SpeechSettings",
    "SpendLimit",
    "SpendSettings",
    "StateSettings",
    "car_home",
    "load_config",
]

DEFAULT_GENERATE_MODEL = "huggingface/smollm2-135m-instruct:q4_1"
DEFAULT_EMBED_MODEL = "sentence-transformers/all-minilm-l6-v2"


def car_home(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    raw = env.get("CAR_HOME")
    return Path(raw).expanduser() if raw else Path.home() / ".car"


def make_home(home: Path) -> None:
    """Create the car home if needed; ``ConfigError`` when it cannot be (a file of that name, a
    folder that may not be made), one line instead of the traceback of the first write there."""
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        why = "it is a file, not a folder" if home.is_file() else f"it cannot be made: {exc.strerror}"
        raise ConfigError(f"the car home (CAR_HOME) cannot be used: {why}", path=str(home)) from exc


class CarPaths(BaseModel):
    """Where things live under ``$CAR_HOME``."""

    model_config = ConfigDict(frozen=True)

    home: Path

    @property
    def config_file(self) -> Path:
        return self.home / "config.toml"

    @property
    def models_file(self) -> Path:
        return self.home / "models.toml"

    @property
    def state_db(self) -> Path:
        return self.home / "state.db"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def cache_dir(self) -> Path:
        """Files derived from installed models and rebuilt when missing (reassembled weights)."""
        return self.home / "cache"


# The longest duration a setting may name (about three years): past threading's TIMEOUT_MAX
# (9.2e9 s) a wait raised OverflowError, and `tick_s = 1e10` crashed the runtime monitor.
MAX_SECONDS = 1e8


class _Section(BaseModel):
    # No setting means infinity: `tick_s = inf` crashed the runtime monitor (a timestamp out of
    # range); "never" is 0 or unset where a setting has it.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _bounded_seconds(cls, value: Any, info: ValidationInfo) -> Any:
        name = info.field_name or ""
        if name.endswith("_s") and isinstance(value, int | float) and value > MAX_SECONDS:
            raise ValueError(f"at most {MAX_SECONDS:,.0f} seconds")
        return value


class ModelChoices(_Section):
    """A model id or name per capability."""

    generate: str | None = None
    embed: str | None = None
    classify: str | None = None
    rerank: str | None = None
    grounding: str | None = None
    speech_to_text: str | None = None
    text_to_speech: str | None = None
    image_generation: str | None = None
    video_generation: str | None = None

    def for_capability(self, capability: ModelCapability | str) -> str | None:
        return getattr(self, str(ModelCapability(capability)), None)


def _default_models() -> ModelChoices:
    return ModelChoices(
        generate=DEFAULT_GENERATE_MODEL,
        embed=DEFAULT_EMBED_MODEL,
        speech_to_text="systran/faster-whisper-base",
        text_to_speech="piper/en_us-joe-medium",
    )


_LEGACY_ROUTING = frozenset({
    "exploration_rate", "quality_first_cold_start", "min_observations", "bootstrap_min_task_observations",
    "bootstrap_quality_floor", "prior_strength",
})  # fmt: skip


class RoutingSettings(_Section):
    # Quality first: at these weights a model 10x dearer must be about 2.6 points better (on a
    # 0..1 quality scale), 10x slower about 1.7 points (``routing/scoring.py``).
    quality_weight: float = Field(default=0.9, ge=0)
    latency_weight: float = Field(default=0.03, ge=0)
    cost_weight: float = Field(default=0.07, ge=0)
    interactive_latency_boost: float = Field(
        default=2.0, ge=1, description="latency weight multiplier for interactive work"
    )
    prefer_local: bool = False
    prior_sd: float = Field(
        default=0.15, gt=0, le=1, description="uncertainty (standard deviation) of a model's prior quality"
    )
    exploration: float = Field(
        default=1.0,
        ge=0,
        le=4,
        description="Thompson sampling scale: 1 samples each model's quality belief, 0 routes on its mean",
    )
    settle_after: int = Field(
        default=1500,
        ge=0,
        description="outcomes in a context (a template: half as many) before draws narrow to settled_width",
    )
    settled_width: float = Field(
        default=0.25,
        ge=0,
        le=1,
        description="a settled context's draws, as a share of each belief's uncertainty (1: never narrow)",
    )

    seed: int | None = None
    max_fallbacks: int = Field(default=3, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _legacy_keys(cls, data: Any) -> Any:
        """Settings of the old cold-start and epsilon-greedy router (and ``prior_strength``, read by
        the residuals it no longer keeps): exploration now comes from the uncertainty of each
        model's belief. ``exploration_rate = 0`` still means none."""
        if isinstance(data, dict) and _LEGACY_ROUTING.intersection(data):
            data = dict(data)
            rate = data.pop("exploration_rate", None)
            if rate is not None and "exploration" not in data:
                data["exploration"] = 0.0 if rate == 0 else 1.0
            dropped = sorted(_LEGACY_ROUTING.intersection(data))
            for key in dropped:
                del data[key]
            if dropped:
                log.warning("[routing] %s: unused by this router (see README, Routing)", ", ".join(dropped))
        return data

    @model_validator(mode="after")
    def _some_weight(self) -> RoutingSettings:
        """All three weights 0 scored every model 0, and the order of the catalog chose."""
        if not (self.quality_weight or self.latency_weight or self.cost_weight):
            raise ValueError(
                "quality_weight, latency_weight and cost_weight are all 0: nothing would tell models"
                " apart; give one a positive weight (the defaults are 0.9, 0.03 and 0.07)"
            )
        return self


class LocalSettings(_Section):
    n_ctx: int = Field(
        default=8192, ge=256, description="context loaded for GGUF models (capped by the model's)"
    )
    n_threads: int | None = Field(default=None, ge=1)
    # Prompt tokens a llama.cpp turn reads at most: another client waits up to one batch. 128 reads
    # 3,000 tokens as fast as 512 did here (79 against 76 tokens/s) with a quarter of the wait,
    # and the same greedy answer.
    n_batch: int = Field(default=128, ge=1)
    n_gpu_layers: int = 0
    cache_mb: int = Field(default=4096, ge=0, description="memory budget for loaded models")
    repack_weights: bool | None = Field(
        default=None,
        description="llama.cpp's repacked weight layouts (extra buffer types); unset: on, except "
        "where llama.cpp runs AMX kernels, which crash on some CPUs (backends/ggml_cpu.py)",
    )


class RemoteSettings(_Section):
    """Calls to hosted APIs and OpenAI-compatible servers. SDK retries are always off: the engine
    retries by trying another key or another model."""

    timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="until the first stream event, and between events (SSE comments do not count)",
    )
    connect_timeout_s: float = Field(default=10.0, gt=0)
    rate_limit_cooldown_s: float = Field(default=30.0, ge=0, description="a 429 without Retry-After")


class BreakerSettings(_Section):
    failure_threshold: int = Field(default=3, ge=1)
    cooldown_s: float = Field(default=30.0, ge=0)


class SpendLimit(_Section):
    daily_usd: float | None = Field(default=None, ge=0)
    monthly_usd: float | None = Field(default=None, ge=0)


class SpendSettings(SpendLimit):
    providers: dict[str, SpendLimit] = Field(default_factory=dict)


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8642, ge=0, le=65535)
    # repr=False here and below: print(engine.config) showed every key (and URL passwords) in clear
    api_keys: list[str] = Field(default_factory=list, repr=False)
    max_body_mb: float = Field(default=32.0, gt=0)

    @field_validator("api_keys")
    @classmethod
    def _stripped(cls, keys: list[str]) -> list[str]:
        """Keys without the spaces around them, as a client's bearer token is read (and as
        CAR_SERVER_API_KEYS splits them): `" k3 "` in config.toml matched no token, ever, and
        still let the server listen beyond loopback. An empty key is no key."""
        return [k.strip() for k in keys if k.strip()]

    max_concurrency: int = Field(default=64, ge=1)
    request_timeout_s: float = Field(default=600.0, gt=0)
    record_delay_ms: float = Field(
        default=50.0, ge=0, le=10_000, description="outcome records of this window share one commit"
    )
    # The writer's queue holds each answer's record (its counts, last user turn and answer text) in
    # memory until the state store has it: past this many, requests are refused (503) until it
    # catches up.
    max_pending_records: int = Field(
        default=50_000, ge=0, description="503 beyond this many records not yet written; 0: never"
    )
    body_timeout_s: float = Field(
        default=30.0, gt=0, description="a request body must arrive within this long (408 otherwise)"
    )
    # uvicorn has no bound on how long headers take: slow-header connections held a descriptor each.
    header_timeout_s: float = Field(
        default=10.0, gt=0, description="a request's headers must arrive within this long (408, closed)"
    )
    # A WebSocket message is parsed on the event loop in one go, every other client waiting:
    # 4 MB takes ~12 ms here (32 MB ~80 ms) and still holds a long prompt or a large image.
    ws_max_message_mb: float = Field(default=4.0, gt=0, description="largest JSON-RPC message")
    ws_max_batch: int = Field(default=100, ge=1, description="most calls in one JSON-RPC batch")
    # Models a WebSocket client brings with runner.register (objects, not ids of delegated models
    # in models.toml) are served when named; routed to other clients' requests only when on.
    route_client_models: bool = Field(default=False, description="route requests to models clients bring")
    # Requests one WebSocket may have in flight at once: one client cannot take every slot.
    ws_max_in_flight: int = Field(default=16, ge=1, description="concurrent calls per WebSocket")
    # WebSockets one client may hold open: each is a file descriptor, and one client opening
    # thousands (a leak, or on purpose) could use up the process's and leave no one able to connect.
    ws_max_sockets_per_client: int = Field(
        default=32, ge=0, description="WebSockets open from one client (key, else address); 0: no bound"
    )
    # Requests one client (its API key when the server has keys, else its address) may have in
    # flight at once, HTTP and JSON-RPC together: 64 long chats from one client answered every
    # other client 429 while they ran. Behind a proxy that hides addresses, with no keys, every
    # client is one: raise it or set 0 (no bound) there.
    max_in_flight_per_client: int = Field(
        default=16, ge=0, description="requests in flight from one client (key, else address); 0: no bound"
    )
    # Image URLs the server fetches for clients (backends/image_input.py): on, a client could reach
    # loopback and internal services through the server (SSRF) or probe their ports.
    fetch_private_urls: bool = Field(
        default=False,
        description="whether the server fetches image URLs that point at loopback or private "
        "addresses for clients",
    )


class RuntimeSettings(_Section):
    """Servers car starts and supervises (llama.cpp server, vLLM, Ollama): see ``runtimes/``."""

    start_timeout_s: float | None = Field(default=None, gt=0, description="None: the runtime's own")
    idle_timeout_s: float | None = Field(default=900.0, ge=0, description="0 (or None): never idle-stop")
    backoff_s: float = Field(default=1.0, ge=0, description="first restart delay; doubles per failure")
    backoff_max_s: float = Field(default=30.0, ge=0)
    max_restarts: int = Field(default=5, ge=0, description="failures in a row before giving up")
    tick_s: float = Field(default=0.25, gt=0, description="how often the monitor looks")
    stop_grace_s: float = Field(default=10.0, ge=0, description="SIGTERM, then SIGKILL after this")
    recheck_s: float = Field(default=5.0, ge=0, description="an attached server is probed this often")


POSTGRES_SCHEMES = ("postgresql", "postgres")


class StateSettings(_Section):
    """Where the learned state (outcomes, traces, feedback, spend) lives: ``$CAR_HOME/state.db``
    by default, or a PostgreSQL database several replicas share."""

    url: str | None = Field(
        default=None, repr=False, description='e.g. "postgresql://car@db:5432/car"; None: SQLite'
    )
    buffer_records: int = Field(
        default=10_000,
        ge=0,
        description="PostgreSQL unreachable: records kept in memory until it returns; later ones are dropped",
    )
    answer_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="PostgreSQL: a connection held this long waiting for the database is closed and the"
        " database counted as unreachable (a server that hangs without closing its connections)",
    )
    trace_retention_days: float = Field(
        default=30.0,
        ge=0,
        description="traces (and their feedback) older than this are deleted, hourly by `car serve` or by"
        " `car state prune`; the learned counters and the spend ledger stay; 0: keep every trace",
    )
    template_retention_days: float = Field(
        default=90.0,
        ge=0,
        description="the learned rows of a template (a prompt prefix many requests share) not seen for this"
        " long are deleted, hourly by `car serve` or by `car state prune`; 0: keep every template",
    )

    @field_validator("url")
    @classmethod
    def _url_userinfo(cls, url: str | None) -> str | None:
        if url is not None and urlsplit(url).scheme not in POSTGRES_SCHEMES:
            # found only when the store opened, without the variable or key it came from
            raise ValueError(f"url must be postgresql://user@host:port/database, not {redact_url(url)!r}")
        return None if url is None else checked_userinfo(url)


class CoordinationSettings(_Section):
    """State several replicas share live through Redis: circuit breakers, API keys' cooldowns and
    disabled keys, spend reservations, the server's global concurrency bound, and the notice that
    learned router state changed. None: each replica keeps its own in memory. An unreachable
    Redis degrades to that, with a warning, and sharing resumes when it answers again."""

    redis_url: str | None = Field(
        default=None, repr=False, description='e.g. "redis://cache:6379/0"; None: local only'
    )
    key_prefix: str = Field(default="car:", min_length=1, description="one fleet's keys on a shared Redis")
    refresh_ms: float = Field(
        default=50.0, ge=5, le=1000, description="how often a replica reads the fleet's open breakers"
    )
    timeout_ms: float = Field(default=250.0, gt=0, le=10_000, description="one Redis call, connect included")
    lease_s: float = Field(
        default=5.0, ge=0.5, le=300, description="a dead replica's reservations and slots lapse after this"
    )
    global_concurrency: int | None = Field(
        default=None, ge=1, description="requests in flight across the fleet (car serve); None: no bound"
    )

    @model_validator(mode="after")
    def _scheme(self) -> CoordinationSettings:
        url = self.redis_url
        if url is not None and urlsplit(url).scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                f"redis_url must start with redis://, rediss:// or unix://, not {redact_url(url)!r}"
            )
        if url is not None:
            checked_userinfo(url, "redis_url: ")
            _checked_redis_address(url)
        return self


def _checked_redis_address(url: str) -> None:
    """The port and database redis-py will read: a bad one was a traceback from every command
    ("Port out of range 0-65535"), and a database that is no number (``/cache``) was db 0, shared."""
    parts = urlsplit(url)
    try:
        _ = parts.port
    except ValueError as exc:
        raise ValueError(f"redis_url {redact_url(url)!r}: {exc}") from None
    path_db = parts.path.strip("/") if parts.scheme != "unix" else ""
    for db in (path_db, *parse_qs(parts.query).get("db", ())):
        if db and not db.isdigit():
            raise ValueError(f"redis_url {redact_url(url)!r}: the database {db!r} is not a number (e.g. /0)")


class SpeechSettings(_Section):
    prefer_local: bool = True
    allow_remote_fallback: bool = True
    preferred_local_stt: str | None = None
    preferred_local_tts: str | None = None
    preferred_remote_stt: str | None = None
    preferred_remote_tts: str | None = None
    # Other clients' voice names (OpenAI's "alloy") for a local voice; unmapped unknown names are errors.
    voices: dict[str, str] = Field(default_factory=dict, description='e.g. alloy = "en_US-joe-medium"')
    max_audio_s: float = Field(
        default=7200.0,
        gt=0,
        le=86_400,
        description="the longest audio a local transcription decodes (seconds; 16 kHz mono float"
        " samples take 64 KB a second, more while decoding: 2 hours about 1.3 GB)",
    )


class CarConfig(BaseModel):
    """Everything in ``config.toml``. ``defaults`` are used when a request names no model;
    ``preferred`` models win over routing (strategy "preferred")."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    defaults: ModelChoices = Field(default_factory=_default_models)
    preferred: ModelChoices = Field(default_factory=ModelChoices)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    local: LocalSettings = Field(default_factory=LocalSettings)
    remote: RemoteSettings = Field(default_factory=RemoteSettings)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    spend: SpendSettings = Field(default_factory=SpendSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    runtimes: RuntimeSettings = Field(default_factory=RuntimeSettings)
    speech: SpeechSettings = Field(default_factory=SpeechSettings)
    state: StateSettings = Field(default_factory=StateSettings)
    coordination: CoordinationSettings = Field(default_factory=CoordinationSettings)
    keys: dict[str, list[str]] = Field(
        default_factory=dict,
        repr=False,
        description="extra API keys per key variable, e.g. OPENAI_API_KEY = ['sk-1', 'sk-2']",
    )
    home: Path = Field(default_factory=car_home, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _merge_defaults(cls, data: Any) -> Any:
        # A [defaults] table in the file sets some capabilities; the rest keep their defaults.
        if isinstance(data, dict) and isinstance(data.get("defaults"), dict):
            data = {**data, "defaults": {**_default_models().model_dump(), **data["defaults"]}}
        return data

    @property
    def paths(self) -> CarPaths:
        return CarPaths(home=self.home)

    def redacted(self) -> dict[str, Any]:
        """The settings with secrets masked, for `car config show`."""
        data = self.model_dump(mode="json")
        data["server"]["api_keys"] = [mask_secret(k) for k in self.server.api_keys]
        data["keys"] = {name: [mask_secret(k) for k in keys] for name, keys in self.keys.items()}
        data["home"] = str(self.home)
        data["state"]["url"] = redact_url(self.state.url) if self.state.url else None
        redis_url = self.coordination.redis_url
        data["coordination"]["redis_url"] = redact_url(redis_url) if redis_url else None
        return data


_SHORT_ENV = {
    "CAR_BACKEND_CACHE_MB": ("local", "cache_mb"),
    "CAR_SERVER_API_KEYS": ("server", "api_keys"),
    "CAR_DEFAULT_MODEL": ("defaults", "generate"),
}


# Tables whose names are the user's, not settings: kept as written (a voice alias is matched as
# given, and CAR_SPEECH__VOICES__MyVoice was stored as myvoice, never matching "MyVoice").
_NAMED_TABLES = (("keys",), ("speech", "voices"))


def _env_value(raw: str, list_field: bool, table: bool = False) -> Any:
    if list_field:
        if raw.strip().startswith("["):
            return json.loads(raw)
        return [part.strip() for part in raw.split(",") if part.strip()]
    if table and raw.strip().startswith("{"):  # CAR_SPEECH__VOICES='{"alloy": "..."}'
        return json.loads(raw)
    return raw


def _env_path(parts: list[str]) -> tuple[str, ...]:
    """An environment variable's setting path: lower case, but for a name in ``_NAMED_TABLES``
    (CAR_KEYS__OPENAI_API_KEY was stored as openai_api_key, which no provider reads)."""
    path = [p.lower() for p in parts]
    for table in _NAMED_TABLES:
        at = len(table)
        if tuple(path[:at]) == table and len(parts) > at:
            path[at] = parts[at]
    return tuple(path)


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> list[tuple[str, tuple[str, ...]]]:
    applied: list[tuple[str, tuple[str, ...]]] = []
    for name, value in env.items():
        if name in _SHORT_ENV:
            path: tuple[str, ...] = _SHORT_ENV[name]
        elif name.startswith("CAR_") and "__" in name:
            path = _env_path(name[4:].split("__"))
        else:
            continue
        section = path[0]
        if section not in CarConfig.model_fields or section == "home":
            raise ConfigError(f"unknown setting section {section!r}", path=f"${name}")
        target = data.setdefault(section, {})
        for depth, part in enumerate(path[1:-1], 2):
            child = target.setdefault(part, {})
            if not isinstance(child, dict):  # CAR_KEYS__A and CAR_KEYS__A__B: a TypeError
                raise ConfigError(
                    f"{'.'.join(path[:depth])} is a value, not a table of settings", path=f"${name}"
                )
            target = child
        list_field = path in {("server", "api_keys")} or section == "keys"
        try:
            target[path[-1]] = _env_value(value, list_field, table=path in _NAMED_TABLES)
        except ValueError as exc:
            raise ConfigError(f"not valid JSON: {exc}", path=f"${name}") from exc
        applied.append((name, path))
    return applied


def load_config(home: Path | None = None, env: Mapping[str, str] | None = None) -> CarConfig:
    """Read ``config.toml`` under ``home`` (``$CAR_HOME``) and apply environment overrides."""
    env = os.environ if env is None else env
    home = home if home is not None else car_home(env)
    path = home / "config.toml"
    data: dict[str, Any] = {}
    text = ""
    if home.is_file():  # `car config show` said "not present" and exited 0
        raise ConfigError(
            "the car home (CAR_HOME) cannot be used: it is a file, not a folder", path=str(home)
        )
    if readable_exists(path):
        data, text = read_toml(path)
        validate_file(CarConfig, data, path, text)  # file errors point into the file
    applied = _apply_env(data, env)
    try:
        config = CarConfig.model_validate({**data, "home": home})
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(str(p) for p in err["loc"])
        # The variable that set this field, or one above or below it (CAR_ROUTING__PREFER_LOCAL__X
        # made prefer_local a table; the file is not to blame).
        culprit = next((name for name, p in applied if loc[: len(p)] == p or p[: len(loc)] == loc), None)
        where = f"${culprit}" if culprit else str(path)
        error = ConfigError(err["msg"].removeprefix("Value error, "), path=where, field=".".join(loc))
    else:
        return config
    raise error  # outside the except: no __context__ holding the value (a key) pydantic saw
