"""The `car` command line, run in-process with typer's runner against an isolated $CAR_HOME."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from car_inference.cli import app
from car_inference.errors import money
from fakes import FakeProviderServer
from fakes.redis_service import closed_port

runner = CliRunner()


def car(*args: str, input: str | None = None) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), input=input)
    return result.exit_code, result.stdout, result.stderr


def test_version_via_the_console_script() -> None:
    script = Path(sys.executable).parent / "car"
    for command in ([str(script), "--version"], [sys.executable, "-m", "car_inference", "--version"]):
        out = subprocess.run(command, capture_output=True, text=True, check=False)
        assert out.returncode == 0 and out.stdout.startswith("car-inference "), command


def test_help_shows_no_value_after_a_flag() -> None:
    """typer 0.29 printed `--json <bool>`, `--help <bool>`, as if each flag took a value."""
    for args in (["--help"], ["generate", "--help"], ["route", "--help"]):
        code, out, _ = car(*args)
        assert code == 0 and "--help" in out and "<bool>" not in out, args


def test_usage_errors_are_one_line_with_exit_status_2() -> None:
    """The README: errors are one line on stderr, exit 2 for usage errors (click's own are a
    usage line, a hint and a box); the help of a group named alone is still the help."""
    script = str(Path(sys.executable).parent / "car")
    for args, says in (
        (["generate", "--bogus", "hi"], "error: No such option: --bogus (`car generate --help`)"),
        (["generate", "-t", "3", "hi"], "error: Invalid value for '--temperature'"),
        (["nosuchcmd"], "error: No such command 'nosuchcmd'."),
        # pydantic's "Value error, " before a validator's own words was kept
        (["generate", "hi", "--thinking", "maybe"], "error: Invalid value for '--thinking': 'maybe' is"),
    ):
        run = subprocess.run([script, *args], capture_output=True, text=True, check=False)
        assert run.returncode == 2 and run.stdout == "", args
        assert len(run.stderr.strip().splitlines()) == 1 and run.stderr.startswith(says), run.stderr
    group = subprocess.run([script, "models"], capture_output=True, text=True, check=False)
    assert group.returncode == 2 and "pull" in group.stdout + group.stderr


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
    # Each printed an empty table and "0 model(s)", exit 0, as if the catalog had none.
    code, _, err = car("models", "list", "--provider", "opneai")
    assert code == 2 and "no provider 'opneai'" in err and "did you mean openai" in err
    code, _, err = car("models", "list", "--local", "--remote")
    assert code == 2 and "exclude each other" in err


def test_models_show_and_unknown_model() -> None:
    code, out, _ = car("models", "show", "smollm2")
    assert code == 0 and "huggingface/smollm2-135m-instruct:q4_1" in out and "available: yes" in out
    code, out, _ = car("models", "show", "qwen3-8b")
    assert code == 0 and "car models pull" in out
    code, _, err = car("models", "show", "qwen3-9b")
    assert code == 2
    assert "model not found: qwen3-9b" in err and "did you mean: qwen/qwen3-8b:q4_k_m" in err


def test_text_in_square_brackets_is_printed_not_read_as_a_style(isolated_home: Path) -> None:
    """Rich reads "[sentence]" as a style and drops it: the install hint "pip install
    'car-inference[sentence]'" read 'car-inference', and "[tool call]" vanished from its line."""
    (isolated_home / "models.toml").write_text(
        '[[models]]\nid = "me/demo"\nname = "demo [beta]"\nprovider = "me"\n'
        'capabilities = ["generate"]\n[models.source]\nkind = "gguf"\npath = "/nowhere/[x].gguf"\n'
    )
    code, out, _ = car("models", "show", "me/demo")
    assert code == 0 and "demo [beta]" in out and "[x].gguf" in out, out


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
    # Options that were taken and dropped: -m "$MODEL" with the variable unset routed; --stream
    # with --json printed the object alone.
    script = str(Path(sys.executable).parent / "car")  # click's usage errors, as the console has them
    for command in (("generate", "hi"), ("embed", "hi"), ("transcribe", "a.wav"), ("route", "hi")):
        run = subprocess.run([script, *command, "-m", ""], capture_output=True, text=True, check=False)
        assert run.returncode == 2 and "is empty; leave it out to let the router choose" in run.stderr
    code, _, err = car("generate", "hi", "--json", "--stream")
    assert code == 2 and "leave --stream out" in err
    code, _, err = car("generate", "hi", "--seed", str(2**64))  # it said "seed:", a request field
    assert code == 2 and err.startswith("error: Invalid value for '--seed': "), err


