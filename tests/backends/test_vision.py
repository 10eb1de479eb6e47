"""Local vision through llama-cpp-python's multimodal chat handlers, as far as it goes without a
VLM's weights: the handler per family (the installed classes), the request in llama-cpp's chat
format, the projector lookup and its errors, and a real load whose projector is not one.
benchmarks/vlm_gpu.py runs a real Qwen2.5-VL on a machine that can pull it."""

from __future__ import annotations

import base64
from pathlib import Path
from threading import Event
from typing import Any

import pytest

from car_inference.engine import InferenceEngine
from car_inference.errors import InferenceFailed, ModelUnavailable, UnsupportedMode
from car_inference.requests import (
    AudioBlock,
    GenerateParams,
    GenerateRequest,
    GroundRequest,
    ImageBlock,
    Message,
    TextBlock,
)
from car_inference.schema import ModelSchema
from fakes.images import png

llama_chat_format = pytest.importorskip("llama_cpp.llama_chat_format")

from car_inference.backends.vision import (  # noqa: E402
    GENERIC_HANDLER,
    chat_handler,
    handler_name,
    has_images,
    mmproj_path,
    vision_messages,
)

INSTALLED = {n for n in dir(llama_chat_format) if n.endswith("ChatHandler")}
B64 = base64.b64encode(png(32, 24)).decode()


def _gguf(family: str, **source: Any) -> ModelSchema:
    return ModelSchema.model_validate(
        {
            "id": f"test/{family}",
            "name": family,
            "provider": "test",
            "family": family,
            "capabilities": ["generate", "vision", "grounding"],
            "source": {"kind": "gguf", **source},
        }
    )


@pytest.mark.parametrize(
    ("family", "handler"),
    [
        ("qwen2.5-vl", "Qwen25VLChatHandler"),
        ("llava-1.5", "Llava15ChatHandler"),
        ("llava-1.6-mistral", "Llava16ChatHandler"),
        ("moondream2", "MoondreamChatHandler"),
        ("minicpm-v-2.6", "MiniCPMv26ChatHandler"),
        ("nanollava", "NanoLlavaChatHandler"),
        ("gemma-3", GENERIC_HANDLER),  # the GGUF's own chat template
        ("qwen2-vl", GENERIC_HANDLER),
    ],
)
def test_handler_per_family_exists_in_the_installed_llama_cpp(family: str, handler: str) -> None:
    assert handler in INSTALLED
    assert handler_name(_gguf(family, path="/x.gguf"), INSTALLED) == handler


def test_an_old_llama_cpp_without_the_handlers_says_so() -> None:
    model = _gguf("gemma-3", path="/x.gguf")
    with pytest.raises(UnsupportedMode, match=r"no chat handler for gemma-3.*upgrade llama-cpp-python"):
        handler_name(model, {"Llava15ChatHandler"})
    # A family-specific handler missing, the generic one present: the generic one.
    assert handler_name(_gguf("qwen2.5-vl", path="/x"), {GENERIC_HANDLER}) == GENERIC_HANDLER


def test_the_request_in_llama_cpp_chat_format(tmp_path: Path) -> None:
    photo = tmp_path / "a.png"
    photo.write_bytes(png(3, 2))
    request = GenerateRequest(
        context="Be brief.",
        messages=[
            Message(
                role="user", content=[ImageBlock(data=B64, media_type="image/png"), TextBlock(text="what?")]
            ),
            Message(role="assistant", content="a square"),
            Message(role="user", content=[ImageBlock(url=str(photo)), TextBlock(text="and?")]),
        ],
    )
    assert has_images(request) and not has_images(GenerateRequest(prompt="hi"))
    photo_b64 = base64.b64encode(png(3, 2)).decode()  # a file becomes a data: URL
    assert vision_messages(request, "ignored: the request has its own") == [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{B64}"}},
                {"type": "text", "text": "what?"},
            ],
        },
        {"role": "assistant", "content": "a square"},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{photo_b64}"}},
                {"type": "text", "text": "and?"},
            ],
        },
    ]
    # The catalog's default system prompt goes first when the request brings none.
    plain = GenerateRequest(messages=[Message(role="user", content=[TextBlock(text="hi")])])
    assert vision_messages(plain, "You are terse.")[0] == {"role": "system", "content": "You are terse."}
    audio = GenerateRequest(messages=[Message(role="user", content=[AudioBlock(data="AAAA")])])
    with pytest.raises(UnsupportedMode, match="images only"):
        vision_messages(audio, None)


