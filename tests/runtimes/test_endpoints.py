"""Endpoint discovery against a real OpenAI-compatible server on loopback (the fake provider)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from car_inference.catalog import EndpointConfig
from car_inference.cli import app
from car_inference.engine import InferenceEngine
from car_inference.errors import ModelNotFound, ProviderError
from car_inference.requests import GenerateRequest
from car_inference.runtimes.endpoints import SERVER_LOOP_WAIT_S, list_served_models
from car_inference.server import create_app
from fakes import FakeProviderServer, Fault, Reply
from fakes.http_answer import answering


@pytest.fixture
def fake() -> Iterator[FakeProviderServer]:
    with FakeProviderServer() as server:
        server.served_models = ["Qwen/Qwen3-8B", "meta-llama/Llama-3.1-8B-Instruct"]
        yield server


async def test_lists_served_models(fake: FakeProviderServer) -> None:
    endpoint = EndpointConfig(name="box", kind="vllm", base_url=fake.openai_base_url)
    assert await list_served_models(endpoint) == ["Qwen/Qwen3-8B", "meta-llama/Llama-3.1-8B-Instruct"]


async def test_ids_that_are_no_model_name_are_skipped_and_repeats_kept_once(
    fake: FakeProviderServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A null id became "box/None" (and "None" went upstream), a number "box/5"."""
    fake.served_models = [None, 5, "", "has space", "a/../b", "Qwen/Qwen3-8B", "Qwen/Qwen3-8B", "x" * 300]  # type: ignore[list-item]
    endpoint = EndpointConfig(name="box", kind="vllm", base_url=fake.openai_base_url)
    assert await list_served_models(endpoint) == ["Qwen/Qwen3-8B"]
    assert "6 model id(s)" in caplog.text


async def test_unreachable_or_failing_server_is_a_provider_error(
    fake: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ProviderError) as info:
        await list_served_models(EndpointConfig(name="down", base_url="http://127.0.0.1:9/v1"), timeout_s=1)
    assert info.value.retryable and info.value.status is None
    fake.set_key_behavior("bad-key", Fault.server_error())
    monkeypatch.setenv("BOX_KEY", "bad-key")
    endpoint = EndpointConfig(name="box", base_url=fake.openai_base_url, api_key_env="BOX_KEY")
    with pytest.raises(ProviderError) as info:
        await list_served_models(endpoint)
    assert info.value.status == 500 and info.value.retryable
    assert fake.requests[-1].api_key == "bad-key"


async def test_engine_registers_discovered_models(fake: FakeProviderServer, isolated_home: Path) -> None:
    (isolated_home / "models.toml").write_text(
        f'[[endpoints]]\nname = "box"\nkind = "vllm"\nbase_url = "{fake.openai_base_url}"\ndiscover = true\n'
        f'[[endpoints]]\nname = "off"\nbase_url = "http://127.0.0.1:9/v1"\n'
    )
    engine = InferenceEngine()
    assert engine.registry.find("box/Qwen/Qwen3-8B") is None
    report = await engine.discover_endpoints()
    assert report == {"box": ["box/Qwen/Qwen3-8B", "box/meta-llama/Llama-3.1-8B-Instruct"]}, (
        "only discover=true"
    )
    model = engine.resolve("box/Qwen/Qwen3-8B")
    assert model.kind == "vllm" and model.source.model_name == "Qwen/Qwen3-8B"  # type: ignore[union-attr]
    failed = await engine.discover_endpoints(["off"])
    assert isinstance(failed["off"], ProviderError)