def test_chat_keeps_history_and_exits() -> None:
    turns = "My name is Ada.\n/clear\nhello\n/exit\n"
    code, out, _ = car("chat", "-m", "smollm2", "-n", "12", "-t", "0", input=turns)
    assert code == 0
    assert out.count("car> ") == 2, "two turns answered; /clear and /exit are commands"
    assert "you> " not in out and out.startswith("car> "), "piped input: no prompt ran into the answer"


def test_chat_checks_its_model_first_and_outlives_a_bad_turn() -> None:
    """An unknown or non-generating model was found after the user's first message, and any
    error (a line that is not text, say) ended the chat and lost its history; /help and a typo
    such as /exti went to the model as prompts."""
    code, out, err = car("chat", "-m", "all-minilm-l6-v2", input="hi\n")
    assert code == 2 and "you>" not in out and "does not generate text" in err
    code, out, err = car("chat", "-m", "smollm2-nosuch", input="hi\n")
    assert code == 2 and "you>" not in out and "model not found" in err
    turns = b"My name is Ada.\n\xff\n/exti\n/help\nhello\n/exit\n"
    result = runner.invoke(app, ["chat", "-m", "smollm2", "-n", "4", "-t", "0"], input=turns)
    code, out, err = result.exit_code, result.stdout, result.stderr
    assert code == 0 and out.count("car> ") == 2, (out, err)
    assert "not valid UTF-8" in err and "unknown command /exti" in err


def test_embed_rerank_classify_json() -> None:
    code, out, _ = car("embed", "hello", "world", "--json")
    data = json.loads(out)
    assert code == 0 and data["dimensions"] == 384 and len(data["embeddings"]) == 2
    code, _, err = car("embed", "hello", "")  # an empty text printed a vector
    assert code == 2 and "text 2 is empty" in err
    code, out, err = car("embed", "hello", "word " * 300, "--json")  # cut at 256 tokens, unsaid
    assert code == 0 and json.loads(out)["truncated"] == [1]
    assert "text 2 is longer than sentence-transformers/all-minilm-l6-v2 reads" in err

    docs = ["Bananas are yellow.", "Paris is the capital of France."]
    code, out, _ = car("rerank", "capital of France", *docs, "--json", "--top-n", "1")
    data = json.loads(out)
    assert code == 0 and [d["index"] for d in data["ranked"]] == [1]
    # A document is shown as given: "[/oops]" was a MarkupError traceback, "[bold]x[/bold]" restyled
    code, out, err = car("rerank", "q", "[/oops] closing tag", "[bold]styled[/bold] doc")
    assert code == 0 and "[/oops] closing tag" in out and "[bold]styled[/bold] doc" in out, err

    code, out, _ = car("classify", "The striker scored a goal", "--labels", "sports, politics", "--json")
    data = json.loads(out)
    assert code == 0 and data["results"][0]["label"] == "sports"
    code, out, _ = car("classify", "The striker scored a goal", "--labels", "sports,politics")
    assert code == 0 and "sports" in out.splitlines()[0]
    code, _, err = car("classify", "The striker scored a goal", "--labels", "sports,")  # ran on one, at 100 %
    assert code == 2 and "has an empty label" in err
    # The option repeated: every label counts (`-l a -l b` kept only b, at 1.000).
    code, out, _ = car("classify", "The striker scored a goal", "-l", "politics", "-l", "sports", "--json")
    assert code == 0 and {r["label"] for r in json.loads(out)["results"]} == {"politics", "sports"}