def test_projector_lookup(tmp_path: Path) -> None:
    assert mmproj_path(_gguf("qwen2.5-vl", path=str(tmp_path / "m.gguf"))) is None  # no mmproj: text only
    (tmp_path / "proj.gguf").write_bytes(b"GGUF")
    beside = _gguf("qwen2.5-vl", path=str(tmp_path / "m.gguf"), mmproj="proj.gguf")
    assert mmproj_path(beside) == tmp_path / "proj.gguf"
    missing = _gguf("qwen2.5-vl", hf_repo="ggml-org/Qwen2.5-VL-3B-Instruct-GGUF", mmproj="mmproj-x.gguf")
    with pytest.raises(
        ModelUnavailable, match=r"mmproj-x.gguf is not on disk; pull it: car models pull test/"
    ):
        mmproj_path(missing)


def test_handler_built_from_the_installed_class(tmp_path: Path) -> None:
    projector = tmp_path / "proj.gguf"
    projector.write_bytes(b"GGUF")
    handler = chat_handler(_gguf("qwen2.5-vl", path="/x"), projector)
    assert type(handler).__name__ == "Qwen25VLChatHandler" and handler.clip_model_path == str(projector)


@pytest.fixture
def fake_vl(isolated_home: Path) -> Any:
    """SmolLM2 (the embedded GGUF) catalogued as a Qwen2.5-VL whose projector is that same file:
    everything up to loading the projector is real; llama.cpp then refuses it."""
    engine = InferenceEngine()
    smol = engine.resolve("smollm2")
    data = smol.model_dump(exclude={"available"})
    data.update(id="test/fake-vl", name="fake-vl", aliases=[], family="qwen2.5-vl")
    data["capabilities"] = [*data["capabilities"], "vision", "grounding"]
    from car_inference.catalog.locate import local_path

    data["source"] = {**data["source"], "mmproj": str(local_path(smol))}
    engine.register_model(ModelSchema.model_validate(data))
    yield engine
    engine.close()


async def test_images_reach_the_projector_and_text_still_runs(fake_vl: InferenceEngine) -> None:
    image = ImageBlock(data=B64)
    request = GenerateRequest(
        messages=[Message(role="user", content=[image, TextBlock(text="What is this?")])],
        model="test/fake-vl",
        params=GenerateParams(max_tokens=4, temperature=0),
    )
    with pytest.raises(InferenceFailed, match="could not run the images: Failed to load mtmd context"):
        await fake_vl.generate(request)
    with pytest.raises(InferenceFailed, match="mtmd"):
        await fake_vl.ground(GroundRequest(prompt="the square", image=image, model="test/fake-vl"))
    # The same model loaded with its handler still answers text through our own token loop.
    answer = await fake_vl.generate(
        GenerateRequest(
            prompt="Say hi", model="test/fake-vl", params=GenerateParams(max_tokens=4, temperature=0)
        )
    )
    assert answer.text and answer.usage and answer.usage.completion_tokens <= 4