async def test_an_endpoint_named_after_a_provider_takes_none_of_its_models_ids(
    fake: FakeProviderServer, isolated_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An endpoint named "openai" that discovered gpt-4o-mini replaced the built-in
    openai/gpt-4o-mini in `car serve`: its prompts went to that server without OpenAI's key,
    while `car generate` still sent them to OpenAI. A catalog model's id stays its own."""
    fake.served_models = ["gpt-4o-mini", "my-own-model"]
    (isolated_home / "models.toml").write_text(
        f'[[endpoints]]\nname = "openai"\nbase_url = "{fake.openai_base_url}"\ndiscover = true\n'
    )
    engine = InferenceEngine()
    built_in = engine.resolve("openai/gpt-4o-mini")
    assert await engine.discover_endpoints() == {"openai": ["openai/my-own-model"]}
    assert engine.resolve("openai/gpt-4o-mini") is built_in and "endpoint" not in built_in.tags
    assert "openai/gpt-4o-mini, a catalog model's id: not registered" in caplog.text
    engine.close()


def test_a_discoverable_endpoints_model_can_be_named_before_any_discovery(
    fake: FakeProviderServer, isolated_home: Path
) -> None:
    """`car models discover` listed box/Qwen/Qwen3-8B, then `car generate -m box/Qwen/Qwen3-8B`
    said "model not found": only `car serve` discovered, at its start."""
    (isolated_home / "models.toml").write_text(
        f'[[endpoints]]\nname = "box"\nbase_url = "{fake.openai_base_url}"\ndiscover = true\n'
        f'[[endpoints]]\nname = "quiet"\nbase_url = "{fake.openai_base_url}"\n'
    )
    result = CliRunner().invoke(app, ["generate", "-m", "box/Qwen/Qwen3-8B", "Say hi.", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["model_used"] == "box/Qwen/Qwen3-8B"
    result = CliRunner().invoke(app, ["generate", "-m", "quiet/Qwen/Qwen3-8B", "Say hi."])
    assert result.exit_code == 2 and "model not found" in result.stderr, "discover = false: not asked"
    engine = InferenceEngine()
    asked = sum(r.path.endswith("/models") for r in fake.requests)
    with pytest.raises(ModelNotFound):
        engine.resolve("box/no-such-model")
    with pytest.raises(ModelNotFound):
        engine.resolve("box/no-such-model-either")
    assert sum(r.path.endswith("/models") for r in fake.requests) == asked + 1, "asked once in 30 s"
    engine.close()


def test_a_model_of_a_discover_endpoint_that_does_not_answer_says_why(isolated_home: Path) -> None:
    """`car generate -m deadbox/foo` said only "model not found" (and the server "does not
    exist"); that the endpoint never answered was in a log line."""
    with answering(lambda path: (500, {}, b"")) as box:
        (isolated_home / "models.toml").write_text(
            f'[[endpoints]]\nname = "deadbox"\nbase_url = "{box.url}/v1"\ndiscover = true\n'
        )
        result = CliRunner().invoke(app, ["generate", "-m", "deadbox/foo", "Say hi."])
    assert result.exit_code == 2 and "model not found: deadbox/foo" in result.stderr
    assert "endpoint deadbox could not say what it serves" in result.stderr, result.stderr


@pytest.mark.parametrize("kind", ["openai", "vllm", "ollama"])
async def test_an_endpoints_failure_is_labelled_with_the_endpoint_not_its_protocol(
    fake: FakeProviderServer, isolated_home: Path, kind: str
) -> None:
    """The user's own server failed as "openai box/m returned 500": the wire protocol's name
    (for kind = "vllm", the README's own example, until later: "vllm box/m ...")."""
    (isolated_home / "models.toml").write_text(
        f'[[endpoints]]\nname = "box"\nkind = "{kind}"\nbase_url = "{fake.openai_base_url}"\nmodels = ["m"]\n'
    )
    engine = InferenceEngine()
    fake.queue(Fault.server_error())
    with pytest.raises(ProviderError) as info:
        await engine.generate(GenerateRequest(prompt="hi", model="box/m"))
    assert info.value.provider == "box" and str(info.value).startswith("box/m returned 500")
    engine.close()


def test_cli_discover(fake: FakeProviderServer, isolated_home: Path) -> None:
    (isolated_home / "models.toml").write_text(
        f'[[endpoints]]\nname = "box"\nbase_url = "{fake.openai_base_url}"\n'
    )
    result = CliRunner().invoke(app, ["models", "discover", "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"box": ["box/Qwen/Qwen3-8B", "box/meta-llama/Llama-3.1-8B-Instruct"]}
    (isolated_home / "models.toml").write_text(
        '[[endpoints]]\nname = "off"\nbase_url = "http://127.0.0.1:9/v1"\n'
    )
    result = CliRunner().invoke(app, ["models", "discover"])
    assert result.exit_code == 1 and "off" in result.stderr
    result = CliRunner().invoke(app, ["models", "discover", "nosuch"])
    assert (
        result.exit_code == 2 and "no endpoint named nosuch in models.toml (endpoints: off)" in result.stderr
    )
    (isolated_home / "models.toml").write_text("")
    result = CliRunner().invoke(app, ["models", "discover"])
    assert result.exit_code == 2 and "no [[endpoints]] in models.toml" in result.stderr, "configuration"


async def test_endpoints_are_asked_together(isolated_home: Path) -> None:
    """Each endpoint that never answers cost `car serve`'s start its timeout in turn; they are
    asked at once, so both requests are open on the silent server at the same time."""
    import socket
    import threading

    open_now, most = 0, 0
    lock = threading.Lock()

    def hold(conn: socket.socket) -> None:
        nonlocal open_now, most
        with lock:
            open_now += 1
            most = max(most, open_now)
        with conn:
            while conn.recv(4096):  # until the client gives up and closes
                pass
        with lock:
            open_now -= 1

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=hold, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    (isolated_home / "config.toml").write_text("[remote]\nconnect_timeout_s = 1.0\n")
    (isolated_home / "models.toml").write_text(
        "".join(
            f'[[endpoints]]\nname = "{n}"\nbase_url = "http://127.0.0.1:{port}/v1"\ndiscover = true\n'
            for n in ("mute1", "mute2")
        )
    )
    try:
        report = await InferenceEngine().discover_endpoints()
    finally:
        listener.close()
    assert list(report) == ["mute1", "mute2"], "in the configuration's order"
    assert all(isinstance(r, ProviderError) and r.retryable for r in report.values())
    assert most == 2


async def test_a_discovered_endpoint_model_carries_its_declared_price_and_fallbacks(
    fake: FakeProviderServer, isolated_home: Path
) -> None:
    """[[models]] entries without a source refine an endpoint's models: a discovered model is
    charged its price (it was $0, so a spend limit never saw a paid endpoint) and a named model
    that fails goes to its declared fallback on the same endpoint."""
    (isolated_home / "models.toml").write_text(
        f'[[endpoints]]\nname = "box"\nbase_url = "{fake.openai_base_url}"\ndiscover = true\n'
        '[[models]]\nid = "box/Qwen/Qwen3-8B"\nfallbacks = ["box/meta-llama/Llama-3.1-8B-Instruct"]\n'
        "[models.cost]\ninput_per_mtok = 100.0\noutput_per_mtok = 300.0\n"
    )
    engine = InferenceEngine()
    fake.queue(Reply(text="paid answer", prompt_tokens=1000, completion_tokens=100))
    result = await engine.generate(GenerateRequest(prompt="hi", model="box/Qwen/Qwen3-8B"))
    assert result.text == "paid answer"
    assert result.usage is not None and result.usage.cost_usd == pytest.approx(1000 * 100e-6 + 100 * 300e-6)
    fake.queue(Fault.server_error())
    result = await engine.generate(GenerateRequest(prompt="hi again", model="box/Qwen/Qwen3-8B"))
    assert result.model_used == "box/meta-llama/Llama-3.1-8B-Instruct"
    assert fake.requests[-1].json["model"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert result.usage is not None and result.usage.cost_usd == 0, "the fallback has no declared price"
    engine.close()


def _late_models(path: str) -> tuple[int, dict[str, str], bytes]:
    """An OpenAI-compatible /models that answers after 0.8 s."""
    time.sleep(0.8)
    body = json.dumps({"object": "list", "data": [{"id": "late-model", "object": "model"}]}).encode()
    return 200, {"content-type": "application/json"}, body


async def test_a_slow_endpoint_never_holds_the_event_loop(isolated_home: Path) -> None:
    """On a server's loop, a request naming a model of a discover=true endpoint that accepts
    connections and never answers held the whole loop (every client of `car serve`) for the 5 s
    discovery timeout. (The CLI still waits: a slow endpoint's model is found on the first try.)"""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections are accepted by the kernel and never answered
    with answering(_late_models) as slow:
        (isolated_home / "models.toml").write_text(
            f'[[endpoints]]\nname = "silent"\nbase_url = "http://127.0.0.1:{silent.getsockname()[1]}/v1"\n'
            "discover = true\n"
            f'[[endpoints]]\nname = "slow"\nbase_url = "{slow.url}/v1"\ndiscover = true\n'
        )
        engine = InferenceEngine()
        create_app(engine)  # a server: names on its loop wait SERVER_LOOP_WAIT_S at most
        assert engine.discovery.loop_wait_s == SERVER_LOOP_WAIT_S
        try:
            started = time.monotonic()
            with pytest.raises(ModelNotFound):
                engine.resolve("silent/some-model")
            assert time.monotonic() - started < 1.0, "the loop waited for the endpoint's timeout"
            with pytest.raises(ModelNotFound):
                engine.resolve("slow/late-model")  # asked; its answer comes after the wait
            for _ in range(50):  # what it lists is registered on the loop once it answers
                await asyncio.sleep(0.1)
                if engine.registry.find("slow/late-model") is not None:
                    break
            assert engine.resolve("slow/late-model").id == "slow/late-model"
        finally:
            engine.close()
            silent.close()
