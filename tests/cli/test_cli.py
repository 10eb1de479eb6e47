"""The `car` command line, run in-process with typer's runner against an isolated $CAR_HOME."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from car_inference.cli import app

runner = CliRunner()


def car(*args: str, input: str | None = None) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), input=input)
    return result.exit_code, result.stdout, result.stderr


def test_version_via_the_console_script() -> None:
    script = Path(sys.executable).parent / "car"
    for command in ([str(script), "--version"], [sys.executable, "-m", "car_inference", "--version"]):
        out = subprocess.run(command, capture_output=True, text=True, check=False)
        assert out.returncode == 0 and out.stdout.startswith("car-inference "), command


def test_models_list_filters_and_json() -> None:
    code, out, _ = car("models", "list", "--json", "--local", "--available")
    assert code == 0
    models = json.loads(out)
    ids = {m["id"] for m in models}
    assert "huggingface/smollm2-135m-instruct:q4_1" in ids
    assert all(m["available"] for m in models)
    code, out, _ = car("models", "list", "--capability", "embed", "--json")
    assert all("embed" in m["capabilities"] for m in json.loads(out))
    code, out, _ = car("models", "list", "--remote")
    assert code == 0 and "openai/" in out and "huggingface/smollm2" not in out


def test_models_show_and_unknown_model() -> None:
    code, out, _ = car("models", "show", "smollm2")
    assert code == 0 and "huggingface/smollm2-135m-instruct:q4_1" in out and "available: yes" in out
    code, out, _ = car("models", "show", "qwen3-8b")
    assert code == 0 and "car models pull" in out
    code, _, err = car("models", "show", "qwen3-9b")
    assert code == 2
    assert "model not found: qwen3-9b" in err and "did you mean: qwen/qwen3-8b:q4_k_m" in err


def test_config_show_reflects_file_and_environment(
    isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (isolated_home / "config.toml").write_text("[routing]\nprefer_local = true\n")
    monkeypatch.setenv("CAR_BACKEND_CACHE_MB", "777")
    code, out, _ = car("config", "show", "--json")
    data = json.loads(out)
    assert code == 0 and data["routing"]["prefer_local"] is True and data["local"]["cache_mb"] == 777


def test_bad_config_is_one_line_with_file_and_line(isolated_home: Path) -> None:
    (isolated_home / "config.toml").write_text("[routing]\nprefer_local = maybe\n")
    code, _, err = car("config", "show")
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "config.toml:2" in lines[0]


def test_generate_json_and_plain() -> None:
    code, out, _ = car("generate", "What is the capital of France?", "-t", "0", "-n", "40", "--json")
    assert code == 0
    result = json.loads(out)
    assert "Paris" in result["text"] and result["model_used"].startswith("huggingface/smollm2")
    keys = {"text", "tool_calls", "trace_id", "model_used", "latency_ms", "time_to_first_token_ms", "usage"}
    assert set(result) == keys
    code, out, _ = car("generate", "What is the capital of France?", "-t", "0", "-n", "40", "--stream")
    assert code == 0 and out.strip() == result["text"].strip()
    code, out, _ = car(
        "generate", "-", "-t", "0", "-n", "40", "--no-stream", input="What is the capital of France?"
    )
    assert code == 0 and out.strip() == result["text"].strip()


def test_generate_errors_are_one_line() -> None:
    code, _, err = car("generate", "hi", "-m", "qwen3-8b")
    assert code == 1 and "car models pull" in err and "Traceback" not in err
    code, _, err = car("generate", "  ")
    assert code == 2 and "empty" in err


def test_chat_keeps_history_and_exits() -> None:
    turns = "My name is Ada.\n/clear\nhello\n/exit\n"
    code, out, _ = car("chat", "-m", "smollm2", "-n", "12", "-t", "0", input=turns)
    assert code == 0
    assert out.count("car> ") == 2, "two turns answered; /clear and /exit are commands"


def test_embed_rerank_classify_json() -> None:
    code, out, _ = car("embed", "hello", "world", "--json")
    data = json.loads(out)
    assert code == 0 and data["dimensions"] == 384 and len(data["embeddings"]) == 2

    docs = ["Bananas are yellow.", "Paris is the capital of France."]
    code, out, _ = car("rerank", "capital of France", *docs, "--json", "--top-n", "1")
    data = json.loads(out)
    assert code == 0 and [d["index"] for d in data["ranked"]] == [1]

    code, out, _ = car("classify", "The striker scored a goal", "--labels", "sports, politics", "--json")
    data = json.loads(out)
    assert code == 0 and data["results"][0]["label"] == "sports"
    code, out, _ = car("classify", "The striker scored a goal", "--labels", "sports,politics")
    assert code == 0 and "sports" in out.splitlines()[0]


def test_tokenize_and_detokenize() -> None:
    code, out, _ = car("tokenize", "smollm2", "Hello world", "--json")
    tokens = json.loads(out)["tokens"]
    assert code == 0 and tokens
    code, out, _ = car("detokenize", "smollm2", *map(str, tokens))
    assert code == 0 and out.strip() == "Hello world"
    code, _, err = car("tokenize", "openai/gpt-6-luna", "hi")
    assert code == 1 and "tokenize/detokenize" in err and "remote" in err
