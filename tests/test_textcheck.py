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


def test_file_names_and_what_a_surrogate_means() -> None:
    """A file name's bytes that are not UTF-8 come back through os.fsencode; a lone high surrogate
    does not. In a text, a byte that is not UTF-8 is named as the byte."""
    import os

    from car_inference.textcheck import file_names, surrogate_problem

    assert file_names(os.fsdecode(b"a\xff.wav")) and file_names([None, "b.wav"])
    assert not file_names("a\ud800.wav") and not file_names(["ok", "a\ud800"])
    assert surrogate_problem("\\udcff") == "is not valid UTF-8 text (it holds the byte 0xff, read as \\udcff)"
    assert "unpaired surrogate (\\ud800)" in surrogate_problem("\\ud800")
