"""The JSON-RPC method table (server/rpc_methods.py): what each method takes, and the error
that names a parameter it does not. The methods themselves run over a real socket in
test_jsonrpc.py, test_runner_rpc.py and test_speech_rpc.py."""

from __future__ import annotations

import pytest

from car_inference.server.rpc_methods import METHODS, auto, unknown_param, valid_id


@pytest.mark.parametrize(
    ("method", "params", "near"),
    [
        ("infer", {"promt": "x"}, "prompt"),
        ("infer.stream", {"prompt": "x", "steam": True}, "stream"),
        ("route", {"mesages": []}, "messages"),
        ("embed", {"texts": ["a"], "normalise": True}, "normalize"),
        ("rerank", {"query": "q", "document": ["a"]}, "documents"),
        ("classify", {"text": "t", "label": ["a"]}, "labels"),
        ("synthesize", {"text": "t", "voise": "v"}, "voice"),
        ("transcribe", {"audio": "", "fielname": "a.wav"}, "filename"),
        ("models.list", {"capabilty": "embed"}, "capability"),
    ],
)
def test_a_misspelt_parameter_is_named_with_its_close_match_whichever_the_method(
    method: str, params: dict[str, object], near: str
) -> None:
    """Methods validated by a request model said only "Extra inputs are not permitted"."""
    error = unknown_param(method, params)
    assert error is not None and error.status == 400
    wrong = next(k for k in params if k != near and k not in ("text", "prompt", "query", "audio", "texts"))
    assert error.param == wrong
    assert f"`{wrong}` is not a parameter of {method}" in error.message
    assert f"did you mean {near}" in error.message


def test_what_a_method_takes_passes_and_server_paths_are_left_to_their_method() -> None:
    assert unknown_param("infer", {"prompt": "x", "stream": True, "params": {}}) is None
    assert unknown_param("transcribe", {"audio": "", "filename": "a.wav", "stream": True}) is None
    # Refused by the method itself ("names a file on the server"), and never suggested.
    assert unknown_param("synthesize", {"text": "t", "output_path": "/etc/x"}) is None
    error = unknown_param("synthesize", {"text": "t", "outputs": 1})
    assert error is not None and "output_path" not in error.message


def test_every_method_with_a_table_entry_exists() -> None:
    from car_inference.server import rpc_methods

    assert set(rpc_methods._PARAMS) <= set(METHODS)


def test_ids_and_auto() -> None:
    assert valid_id("a") and valid_id(3) and valid_id(None)
    assert not valid_id(True) and not valid_id(1.5) and not valid_id([1])
    assert auto({"model": "AUTO", "prompt": "x"}) == {"model": None, "prompt": "x"}
    assert auto({"model": ""}) == {"model": ""}  # an empty name stays an error where it is refused
