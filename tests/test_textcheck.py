"""textcheck.unpaired_surrogate: lone UTF-16 surrogates anywhere in nested request data."""

from __future__ import annotations

from car_inference.textcheck import unpaired_surrogate


def test_finds_a_lone_surrogate_in_nested_strings_and_keys() -> None:
    assert unpaired_surrogate("a\ud800b") == "\\ud800"
    assert unpaired_surrogate(["ok", ("fine", {"key": "é\udfff"})]) == "\\udfff"
    assert unpaired_surrogate({"\udc00": 1}) == "\\udc00"


def test_text_and_other_values_pass() -> None:
    for value in (
        "plain",
        "héllo 😀",
        "\u05e9\u05dc\u05d5\u05dd",
        3,
        None,
        [1.5, {"a": ["b"]}],
        b"\xed\xa0\x80",
    ):
        assert unpaired_surrogate(value) is None
