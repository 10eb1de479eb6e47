"""The OpenAPI document of the HTTP API, and schemathesis over it against a real server: requests
the document describes, and requests that break it, never get a 5xx.

Generation goes to the fake provider (preferred for `auto`), so that a generated `max_tokens` of
two billion costs nothing; embeddings, rerank and speech run the embedded models."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings

from car_inference import __version__
from car_inference.engine import InferenceEngine
from car_inference.server import ServerThread, create_app
from car_inference.server.openapi import openapi_schema
from fakes import FakeProviderServer

from .conftest import endpoint_toml

SCHEMA = schemathesis.openapi.from_dict(openapi_schema(__version__))
EXAMPLES = int(os.environ.get("CAR_FUZZ_EXAMPLES", "30"))  # per operation; fuzz longer by hand
# Deliberate, documented 5xx answers that name what the server lacks (docs/protocol.md): no image
# backend is installed here (501), and a request may require capabilities (`intent.require`)
# that no model has (503 model_unavailable). Anything else at 500 or above fails.
DELIBERATE = {(501, "capability_unavailable"), (503, "model_unavailable")}


@pytest.fixture(scope="module")
def fuzz_engine(
    tmp_path_factory: pytest.TempPathFactory, fake_provider: FakeProviderServer
) -> Iterator[InferenceEngine]:
    home = tmp_path_factory.mktemp("fuzz-home")
    models = endpoint_toml("fake", fake_provider.openai_base_url, ["gpt-tools"], ["generate", "tool_use"])
    (home / "models.toml").write_text(models)
    (home / "config.toml").write_text(
        '[preferred]\ngenerate = "fake/gpt-tools"\n'
        "[routing]\nexploration_rate = 0.0\n[remote]\ntimeout_s = 5\n"
    )
    engine = InferenceEngine(home=home)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def fuzz_server(fuzz_engine: InferenceEngine) -> Iterator[ServerThread]:
    with ServerThread(create_app(fuzz_engine)) as server:
        yield server


def test_the_document_covers_every_http_route(fuzz_engine: InferenceEngine) -> None:
    app = create_app(fuzz_engine)
    document = app.openapi()
    assert document["openapi"].startswith("3.1")
    routes = {getattr(r, "path", "") for r in app.router.routes} - {"/ws", "/openapi.json"}
    described = {p.replace("{model_id}", "{model_id:path}") for p in document["paths"]}
    assert routes == described
    chat = document["components"]["schemas"]["ChatCompletionRequest"]
    assert {"messages", "model", "tools", "tool_choice", "temperature", "stream"} <= set(chat["properties"])
    assert chat["required"] == ["messages"]


def test_served_at_openapi_json(fuzz_server: ServerThread) -> None:
    served = httpx.get(fuzz_server.url + "/openapi.json")
    assert served.status_code == 200 and served.headers["content-type"] == "application/json"
    assert served.json() == openapi_schema(__version__)
    # The bearer scheme applies (generated clients send the key), except on the liveness probe.
    document = served.json()
    assert document["security"] == [{"bearer": []}] and document["paths"]["/health"]["get"]["security"] == []


@SCHEMA.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # a failure reports its example; no shrinking runs
    suppress_health_check=list(HealthCheck),
)
def test_no_request_gets_a_5xx(case: schemathesis.Case, fuzz_server: ServerThread) -> None:
    response = case.call(base_url=fuzz_server.url, timeout=60)
    status = response.status_code
    code = response.json()["error"]["code"] if status >= 500 else None
    assert status < 500 or (status, code) in DELIBERATE, (
        f"{case.method} {case.path} -> {response.status_code}: {response.text[:400]}\n"
        f"{case.as_curl_command()[:2000]}"
    )