def test_tokenize_and_detokenize() -> None:
    code, out, _ = car("tokenize", "smollm2", "Hello world", "--json")
    tokens = json.loads(out)["tokens"]
    assert code == 0 and tokens
    code, out, _ = car("detokenize", "smollm2", *map(str, tokens))
    assert code == 0 and out.strip() == "Hello world"
    code, _, err = car("tokenize", "openai/gpt-6-luna", "hi")
    assert code == 2 and "tokenize/detokenize" in err and "remote" in err
    # `-` reads stdin, as `car generate -` does (the one-character text "-" was tokenized)
    code, out, _ = car("tokenize", "smollm2", "-", "--json", input="Hello world")
    assert code == 0 and json.loads(out)["tokens"] == tokens


def test_a_dash_reads_stdin_for_classify_and_rerank() -> None:
    """They classified and ranked against the one-character text "-", and `embed - x` embedded it."""
    code, out, _ = car(
        "classify", "-", "--labels", "sports,politics", "--json", input="The striker scored a goal"
    )
    assert code == 0 and json.loads(out)["results"][0]["label"] == "sports"
    docs = ["Bananas are yellow.", "Paris is the capital of France."]
    code, out, _ = car("rerank", "-", *docs, "--json", "--top-n", "1", input="capital of France")
    assert code == 0 and [d["index"] for d in json.loads(out)["ranked"]] == [1]
    code, _, err = car("classify", "-", "--labels", "a,b", input="  \n")
    assert code == 2 and "stdin held no text to classify" in err
    code, _, err = car("embed", "-", "extra", input="hello\n")
    assert code == 2 and "give it alone" in err


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProviderServer]:
    with FakeProviderServer() as server:
        yield server


