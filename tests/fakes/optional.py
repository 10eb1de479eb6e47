"""``some(x)``: the value of an optional field a test expects to be set, as a checked assertion
(the type checker then knows it is not None)."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")

__all__ = ["some"]


def some(value: T | None) -> T:
    assert value is not None
    return value
