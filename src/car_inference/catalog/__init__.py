"""The model catalog: built-in data files (``catalog/data/*.toml``) plus the user's ``models.toml``.

A catalog file has three tables, all optional:

- ``[hosts.NAME]``: connection data for a hosted API (protocol, ``base_url``, ``api_key_env``),
  shared by the models whose source says ``host = "NAME"``; a host's ``protocol`` must be the one
  the model's kind speaks (the table of kinds, ``kinds.py``);
- ``[[models]]``: ``ModelSchema`` entries. A user entry whose ``id`` is already in the catalog is
  merged over it (so ``cost.input_per_mtok`` alone can be overridden);
- ``[[endpoints]]``: an OpenAI-compatible server (vLLM, Ollama, llama.cpp server, LM Studio, any
  base URL) and the models it serves, each of which becomes a catalog model ``NAME/MODEL`` whose
  source its kind's source class makes (``endpoint_source``). A ``[[models]]`` entry without a
  ``source`` whose id is ``NAME/MODEL`` refines that endpoint model (its ``cost``, ``quality``,
  ``fallbacks``, ...), whether the model is listed or discovered.
"""

from __future__ import annotations

import copy
import functools
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from .._tomlfile import config_error, read_toml, readable_exists, validate_file
from ..errors import ConfigError, close_matches
from ..schema import KINDS, HostConfig, ModelCapability, ModelSchema, RemoteApiSource, http_url

__all__ = ["Catalog", "EndpointConfig", "load_builtin", "load_catalog"]


