"""Text that no encoder can write: unpaired UTF-16 surrogates in Python strings.

JSON escapes (``"\\ud800"``) and Python literals make strings holding a lone surrogate; encoding
one to UTF-8 raises ``UnicodeEncodeError`` in whatever backend meets it first (llama.cpp's
tokenizer, a file name, Hugging Face tokenizers' ``TypeError``). Requests refuse them at
validation (``requests_base._Input``), so the error names the field.
"""

from __future__ import annotations

import os
import re
from typing import Any

from pydantic import BaseModel

__all__ = ["file_names", "surrogate_problem", "unpaired_surrogate"]

_SURROGATE = re.compile("[\ud800-\udfff]")


def unpaired_surrogate(value: object) -> str | None:
    """The first unpaired surrogate in ``value`` (a string, or strings nested in lists, tuples,
    dicts, keys included, and pydantic models) as ``\\uXXXX``; None when there is none. ASCII
    strings cost one ``isascii``; a walk with a stack, not calls, keeps a request's check to
    microseconds."""
    stack: list[Any] = [value]
    pop, push = stack.pop, stack.extend
    while stack:
        item = pop()
        kind = type(item)
        if kind is str:
            if not item.isascii():
                found = _SURROGATE.search(item)
                if found is not None:
                    return f"\\u{ord(found.group()):04x}"
        elif item is None or kind is int or kind is float or kind is bool:
            continue
        elif kind is list or kind is tuple:
            push(item)
        elif kind is dict:
            push(item)
            push(item.values())
        elif isinstance(item, BaseModel):
            push(item.__dict__.values())
        elif isinstance(item, str):  # a str subclass (an enum's value)
            push([str(item)])
    return None


def file_names(value: Any) -> bool:
    """Whether ``value`` (a path or a list of them) is file names the OS can be given back."""
    try:
        for path in value if isinstance(value, list) else [value]:
            if path is not None:
                os.fsencode(path)
    except (UnicodeEncodeError, TypeError):
        return False
    return True


def surrogate_problem(bad: str) -> str:
    """What an unpaired surrogate (``\\udcff``) in a text means to whoever sent it."""
    code = int(bad[2:], 16)
    if 0xDC80 <= code <= 0xDCFF:  # how Python reads a byte that is not UTF-8 (surrogateescape)
        return f"is not valid UTF-8 text (it holds the byte 0x{code - 0xDC00:02x}, read as {bad})"
    return f"contains an unpaired surrogate ({bad}): not valid Unicode text"
