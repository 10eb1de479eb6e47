from __future__ import annotations

from car_inference.errors import (
    MAX_NAME_CHARS,
    AllModelsFailed,
    ConfigError,
    InferenceError,
    ModelNotFound,
    ProviderError,
    SpendLimitExceeded,
    TraceNotFound,
    UnsupportedMode,
    close_matches,
)


def test_every_error_is_an_inference_error() -> None:
    for err in (
        ModelNotFound("x"),
        UnsupportedMode("tokenize/detokenize", "remote", "why"),
        ConfigError("bad", path="f.toml", line=3, field="a.b"),
        ProviderError("boom", provider="openai", model="m", status=500, retryable=True),
        SpendLimitExceeded("global", "daily", 1.0, 0.9, 0.2),
        AllModelsFailed([("a", InferenceError("x"))]),
    ):
        assert isinstance(err, InferenceError)


def test_model_not_found_names_the_model_and_suggests() -> None:
    err = ModelNotFound("qwen3-9b", ["qwen/qwen3-8b:q4_k_m"])
    assert "qwen3-9b" in str(err) and "did you mean: qwen/qwen3-8b:q4_k_m" in str(err)


def test_unsupported_mode_carries_mode_backend_and_reason() -> None:
    err = UnsupportedMode("tokenize/detokenize", "remote", "no tokenizer")
    assert (err.mode, err.backend, err.reason) == ("tokenize/detokenize", "remote", "no tokenizer")


def test_config_error_names_file_line_and_field() -> None:
    assert str(ConfigError("must be > 0", path="/h/config.toml", line=7, field="routing.cost_weight")) == (
        "/h/config.toml:7 [routing.cost_weight]: must be > 0"
    )


def test_provider_error_classifies_client_errors_and_keeps_retry_after() -> None:
    rate = ProviderError(
        "slow down", provider="openai", model="m", status=429, retryable=True, retry_after=2.0
    )
    assert not rate.is_client_error and rate.retry_after == 2.0
    assert ProviderError("bad", provider="openai", model="m", status=400).is_client_error
    assert "status=429" in repr(rate)


def test_close_matches_uses_similarity_and_substrings() -> None:
    pool = ["qwen/qwen3-8b:q4_k_m", "qwen/qwen3-4b:q4_k_m", "openai/gpt-6-luna"]
    assert close_matches("qwen/qwen3-9b:q4_k_m", pool)[0] in pool[:2]
    assert "openai/gpt-6-luna" in close_matches("luna", pool)
    assert close_matches("zzzzzz", pool) == []


def test_a_name_longer_than_any_model_is_neither_compared_nor_echoed_whole() -> None:
    huge = "qwen" * 250_000  # a megabyte: difflib over the catalog took 0.14 s a request
    assert close_matches(huge, ["qwen/qwen3-8b:q4_k_m", "qwen"]) == []
    err = ModelNotFound(huge)
    assert len(str(err)) < 400 and str(err).endswith("(1,000,000 characters)")
    assert err.name.startswith("qwenqwen") and len(err.name) < 300
    exact = "q" * MAX_NAME_CHARS
    assert ModelNotFound(exact).name == exact


def test_a_name_with_an_unpaired_surrogate_makes_a_printable_message() -> None:
    """print(error) raised UnicodeEncodeError: the name went into the message as it was."""
    err = ModelNotFound("gpt\ud800x")
    assert str(err) == "model not found: gpt\\ud800x"
    str(err).encode("utf-8")
    assert err.name == "gpt\ud800x", "the name itself is kept as given"


def test_a_long_trace_id_is_not_echoed_whole() -> None:
    """Feedback for a 1 MB trace id answered 404 with the whole megabyte in its message."""
    message = str(TraceNotFound("t" * 1_000_000))
    assert len(message) < MAX_NAME_CHARS + 100 and "1,000,000 characters" in message


def test_provider_error_names_a_model_once() -> None:
    """The message said "openai openai/gpt-4o-mini returned 429" for a catalog id."""
    named = ProviderError("slow down", provider="openai", model="openai/gpt-4o-mini", status=429)
    assert str(named) == "openai/gpt-4o-mini returned 429: slow down"
    upstream = ProviderError("boom", provider="openai", model="gpt-4o-mini")
    assert str(upstream) == "openai gpt-4o-mini: boom"