class EndpointConfig(BaseModel):
    """An OpenAI-compatible server the user runs or reaches."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    kind: str = Field(default="openai", description="a kind whose source an endpoint can produce")
    base_url: str
    api_key_env: str | None = None
    models: list[str] = Field(default_factory=list)
    capabilities: list[ModelCapability] = Field(default_factory=lambda: [ModelCapability.GENERATE])
    context_length: int = Field(default=0, ge=0, lt=2**31)
    discover: bool = Field(default=False, description="list the server's /v1/models at start-up")
    # [[models]] entries without a source that name one of this endpoint's models, by wire name:
    # merged over the generated entry (a paid endpoint's prices, a quality prior, fallbacks).
    _refinements: dict[str, dict[str, Any]] = PrivateAttr(default_factory=dict)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        """An http(s) URL with a host: "not a url" was taken, and the router then chose it."""
        return http_url(url, "an endpoint's base_url")

    @property
    def refinements(self) -> dict[str, dict[str, Any]]:
        """What ``[[models]]`` entries without a source add to its models, by wire name."""
        return self._refinements

    @field_validator("kind")
    @classmethod
    def _endpoint_kind(cls, kind: str) -> str:
        if kind not in ENDPOINT_KINDS:
            raise ValueError(
                f"an endpoint's kind is one of {', '.join(sorted(ENDPOINT_KINDS))}, not {kind!r}"
            )
        return kind

    def to_schemas(self, served: list[str] | None = None) -> list[ModelSchema]:
        return [
            ModelSchema.model_validate(self._entry(wire_name))
            for wire_name in (served if served is not None else self.models)
        ]

    def _entry(self, wire_name: str) -> dict[str, Any]:
        make = KINDS[self.kind].source.endpoint_source  # type: ignore[attr-defined]
        entry = {
            "id": f"{self.name}/{wire_name}",
            "name": wire_name,
            "provider": self.name,
            "capabilities": self.capabilities,
            "context_length": self.context_length,
            "source": make(self.base_url, self.api_key_env, wire_name),
            "tags": ["endpoint"],
        }
        return _merge(entry, self._refinements.get(wire_name, {}))

    def refine(self, wire_name: str, fields: dict[str, Any]) -> None:
        """Merge ``fields`` (a ``[[models]]`` entry without a source) over the entry of
        ``wire_name`` whenever it is made, listed or discovered."""
        self._refinements[wire_name] = _merge(self._refinements.get(wire_name, {}), fields)


# The kinds an [[endpoints]] entry may have: those whose source class can describe a served model.
ENDPOINT_KINDS = frozenset(
    k for k, s in KINDS.items() if callable(getattr(s.source, "endpoint_source", None))
)


class _CatalogFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hosts: dict[str, HostConfig] = Field(default_factory=dict)
    models: list[dict[str, Any]] = Field(default_factory=list)
    endpoints: list[EndpointConfig] = Field(default_factory=list)


class Catalog(BaseModel):
    """Models and hosts after merging built-in and user files and resolving host references."""

    models: list[ModelSchema]
    hosts: dict[str, HostConfig]
    endpoints: list[EndpointConfig]


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "source":
            out[key] = _merge(out[key], value)
        elif key == "source" and isinstance(value, dict) and isinstance(out.get(key), dict):
            # Same kind: merge fields; another kind: the user's source replaces ours.
            same = value.get("kind", out[key].get("kind")) == out[key].get("kind")
            out[key] = _merge(out[key], value) if same else value
        else:
            out[key] = value
    return out


def _read(path: Path) -> tuple[_CatalogFile, str]:
    data, text = read_toml(path)
    return validate_file(_CatalogFile, data, path, text), text


def _resolve_host(schema: ModelSchema, hosts: dict[str, HostConfig], origin: str) -> ModelSchema:
    """Fill a hosted API's source from the ``[hosts]`` entry it names (an Ollama source's ``host``
    is a URL, not a name: only ``RemoteApiSource`` kinds name hosts)."""
    source = schema.source
    if not isinstance(source, RemoteApiSource) or source.host is None:
        return schema
    host = hosts.get(source.host)
    if host is None:
        raise ConfigError(
            f"model {schema.id} names unknown host {source.host!r}", path=origin, field="source.host"
        )
    speaks = schema.spec.protocol
    if host.protocol is not None and host.protocol != speaks:
        raise ConfigError(
            f"model {schema.id} is a {schema.kind!r} model (protocol {speaks or 'none'}) but its host "
            f"{source.host!r} speaks {host.protocol}",
            path=origin,
            field="source.kind",
        )
    update = {
        "base_url": source.base_url or host.base_url,
        "api_key_env": source.api_key_env or host.api_key_env,
        "headers": {**host.headers, **source.headers},
    }
    return schema.model_copy(update={"source": source.model_copy(update=update)})


@functools.lru_cache(maxsize=1)
def _builtin_raw() -> tuple[tuple[dict[str, Any], ...], tuple[tuple[str, HostConfig], ...], tuple[str, ...]]:
    models: list[dict[str, Any]] = []
    hosts: dict[str, HostConfig] = {}
    origins: list[str] = []
    folder = resources.files(__package__).joinpath("data")
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".toml"):
            continue
        path = Path(str(entry))
        parsed, _ = _read(path)
        hosts.update(parsed.hosts)
        models.extend(parsed.models)
        origins.extend([str(path)] * len(parsed.models))
    return tuple(models), tuple(hosts.items()), tuple(origins)


def load_builtin() -> Catalog:
    """The catalog that ships with the package."""
    return load_catalog(None)


def load_catalog(user_file: Path | None) -> Catalog:
    """Built-in catalog merged with ``user_file`` (``$CAR_HOME/models.toml``) when it exists."""
    raw_models, raw_hosts, origins = _builtin_raw()
    hosts = dict(raw_hosts)
    entries: dict[str, tuple[dict[str, Any], str, str, int | None]] = {}
    for data, origin in zip(raw_models, origins, strict=True):
        entries[data["id"]] = (copy.deepcopy(data), origin, "", None)

    endpoints: list[EndpointConfig] = []
    new_hosts: set[str] = set()
    if user_file is not None and readable_exists(user_file):
        parsed, text = _read(user_file)
        new_hosts = parsed.hosts.keys() - hosts.keys()
        hosts = {name: _merge_host(hosts.get(name), h) for name, h in {**hosts, **parsed.hosts}.items()}
        endpoints = parsed.endpoints
        _check_unique(parsed, user_file, text)
        for index, data in enumerate(parsed.models):
            model_id = data.get("id")
            if not isinstance(model_id, str):
                raise ConfigError(
                    "a model needs an `id`"
                    if model_id is None
                    else f'`id` must be a string like "me/my-model", not {model_id!r}',
                    path=str(user_file),
                    line=_entry_line(text, index),
                    field=f"models.{index}.id",
                )
            base = entries.get(model_id, ({}, "", "", None))[0]
            refines = not base and "source" not in data
            if refines and _refine_endpoint(endpoints, data, user_file, text, index):
                continue
            if refines:  # meant as an override: "name: Field required (and 3 more problems)" said not
                near = close_matches(model_id, list(entries))
                hint = f" (did you mean {', '.join(near)}?)" if near else ""
                raise _id_error(
                    f"model {model_id} has no source and is no built-in model{hint}: an entry with a "
                    "built-in's id overrides its fields; a new model needs name, provider, capabilities "
                    "and [models.source]",
                    user_file, text, index,
                )  # fmt: skip
            _anchor_path(data, user_file.parent)
            entries[model_id] = (_merge(base, data), str(user_file), text, index)

    models: list[ModelSchema] = []
    for data, origin, text, entry_index in entries.values():
        try:
            schema = ModelSchema.model_validate(data)
        except ValidationError as exc:
            if entry_index is None:  # a broken built-in entry is our bug; say where it is anyway
                raise config_error(
                    exc, Path(origin), Path(origin).read_text(), ("models",), ModelSchema
                ) from None
            raise config_error(exc, Path(origin), text, ("models", entry_index), ModelSchema) from None
        models.append(_resolve_host(schema, hosts, origin))
    seen = {m.id: origin for m, (_, origin, _, _) in zip(models, entries.values(), strict=True)}
    named = {i for i, o in seen.items() if o == str(user_file)}  # [[models]] entries of the file
    for endpoint in endpoints:
        for schema in endpoint.to_schemas():
            if schema.id not in seen:
                models.append(schema)
                seen[schema.id] = str(user_file)
            elif seen[schema.id] != str(user_file):  # requests meant for it went to the built-in's host
                raise ConfigError(
                    f"endpoint {endpoint.name!r} would serve {schema.id}, a built-in model's id: give the "
                    f"endpoint another name (or point the provider elsewhere with [hosts.{endpoint.name}])",
                    path=str(user_file),
                    field=f"endpoints.{endpoints.index(endpoint)}.name",
                )
    if user_file is not None:  # an endpoint's models are named as the server calls them: not checked
        explicit = {m.id: [m.name, *m.aliases] for m in models if m.id in named}
        for endpoint in endpoints:  # ... but the names a refinement gives one are
            for wire_name, fields in endpoint.refinements.items():
                given = [fields["name"]] if isinstance(fields.get("name"), str) else []
                explicit[f"{endpoint.name}/{wire_name}"] = given + list(fields.get("aliases") or [])
        _check_names(models, explicit, user_file)
        _check_hosts(models, hosts, new_hosts, user_file)
    return Catalog(models=models, hosts=hosts, endpoints=endpoints)


def _anchor_path(data: dict[str, Any], folder: Path) -> None:
    """A relative ``source.path`` is taken from the folder of the file that gives it: from the
    current directory, `car serve` started elsewhere saw another catalog (the model unavailable)."""
    source = data.get("source")
    path = source.get("path") if isinstance(source, dict) else None
    relative = isinstance(path, str) and path and not path.startswith("~") and not Path(path).is_absolute()
    if relative and isinstance(source, dict):
        source["path"] = str(folder / str(path))


def _check_unique(parsed: _CatalogFile, path: Path, text: str) -> None:
    """Each id and each endpoint name once in the file: a second entry merged into the first, and
    two endpoints of one name split its models between their servers, without a word."""
    first: dict[str, int] = {}
    for index, data in enumerate(parsed.models):
        model_id = data.get("id")
        if isinstance(model_id, str) and first.setdefault(model_id, index) != index:
            raise ConfigError(
                f"model {model_id} is defined twice (also at entry {first[model_id] + 1}): merge them",
                path=str(path),
                line=_entry_line(text, index),
                field=f"models.{index}.id",
            )
    names: dict[str, int] = {}
    for index, endpoint in enumerate(parsed.endpoints):
        if names.setdefault(endpoint.name, index) != index:
            raise ConfigError(
                f"endpoint {endpoint.name!r} is defined twice: give each a name of its own",
                path=str(path),
                field=f"endpoints.{index}.name",
            )


def _check_names(models: list[ModelSchema], explicit: dict[str, list[str]], path: Path) -> None:
    """A name or alias ``path`` gives a model (``explicit``, by model id) that another model is
    found by too (its name, an alias, or one made from its id: ``faster-whisper-base``): lookups
    found the built-in one (registered first), and the user's model could not be reached by it.
    Variants of one model (``qwen/qwen3-8b:q4_k_m``, ``:q8_0``) share the names made from it."""
    owner: dict[str, list[ModelSchema]] = {}
    for model in models:
        for key in dict.fromkeys(model.lookup_keys()):
            owner.setdefault(key, []).append(model)
    for model_id, names in explicit.items():
        base = model_id.split(":", 1)[0]
        for name in dict.fromkeys(n.lower() for n in names):
            other = next((o for o in owner.get(name, ()) if o.id.split(":", 1)[0] != base), None)
            if other is not None:
                raise ConfigError(
                    f"model {model_id}: the name {name!r} is already {other.id}'s: choose another, or "
                    f"override {other.id} by its id",
                    path=str(path),
                    field="models.name",
                )


def _check_hosts(models: list[ModelSchema], hosts: dict[str, HostConfig], new: set[str], path: Path) -> None:
    """A ``[hosts.NAME]`` of ``path`` that no model names: a misspelt ``[hosts.opneai]`` meant to
    point OpenAI at a proxy was ignored, and prompts and key went to api.openai.com."""
    named = {m.source.host for m in models if isinstance(m.source, RemoteApiSource)}
    for name in sorted(new - named):
        near = close_matches(name, sorted(hosts.keys() - new))
        hint = f" (did you mean [hosts.{near[0]}]?)" if near else ""
        raise ConfigError(
            f"[hosts.{name}] is no model's host{hint}: a host serves the models whose source names it",
            path=str(path),
            field=f"hosts.{name}",
        )


def _refine_endpoint(
    endpoints: list[EndpointConfig], data: dict[str, Any], path: Path, text: str, index: int
) -> bool:
    """A ``[[models]]`` entry ``NAME/MODEL`` without a source, where NAME is an endpoint of the
    same file: kept as a refinement of that endpoint's model, checked now (a typo in a price is
    an error at start-up, not when the model is first discovered). False for any other entry."""
    prefix, _, wire_name = data["id"].partition("/")
    endpoint = next((e for e in endpoints if e.name == prefix), None)
    if endpoint is None or not wire_name:
        return False
    if wire_name not in endpoint.models and not endpoint.discover:
        raise _id_error(
            f"model {data['id']} has no source and endpoint {prefix!r} neither lists {wire_name!r} "
            "in its models nor discovers them: add it to the endpoint's models, or give the entry "
            "a source",
            path, text, index,
        )  # fmt: skip
    fields = {k: v for k, v in data.items() if k != "id"}
    try:
        ModelSchema.model_validate(_merge(endpoint._entry(wire_name), fields))
    except ValidationError as exc:
        raise config_error(exc, path, text, ("models", index), ModelSchema) from None
    endpoint.refine(wire_name, fields)
    return True


def _merge_host(base: HostConfig | None, over: HostConfig) -> HostConfig:
    if base is None or base is over:
        return over
    fields = over.model_dump(exclude_unset=True)
    return base.model_copy(update=fields)


def _id_error(message: str, path: Path, text: str, index: int) -> ConfigError:
    """An error about the id of the file's ``index``-th ``[[models]]`` entry, at its line."""
    return ConfigError(message, path=str(path), line=_entry_line(text, index), field=f"models.{index}.id")


def _entry_line(text: str, index: int) -> int | None:
    count = -1
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip().startswith("[[models]]"):
            count += 1
            if count == index:
                return lineno
    return None
