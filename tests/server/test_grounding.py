"""POST /v1/ground and the JSON-RPC method `ground`: a real server in front of a real engine, with
the embedded OCR grounder and a hosted Gemini that is the fake provider on loopback."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import pytest
from websockets.asyncio.client import connect

from car_inference.config import ServerSettings
from car_inference.engine import InferenceEngine
from car_inference.server import ServerThread, create_app
from fakes import FakeProviderServer, Reply
from fakes.images import png, text_sign

STREET = base64.b64encode(png(1000, 500)).decode()


@pytest.fixture(scope="module")
def ground_engine(
    tmp_path_factory: pytest.TempPathFactory, fake_provider: FakeProviderServer
) -> Iterator[InferenceEngine]:
    home = tmp_path_factory.mktemp("ground-home")
    (home / "models.toml").write_text(
        '[[models]]\nid = "google/fake-gemini"\nname = "fake-gemini"\nprovider = "google"\n'
        'family = "gemini-3"\ncapabilities = ["generate", "vision", "grounding"]\n[models.source]\n'
        f'kind = "gemini"\nbase_url = "{fake_provider.gemini_base_url}"\napi_key_env = "FAKE_GEMINI_KEY"\n'
        'model_name = "gemini-test"\n'
    )
    (home / "config.toml").write_text("[remote]\ntimeout_s = 5\n")
    with pytest.MonkeyPatch.context() as patch:  # the key is read at each request
        patch.setenv("FAKE_GEMINI_KEY", "k")
        engine = InferenceEngine(home=home)
        yield engine
        engine.close()


@pytest.fixture(scope="module")
def server(ground_engine: InferenceEngine) -> Iterator[ServerThread]:
    with ServerThread(create_app(ground_engine)) as running:
        yield running


def post(server: ServerThread, body: object) -> httpx.Response:
    return httpx.post(server.url + "/v1/ground", json=body, timeout=60)


def test_hosted_grounding_over_http(server: ServerThread, fake_provider: FakeProviderServer) -> None:
    fake_provider.queue(Reply(text='[{"box_2d": [100, 200, 600, 800], "label": "red car"}]'))
    reply = post(
        server, {"prompt": "the red car", "image": f"data:image/png;base64,{STREET}", "model": "fake-gemini"}
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["boxes"] == [{"x1": 200.0, "y1": 50.0, "x2": 800.0, "y2": 300.0, "label": "red car"}]
    assert (body["width"], body["height"], body["model_used"]) == (1000, 500, "google/fake-gemini")
    assert reply.headers["x-car-model"] == "google/fake-gemini"


def test_unreadable_model_output_is_a_502_quoting_it(
    server: ServerThread, fake_provider: FakeProviderServer
) -> None:
    fake_provider.queue(Reply(text='{"box_2d": [1, 2'))
    reply = post(server, {"prompt": "car", "image": {"data": STREET}, "model": "fake-gemini"})
    assert reply.status_code == 502
    error = reply.json()["error"]
    assert error["code"] == "unreadable_model_output" and "box_2d" in error["message"]


def test_ocr_is_the_default_for_text_without_a_vision_model(tmp_path: Path) -> None:
    pytest.importorskip("rapidocr_onnxruntime")
    engine = InferenceEngine(home=tmp_path / "home")
    try:
        with ServerThread(create_app(engine)) as running:
            sign = base64.b64encode(text_sign()).decode()
            reply = post(running, {"prompt": "exit 42", "image": {"data": sign}, "model": "auto"})
    finally:
        engine.close()
    assert reply.status_code == 200, reply.text
    [box] = reply.json()["boxes"]
    assert reply.json()["model_used"] == "rapidai/pp-ocrv4-mobile" and 290 <= box["x1"] <= 310


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"prompt": "car", "image": "/etc/passwd"}, 400, "no files"),
        ({"prompt": "car", "image": "file:///etc/passwd"}, 400, "no files"),
        ({"prompt": "car", "image": 7}, 400, "`image` must be"),
        ({"prompt": "car", "image": "http://[::1"}, 400, "malformed"),
        ({"prompt": "car", "image": "data:image/png,€"}, 400, "is not a PNG"),  # was a 500
        ({"prompt": "car", "image": {"data": "!!"}, "model": "fake-gemini"}, 400, "base64"),
        ({"prompt": "car", "image": {"data": STREET}, "model": "nope-gemini"}, 404, "fake-gemini"),
        ({"prompt": "car", "image": {"data": STREET}, "extra": 1}, 400, "extra"),
        ({"image": {"data": STREET}}, 400, "prompt"),
        # a named model not pulled: its 503 (a 501 said grounding was missing while others answered)
        ({"prompt": "car", "image": {"data": STREET}, "model": "qwen2.5-vl-3b"}, 503, "pull"),
    ],
)
def test_bad_requests_are_4xx_saying_why(
    server: ServerThread, body: object, status: int, fragment: str
) -> None:
    reply = post(server, body)
    assert reply.status_code == status, reply.text
    assert fragment in reply.text


async def test_json_rpc_ground(server: ServerThread, fake_provider: FakeProviderServer) -> None:
    fake_provider.queue(Reply(text="<|box_start|>(100,100),(500,500)<|box_end|>"))
    params = {"prompt": "car", "image": {"data": STREET, "media_type": "image/png"}, "model": "fake-gemini"}
    async with connect(server.ws_url) as ws:
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": 3, "method": "ground", "params": params}))
        reply = json.loads(await ws.recv())
        assert reply["result"]["boxes"] == [
            {"x1": 100.0, "y1": 50.0, "x2": 500.0, "y2": 250.0, "label": None}
        ]
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": 4, "method": "ground", "params": {"prompt": "x"}}))
        error = json.loads(await ws.recv())["error"]
        assert "image" in error["message"]


class _Street(BaseHTTPRequestHandler):
    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.seen.append(self.path)
        body = base64.b64decode(STREET)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_image_urls_on_loopback_are_refused_unless_fetch_private_urls(
    server: ServerThread, ground_engine: InferenceEngine, fake_provider: FakeProviderServer
) -> None:
    """A client could probe the server's network through the image it names (SSRF): a URL on a
    loopback address is a 400 naming the setting, fetched only with fetch_private_urls on."""
    site = ThreadingHTTPServer(("127.0.0.1", 0), _Street)
    threading.Thread(target=site.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{site.server_address[1]}/street.png"
    body = {"prompt": "the red car", "image": url, "model": "fake-gemini"}
    try:
        for image in (url, "http://127.0.0.1:1/a.png", "http://localhost:1/a.png"):
            reply = post(server, body | {"image": image})
            assert reply.status_code == 400, reply.text
            assert "fetch_private_urls" in reply.text and "refused" not in reply.text.lower()
        assert _Street.seen == []
        trusted = create_app(ground_engine, ServerSettings(fetch_private_urls=True))
        with ServerThread(trusted) as running:
            fake_provider.queue(Reply(text='[{"box_2d": [100, 200, 600, 800], "label": "red car"}]'))
            reply = post(running, body)
        assert reply.status_code == 200, reply.text
        assert (reply.json()["width"], reply.json()["height"]) == (1000, 500)
        assert _Street.seen == ["/street.png"]
    finally:
        ground_engine.private_urls_ok = False  # as the module's server set it
        site.shutdown()
        site.server_close()
