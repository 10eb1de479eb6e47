"""Read a TOML file and turn pydantic validation errors into ``ConfigError``s naming the file, the
line and the field, so that a user editing ``config.toml`` or ``models.toml`` sees where to look."""

from __future__ import annotations

import re
import tomllib
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from .errors import ConfigError, close_matches
from .schema import KINDS

T = TypeVar("T", bound=BaseModel)

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(?:#.*)?$")
_AT_LINE = re.compile(r"\s*\(at line (\d+), column \d+\)")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-\"'.]+)\s*=")


def read_toml(path: Path) -> tuple[dict[str, Any], str]:
    """Parse ``path``; a syntax error becomes a ConfigError with the parser's line."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Notepad) is not TOML
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path=str(path)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})", path=str(path)
        ) from exc
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        # Python 3.14 adds exc.lineno; before that the line is only in the message.
        where = _AT_LINE.search(str(exc))
        line = getattr(exc, "lineno", None) or (int(where.group(1)) if where else None)
        msg = _AT_LINE.sub("", str(exc)).strip()
        raise ConfigError(f"invalid TOML: {msg}", path=str(path), line=line) from exc


def _norm(key: str) -> str:
    return key.strip().strip("\"'")


def locate(text: str, loc: Sequence[str | int]) -> int | None:
    """The 1-based line where the value at ``loc`` (e.g. ``("models", 2, "cost", "size_mb")``) is
    written, or the nearest enclosing table header; None when it cannot be found."""
    table: list[str] = []
    array_counts: dict[tuple[str, ...], int] = {}
    best: tuple[int, int] | None = None  # (matched depth, line)
    want = list(loc)
    for lineno, raw in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(raw)
        if header:
            names = [_norm(p) for p in header.group(2).split(".")]
            is_array = header.group(1) == "[["
            path: list[str | int] = []
            for i, name in enumerate(names):
                path.append(name)
                if is_array and i == len(names) - 1:
                    key = tuple(str(p) for p in path)
                    array_counts[key] = array_counts.get(key, -1) + 1
                    path.append(array_counts[key])
                elif (prefix := tuple(str(p) for p in path)) in array_counts:
                    path.append(array_counts[prefix])
            table = [str(p) for p in path]
            depth = _prefix_depth(table, want)
            if depth == len(table) and (best is None or depth > best[0]):
                best = (depth, lineno)
            continue
        key_match = _KEY.match(raw)
        if key_match:
            dotted = [_norm(k) for k in key_match.group(1).split(".")]
            full = table + dotted
            depth = _prefix_depth(full, want)
            if depth == len(full) and (best is None or depth > best[0]):
                best = (depth, lineno)
    return best[1] if best else None


def _prefix_depth(have: list[str], want: list[str | int]) -> int:
    n = 0
    for a, b in zip(have, want, strict=False):
        if a != str(b):
            break
        n += 1
    return n


def config_error(
    exc: ValidationError,
    path: Path,
    text: str,
    prefix: Sequence[str | int] = (),
    model: type[BaseModel] | None = None,
) -> ConfigError:
    """The first validation error of ``exc`` as a ConfigError with file, line and field; an
    unknown key of ``model`` (what was validated) with the keys it may have been meant as."""
    err = exc.errors()[0]
    loc = [*prefix, *[p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]]
    # A discriminated union adds its tag ("gguf") after "source"; it is not a key in the file.
    clean = [p for i, p in enumerate(loc) if not (i and loc[i - 1] == "source" and p in _UNION_TAGS)]
    field = ".".join(str(p) for p in clean)
    more = len(exc.errors()) - 1
    msg = err["msg"].removeprefix("Value error, ")  # pydantic's wording for a validator's own message
    if err["type"] == "extra_forbidden" and model is not None and err["loc"]:
        # "[routnig]: Extra inputs are not permitted" said nothing of [routing]
        known = _keys_at(model, err["loc"][:-1])
        near = close_matches(str(err["loc"][-1]), known) if known else []
        msg = "unknown setting" + (f" (did you mean {', '.join(near)}?)" if near else "")
    message = msg + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")
    return ConfigError(message, path=str(path), line=locate(text, clean), field=field or None)


def _keys_at(model: type[BaseModel], loc: Sequence[str | int]) -> list[str]:
    """The keys the table at ``loc`` of ``model`` may hold (none known: [])."""
    kind: Any = model
    for part in loc:
        kind = _some(kind)
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            info = kind.model_fields.get(part) if isinstance(part, str) else None
            if info is None:
                return []
            kind = info.annotation
            continue
        args = typing.get_args(kind)
        tagged = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel) and _tag(a) == part]
        if tagged:  # a discriminated union's member, by its tag ("gguf" of a source)
            kind = tagged[0]
            continue
        if not args:
            return []
        kind = args[-1]  # list[X], dict[str, X]: ``part`` is an index or a key
    kind = _some(kind)
    return list(kind.model_fields) if isinstance(kind, type) and issubclass(kind, BaseModel) else []


def _tag(member: type[BaseModel]) -> Any:
    field = member.model_fields.get("kind")
    return field.default if field is not None else None


def _some(kind: Any) -> Any:
    """``X`` of ``X | None``."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    is_optional = type(None) in typing.get_args(kind) and len(args) == 1
    return args[0] if is_optional else kind


# The tags of ModelSource's union: every kind in the table (kinds.py).
_UNION_TAGS = frozenset(KINDS)


def validate_file(model: type[T], data: Any, path: Path, text: str, prefix: Sequence[str | int] = ()) -> T:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = config_error(exc, path, text, prefix, model)
    # Raised outside the except: pydantic's error (the value, a key in [keys]) stays out of its
    # __context__, which error reporters ship even when the traceback hides it.
    raise error


def readable_exists(path: Path) -> bool:
    """Whether ``path`` exists; a folder above it that cannot be searched (mode 000, another
    user's) is a ``ConfigError`` naming it, not a PermissionError traceback."""
    try:
        return path.exists()
    except OSError as exc:
        raise ConfigError(f"cannot be read: {exc.strerror or exc}", path=str(path)) from None