def test_generate_on_an_ad_hoc_openai_compatible_server(
    fake: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.reset()
    url = fake.openai_base_url
    code, out, err = car("generate", "--base-url", url, "--model", "Qwen/Qwen3-8B", "Hello", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["text"] == "echo: Hello" and result["model_used"] == "endpoint/Qwen/Qwen3-8B"
    assert fake.requests[-1].json["model"] == "Qwen/Qwen3-8B"

    monkeypatch.setenv("PROXY_KEY", "sk-proxy-test-key-0001")
    args = (
        "generate",
        "--base-url",
        url,
        "--api-key-env",
        "PROXY_KEY",
        "-m",
        "gpt-x",
        "Hello",
        "--no-stream",
    )
    code, out, err = car(*args)
    assert code == 0 and out.strip() == "echo: Hello", err
    assert fake.requests[-1].api_key == "sk-proxy-test-key-0001"
    monkeypatch.delenv("PROXY_KEY")
    code, _, err = car(*args)
    assert code != 0 and "PROXY_KEY" in err and len(err.strip().splitlines()) == 1

    code, _, err = car("generate", "--base-url", url, "hi")
    assert code == 2 and "--base-url needs --model" in err
    code, _, err = car("generate", "--api-key-env", "PROXY_KEY", "hi")
    assert code == 2 and "--api-key-env goes with --base-url" in err
    code, _, err = car("generate", "--base-url", "127.0.0.1:8000/v1", "-m", "x", "hi")
    assert code == 2 and "must be an http:// or https:// URL" in err


def test_a_spend_limit_refusal_exits_2_and_keeps_the_limits_digits(
    fake: FakeProviderServer, isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server answers it with a 402 (the command cannot get past it as it is): it exited 1,
    and a limit under a cent read "$0.00"."""
    fake.reset()
    (isolated_home / "models.toml").write_text(f'[hosts.openai]\nbase_url = "{fake.openai_base_url}"\n')
    (isolated_home / "config.toml").write_text("[spend]\ndaily_usd = 0.0000001\n")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-spend-test-key-0001")
    code, _, err = car("generate", "-m", "openai/gpt-4o-mini", "hi")
    assert code == 2 and "daily spend limit for global is $0.0000001; spent $0.00" in err, err
    assert len(err.strip().splitlines()) == 1 and fake.requests == [], "refused before any call"


def test_models_list_and_route_ask_a_discovering_endpoint_first(
    fake: FakeProviderServer, isolated_home: Path
) -> None:
    """`car models list --provider box` said the provider did not exist, and `car route` never
    considered the endpoint's models; `car serve` asked it at start-up."""
    fake.reset()
    box = f'[[endpoints]]\nname = "box"\nbase_url = "{fake.openai_base_url}"\ndiscover = true\n'
    (isolated_home / "models.toml").write_text(box)
    code, out, err = car("models", "list", "--provider", "box", "--json")
    assert code == 0, err
    listed = {m["id"] for m in json.loads(out)}
    assert listed == {f"box/{m}" for m in fake.served_models} and listed
    code, out, err = car("route", "hi", "--json")
    assert code == 0 and any(c["model_id"].startswith("box/") for c in json.loads(out)["candidates"]), err
    # An endpoint that does not answer is a warning; the rest of the catalog is listed.
    down = box.replace(fake.openai_base_url, f"http://127.0.0.1:{closed_port()}/v1")
    (isolated_home / "models.toml").write_text(down)
    code, out, err = car("models", "list", "--json")
    assert code == 0 and "warning: endpoint box: discovery failed" in err and json.loads(out)
    code, _, err = car("models", "discover", "bxo")
    assert code == 2 and "did you mean box?" in err


def test_models_pull_json() -> None:
    code, out, err = car("models", "pull", "smollm2", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["model"] == "huggingface/smollm2-135m-instruct:q4_1" and data["available"] is True
    assert Path(data["path"]).is_file()


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value


def test_config_show_prints_toml(isolated_home: Path) -> None:
    (isolated_home / "config.toml").write_text(
        '[server]\napi_keys = ["secret-server-key-12345"]\n'
        "[spend]\ndaily_usd = 0.0001\n[spend.providers.openai]\nmonthly_usd = 1.5\n"
        '[keys]\nOPENAI_API_KEY = ["sk-secret-openai-98765"]\n'
    )
    code, out, _ = car("config", "show")
    assert code == 0 and "None" not in out
    assert "secret-server-key-12345" not in out and "sk-secret-openai-98765" not in out
    code, as_json, _ = car("config", "show", "--json")
    expected = json.loads(as_json)
    del expected["home"]
    assert tomllib.loads(out) == _without_none(expected)  # the same settings, as TOML
    assert "[preferred]\n# generate = (not set)\n" in out  # unset settings are comments, not None


def test_config_show_escapes_control_characters_and_refuses_a_file_home(
    isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (isolated_home / "config.toml").write_text('[defaults]\ngenerate = "a\\u007fb"\n')
    code, out, _ = car("config", "show")
    assert code == 0 and tomllib.loads(out)["defaults"]["generate"] == "a\x7fb"  # a raw DEL: no TOML
    monkeypatch.setenv("CAR_HOME", str(tmp_path / "file"))
    (tmp_path / "file").write_text("")
    code, _, err = car("config", "show")  # it said "not present" and exited 0
    assert code == 2 and "it is a file, not a folder" in err


def test_a_provider_filter_ignores_case() -> None:
    code, out, err = car("models", "list", "--provider", "OpenAI")
    assert code == 0 and "no provider" not in err and "openai/" in out


class _Output:
    """A child's stdout read as it comes (a prompt has no newline), to wait for text in it."""

    def __init__(self, stream: Any) -> None:
        self.text = ""
        self._lock = threading.Lock()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: Any) -> None:
        while chunk := stream.read1(4096):
            with self._lock:
                self.text += chunk.decode("utf-8", "replace")

    def wait_for(self, pattern: str, after: int = 0, timeout_s: float = 60) -> int:
        """The end of the first match of ``pattern`` past ``after``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                match = re.compile(pattern, re.S).search(self.text, after)
            if match:
                return match.end()
            time.sleep(0.02)
        raise AssertionError(f"no {pattern!r} in {self.text[after:]!r}")


def test_chat_ctrl_c_stops_the_answer_then_quits(isolated_home: Path) -> None:
    import pty

    keyboard, terminal = pty.openpty()  # a terminal on stdin, as a person's: the prompt shows
    chat = subprocess.Popen(
        [sys.executable, "-m", "car_inference", "chat", "-m", "smollm2", "-n", "4000", "-t", "0.8"],
        stdin=terminal,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    os.close(terminal)
    try:
        out = _Output(chat.stdout)
        at = out.wait_for("you> ")
        os.write(keyboard, b"Write a very long story about a dragon, in ten chapters.\n")
        at = out.wait_for(r"car> \S.{30}", at)  # the answer is coming
        chat.send_signal(signal.SIGINT)
        started = time.monotonic()
        at = out.wait_for("you> ", at, timeout_s=5)  # the answer stopped; the chat goes on
        assert chat.poll() is None and time.monotonic() - started < 3
        chat.send_signal(signal.SIGINT)  # at the prompt: leave at once, without Enter
        assert chat.wait(timeout=5) == 130
    finally:
        chat.kill()
        _, err = chat.communicate()
        os.close(keyboard)
    assert b"[stopped]" in err and b"Traceback" not in err


def test_rerank_on_a_model_that_cannot_names_rerank() -> None:
    code, _, err = car("rerank", "capital of France", "Paris.", "Bananas.", "-m", "smollm2")
    assert code == 2 and "does not declare rerank" in err and "embed" not in err


def test_detokenize_unknown_ids_is_a_usage_error() -> None:
    code, _, err = car("detokenize", "smollm2", "99999999")
    assert code == 2 and "out of range" in err and len(err.strip().splitlines()) == 1


def test_a_negative_token_id_is_an_id_not_an_option() -> None:
    code, _, err = car("detokenize", "smollm2", "-1", "--json")
    assert code == 2 and "out of range" in err and "[-1]" in err and "No such option" not in err


def test_a_model_id_of_the_wrong_type_says_so(isolated_home: Path) -> None:
    (isolated_home / "models.toml").write_text('[[models]]\nid = 3\nname = "x"\n')
    code, _, err = car("models", "list")
    assert code == 2 and "models.toml:1" in err
    assert '`id` must be a string like "me/my-model", not 3' in err and "needs an" not in err


def test_spend_limits_under_a_cent_keep_their_digits(isolated_home: Path) -> None:
    (isolated_home / "config.toml").write_text("[spend]\ndaily_usd = 0.0001\nmonthly_usd = 12.5\n")
    code, out, _ = car("spend")
    daily = next(line for line in out.splitlines() if "daily" in line)
    assert code == 0 and daily.count("$0.0001") == 2 and "$12.50" in out  # limit and remaining
    assert [money(v) for v in (0, 0.0001, 0.00345, 0.5, 1234.5, 0.015)] == [
        "$0.00", "$0.0001", "$0.00345", "$0.50", "$1,234.50", "$0.015",
    ]  # fmt: skip


def test_route_with_a_long_prompt_prints_no_llama_cpp_warning() -> None:
    # Counted exactly on a vocabulary-only load, whose context llama.cpp warns about.
    code, out, err = car("route", "The quick brown fox jumps over the lazy dog. " * 400)
    assert code == 0 and "huggingface/smollm2" in out
    assert err == "", err


def test_a_cut_answer_says_so() -> None:
    prompt = "Count from one to one hundred, in words."
    code, out, _ = car("generate", prompt, "-n", "3", "--json")
    assert code == 0 and json.loads(out)["finish_reason"] == "length"
    code, out, err = car("generate", prompt, "-n", "3", "--no-stream")
    assert code == 0 and out.strip() and "cut at the 3-token limit" in err
    code, _, err = car("generate", "What is the capital of France?", "-n", "40", "--no-stream")
    assert code == 0 and "cut at" not in err  # a whole answer has no note (nor a finish_reason key)


def test_arguments_no_request_takes_are_one_line_with_status_2(isolated_home: Path, tmp_path: Path) -> None:
    """Through the real script (argv bytes that are not UTF-8 arrive as lone surrogates): each
    of these ended in a pydantic or UnicodeDecodeError traceback, exit 1."""
    script = str(Path(sys.executable).parent / "car")
    home_file = tmp_path / "home-file"
    home_file.write_text("x")
    bad_toml = tmp_path / "bad-home"
    bad_toml.mkdir()
    (bad_toml / "config.toml").write_bytes(b'[defaults]\ngenerate = "\xff"\n')
    cases: list[tuple[list[str], dict[str, str], str]] = [
        (
            [script, "generate", "hi \udcff", "-n", "2"],
            {},
            "error: prompt is not valid UTF-8 text (it holds the byte 0xff",
        ),
        ([script, "route", ""], {}, "error: the prompt is empty"),  # as `car generate ""` says
        (
            [script, "generate", "hi", "--seed", "9" * 23],
            {},
            "error: Invalid value for '--seed': Input should be less than",
        ),
        (
            [script, "route", "hi"],
            {"CAR_HOME": str(home_file)},
            f"error: {home_file}: the car home (CAR_HOME) cannot be used: it is a file, not a folder",
        ),
        (
            [script, "route", "hi"],
            {"CAR_HOME": str(bad_toml)},
            "error: " + str(bad_toml / "config.toml") + ": not UTF-8",
        ),
    ]
    for argv, env, says in cases:
        environ = {**os.environ, "CAR_HOME": str(isolated_home), **env}
        argv_bytes = [os.fsencode(a) for a in argv]
        run = subprocess.run(argv_bytes, capture_output=True, text=True, check=False, env=environ)
        assert run.returncode == 2 and run.stderr.startswith(says), (argv, run.stderr)
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_a_state_db_damaged_past_its_first_pages_is_one_line(isolated_home: Path) -> None:
    """Random bytes get their one line at open; a database whose later pages are damaged (a disk
    or copy fault) failed part way through almost every command with sqlite3's traceback."""
    import random
    import sqlite3

    assert car("generate", "hi", "-n", "2")[0] == 0
    path = isolated_home / "state.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    rng = random.Random(1)
    for i in range(12_288, len(data)):
        data[i] = rng.randrange(256)
    path.write_bytes(bytes(data))
    code, out, err = car("spend")
    assert code == 2 and "Traceback" not in out + err, err
    assert f"{path} is damaged (database disk image is malformed)" in err, "the path itself, not $CAR_HOME"


def test_a_command_closes_its_engine_and_leaves_no_write_ahead_log(isolated_home: Path) -> None:
    """The CLI never closed its engines: each command left state.db's -wal (127 KB) beside it,
    and a copy of state.db alone missed the records in it."""
    import sqlite3

    assert car("generate", "hi", "-n", "2")[0] == 0
    assert not (isolated_home / "state.db-wal").exists()
    copy = isolated_home.parent / "copy.db"
    copy.write_bytes((isolated_home / "state.db").read_bytes())
    with sqlite3.connect(copy) as conn:
        assert conn.execute("SELECT COUNT(*) FROM traces").fetchone()[0] == 1


def test_a_prompt_longer_than_the_window_is_said_to_be_cut(isolated_home: Path) -> None:
    """A prompt past the model's window is read from its end, silently: a 50 KB prompt ran for
    minutes and answered from its last few thousand tokens without a word."""
    (isolated_home / "config.toml").write_text("[local]\nn_ctx = 256\n")
    prompt = "The weather report for today says it will rain. " * 60 + "What is 2 + 2?"
    code, out, err = car("generate", prompt, "-n", "4", "-t", "0", "--no-stream")
    assert code == 0 and out.strip(), err
    assert "the prompt was longer than the model's 256-token window: only its end was read" in err
    code, _, err = car("generate", "What is 2 + 2?", "-n", "4", "-t", "0", "--no-stream")
    assert code == 0 and "the prompt was longer" not in err


def test_embed_dash_reads_texts_from_stdin() -> None:
    """`car embed -` embedded the text "-"; `car generate -` reads stdin."""
    code, out, _ = car("embed", "-", "--json", input="first text\n\nsecond text\n")
    assert code == 0 and len(json.loads(out)["embeddings"]) == 2
    code, _, err = car("embed", "-", input="\n")
    assert code == 2 and "stdin held no text" in err