async def test_image_urls_are_fetched_before_the_models_turn(
    fake_vl: InferenceEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The images were fetched inside the turn of the thread every GGUF client shares: a slow URL
    held them all for up to the fetch timeout. A spy records where the fetch runs."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from car_inference.backends import vision

    class Site(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = png(32, 24)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    threads: list[str] = []
    original = vision.data_url

    def spy(*args: Any, **kwargs: Any) -> str:
        threads.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(vision, "data_url", spy)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Site)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/a.png"
    request = GenerateRequest(
        messages=[Message(role="user", content=[ImageBlock(url=url), TextBlock(text="What is this?")])],
        model="test/fake-vl",
        params=GenerateParams(max_tokens=4, temperature=0),
    )
    try:
        with pytest.raises(InferenceFailed, match="mtmd"):  # the fetched image reached llama.cpp
            await fake_vl.generate(request)
    finally:
        server.shutdown()
        server.server_close()
    assert threads and not any(name.startswith("car-llama") for name in threads), threads


async def test_a_text_model_refuses_images(isolated_home: Path) -> None:
    engine = InferenceEngine()
    try:
        smol = engine.resolve("smollm2")
        data = smol.model_dump(exclude={"available"})
        data.update(id="test/blind", name="blind", aliases=[])
        data["capabilities"] = [*data["capabilities"], "vision"]  # claims vision, has no projector
        engine.register_model(ModelSchema.model_validate(data))
        request = GenerateRequest(
            messages=[Message(role="user", content=[ImageBlock(data=B64), TextBlock(text="?")])],
            model="test/blind",
            params=GenerateParams(max_tokens=2),
        )
        with pytest.raises(UnsupportedMode, match="no vision projector"):
            await engine.generate(request)
        # Refused before any image is fetched: an unreachable URL is not the error.
        unreachable = request.model_copy(
            update={"messages": [Message(role="user", content=[ImageBlock(url="http://127.0.0.1:9/a.png")])]}
        )
        with pytest.raises(UnsupportedMode, match="no vision projector"):
            await engine.generate(unreachable)
    finally:
        engine.close()


def test_an_answer_whose_caller_went_away_ends_at_the_next_token(tmp_path: Path) -> None:
    """A vision answer comes whole, and one whose caller went away ran on to ``max_tokens`` with
    the model held from everyone. No VLM weights here: ``run_vision``'s completion runs through a
    real llama.cpp chat handler (SmolLM2's own template), text only, on the llama thread."""
    from car_inference.backends.base import BackendContext
    from car_inference.backends.cache import ModelCache
    from car_inference.backends.llamacpp import LLAMA_THREAD, LlamaCppBackend
    from car_inference.backends.vision import run_vision
    from car_inference.catalog import load_builtin
    from car_inference.catalog.locate import local_path
    from car_inference.config import CarConfig
    from car_inference.stream import Done

    config = CarConfig(home=tmp_path)
    backend = LlamaCppBackend(BackendContext(config=config, cache=ModelCache(config.local.cache_mb)))
    model = next(m for m in load_builtin().models if m.id == "huggingface/smollm2-135m-instruct:q4_1")
    request = GenerateRequest(prompt="?", params=GenerateParams(max_tokens=160, temperature=0))
    messages = [{"role": "user", "content": "Count from 1 to 100, separated by commas."}]

    def answer(went_away: bool) -> tuple[list[Any], int]:
        loaded = backend._load(model, str(local_path(model)), False)
        llm = loaded.llm
        llm.chat_handler = llama_chat_format.Jinja2ChatFormatter(
            template=loaded.template or "", eos_token=loaded.eos, bos_token=loaded.bos
        ).to_chat_handler()
        cancelled = Event()
        if went_away:
            cancelled.set()
        events = list(run_vision(llm, model, request, messages, cancelled))
        return events, llm.n_tokens

    whole, whole_tokens = LLAMA_THREAD.submit(answer, False).result()
    done = whole[-1]
    assert isinstance(done, Done) and done.usage is not None
    assert done.usage.completion_tokens > 100, "the prompt would run long"
    ended, ended_tokens = LLAMA_THREAD.submit(answer, True).result()
    assert ended == []
    assert ended_tokens <= done.usage.prompt_tokens + 1 < whole_tokens
