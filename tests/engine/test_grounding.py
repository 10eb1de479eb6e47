"""engine.ground end to end: hosted VLMs through the real SDKs over HTTP to the fake provider
server on loopback, the model choice, and the image inputs (base64, data: URL, file, http)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from car_inference.engine import InferenceEngine
from car_inference.engine.grounding import load_image
from car_inference.errors import (
    InferenceError,
    InvalidInput,
    ModelNotFound,
    ModelUnavailable,
    UnsupportedMode,
)
from car_inference.grounding import GroundingOutputError
from car_inference.requests import BoundingBox, GenerateRequest, GroundRequest, ImageBlock
from fakes import FakeProviderServer, Fault, Reply
from fakes.images import png

IMAGE = png(640, 480, (200, 30, 30))
B64 = base64.b64encode(IMAGE).decode()


def _catalog(home: Path, fake: FakeProviderServer, monkeypatch: pytest.MonkeyPatch, *extra: str) -> None:
    """A Gemini model and a Qwen2.5-VL on an OpenAI-compatible host, both really the fake."""
    monkeypatch.setenv("FAKE_GEMINI_KEY", "gemini-key")
    monkeypatch.setenv("FAKE_VLM_KEY", "vlm-key")
    models = f"""
[[models]]
id = "google/fake-gemini"
name = "fake-gemini"
provider = "google"
family = "gemini-3"
capabilities = ["generate", "vision", "grounding"]
quality = 0.9
[models.source]
kind = "gemini"
base_url = "{fake.gemini_base_url}"
api_key_env = "FAKE_GEMINI_KEY"
model_name = "gemini-test"

[[models]]
id = "vlmhost/qwen2.5-vl-72b"
name = "hosted-qwen-vl"
provider = "vlmhost"
family = "qwen2.5-vl"
capabilities = ["generate", "vision", "grounding"]
quality = 0.7
[models.source]
kind = "openai"
base_url = "{fake.openai_base_url}"
api_key_env = "FAKE_VLM_KEY"
model_name = "Qwen/Qwen2.5-VL-72B-Instruct"
"""
    (home / "models.toml").write_text(models + "".join(extra))
    (home / "config.toml").write_text("[remote]\ntimeout_s = 5\n")


@pytest.fixture
def fake() -> Iterator[FakeProviderServer]:
    with FakeProviderServer() as server:
        yield server


@pytest.fixture
def engine(
    fake: FakeProviderServer, isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[InferenceEngine]:
    _catalog(isolated_home, fake, monkeypatch)
    engine = InferenceEngine()
    yield engine
    engine.close()


def _request(model: str | None = None, **image: Any) -> GroundRequest:
    block = ImageBlock(**(image or {"data": B64, "media_type": "image/png"}))
    return GroundRequest(prompt="the red car", image=block, model=model)


async def test_gemini_grounding_over_the_wire(engine: InferenceEngine, fake: FakeProviderServer) -> None:
    fake.queue(Reply(text='```json\n[{"box_2d": [250, 100, 750, 500], "label": "red car"}]\n```'))
    result = await engine.ground(_request("fake-gemini"))
    assert result.boxes == [BoundingBox(x1=64, y1=120, x2=320, y2=360, label="red car")]
    assert (result.model_used, result.width, result.height) == ("google/fake-gemini", 640, 480)
    sent = fake.requests[-1]
    assert sent.protocol == "gemini" and "gemini-test" in sent.path
    parts = sent.json["contents"][-1]["parts"]
    media = next(p for p in parts if "text" not in p)
    inline = media.get("inline_data") or media["inlineData"]
    assert inline["data"] == B64 and inline.get("mime_type", inline.get("mimeType")) == "image/png"
    prompt = next(p["text"] for p in parts if "text" in p)
    assert "box_2d" in prompt and '"the red car"' in prompt
    config = sent.json["generationConfig"]
    assert config["temperature"] == 0 and config["maxOutputTokens"] == 2048  # room for thinking


async def test_openai_compatible_qwen_vl_host(engine: InferenceEngine, fake: FakeProviderServer) -> None:
    # Qwen2.5-VL answers in pixels of its resized input: 640x480 is seen as 644x476.
    fake.queue(Reply(text='[{"bbox_2d": [161, 119, 322, 357], "label": "the red car"}]'))
    result = await engine.ground(_request("hosted-qwen-vl"))
    assert result.boxes == [BoundingBox(x1=160.0, y1=120.0, x2=320.0, y2=360.0, label="the red car")]
    sent = fake.requests[-1]
    assert sent.protocol == "openai" and sent.json["model"] == "Qwen/Qwen2.5-VL-72B-Instruct"
    assert sent.api_key == "vlm-key"
    content = sent.json["messages"][-1]["content"]
    assert content[0] == {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{B64}"}}
    assert "bbox_2d" in content[1]["text"]


async def test_generate_on_a_grounding_model_reads_boxes_with_the_grounding_parser(
    engine: InferenceEngine, fake: FakeProviderServer
) -> None:
    """InferenceResult.bounding_boxes: grounding.py's parser, in the model's own coordinates
    (Gemini's box_2d reordered to x, y); unreadable boxes leave the answer's text and no boxes."""
    fake.queue(Reply(text='```json\n[{"box_2d": [250, 100, 750, 500], "label": "red car"}]\n```'))
    result = await engine.generate(GenerateRequest(prompt="find the red car", model="fake-gemini"))
    assert result.bounding_boxes == [BoundingBox(x1=100, y1=250, x2=500, y2=750, label="red car")]
    fake.queue(Reply(text="<|object_ref_start|>car<|object_ref_end|><|box_start|>(10,20),(30,40)<|box_end|>"))
    result = await engine.generate(GenerateRequest(prompt="find the car", model="hosted-qwen-vl"))
    assert result.bounding_boxes == [BoundingBox(x1=10, y1=20, x2=30, y2=40, label="car")]
    fake.queue(Reply(text='[{"bbox_2d": [1, 2, 3]}]'))
    result = await engine.generate(GenerateRequest(prompt="find it", model="hosted-qwen-vl"))
    assert result.bounding_boxes == [] and result.text == '[{"bbox_2d": [1, 2, 3]}]'


async def test_an_answer_without_boxes_is_an_empty_result(
    engine: InferenceEngine, fake: FakeProviderServer
) -> None:
    fake.queue(Reply(text="I cannot see any red car."))
    result = await engine.ground(_request("fake-gemini"))
    assert result.boxes == [] and result.raw_text == "I cannot see any red car."


async def test_malformed_boxes_raise_quoting_the_answer(
    engine: InferenceEngine, fake: FakeProviderServer
) -> None:
    fake.queue(Reply(text='[{"box_2d": [250, 100, 750]}]'))
    with pytest.raises(GroundingOutputError, match=r"not four numbers.*received: '\[\{\"box_2d\""):
        await engine.ground(_request("fake-gemini"))


async def test_default_model_prefers_quality_among_vision_models(
    engine: InferenceEngine, fake: FakeProviderServer
) -> None:
    fake.queue(Reply(text="[]"))
    assert (await engine.ground(_request())).model_used == "google/fake-gemini"


async def test_default_model_passes_over_an_open_circuit(
    engine: InferenceEngine, fake: FakeProviderServer
) -> None:
    """Every request without a model went to the best one while its circuit was open: a 503 for
    the whole cooldown though another model could ground."""
    failures = 0
    while "google/fake-gemini" not in engine.router.breakers.blocked():
        fake.queue(Fault.server_error())
        with pytest.raises(InferenceError):
            await engine.ground(_request())
        failures += 1
        assert failures < 10
    fake.queue(Reply(text='[{"bbox_2d": [161, 119, 322, 357]}]'))
    result = await engine.ground(_request())
    assert result.model_used == "vlmhost/qwen2.5-vl-72b" and len(result.boxes) == 1
    assert fake.pending == 0


async def test_model_choice_errors(engine: InferenceEngine) -> None:
    with pytest.raises(ModelNotFound, match="fake-gemni"):
        await engine.ground(_request("fake-gemni"))
    with pytest.raises(UnsupportedMode, match=r"does not declare grounding; models that do: .*google/fake"):
        await engine.ground(_request("smollm2"))
    # The catalog's Qwen2.5-VL GGUF, not pulled: the error says how to get it.
    with pytest.raises(ModelUnavailable, match=r"(?i)pull"):
        await engine.ground(_request("qwen2.5-vl-3b"))
    with pytest.raises(InvalidInput, match="target"):
        await engine.ground(GroundRequest(prompt="  ", image=ImageBlock(data=B64), model="fake-gemini"))


async def test_no_grounding_model_names_what_to_pull(isolated_home: Path) -> None:
    # The embedded OCR grounder made unavailable (its files "missing"), so nothing can ground.
    (isolated_home / "models.toml").write_text(
        '[[models]]\nid = "rapidai/pp-ocrv4-mobile"\nname = "rapidocr"\nprovider = "rapidai"\n'
        'capabilities = ["grounding"]\n[models.source]\nkind = "rapidocr"\npath = "/nonexistent/ocr"\n'
    )
    engine = InferenceEngine()
    try:
        assert not engine.registry.query(capabilities=["grounding"], available_only=True)
        with pytest.raises(ModelUnavailable, match=r"car models pull qwen2.5-vl-3b.*car-inference\[ocr\]"):
            await engine.ground(_request())
    finally:
        engine.close()


# --- image inputs (every form: tests/backends/test_image_input.py) ------------------------------------


async def test_image_from_a_file_url(
    tmp_path: Path, engine: InferenceEngine, fake: FakeProviderServer
) -> None:
    path = tmp_path / "car.png"
    path.write_bytes(IMAGE)
    assert await load_image(ImageBlock(url=path.as_uri()), 1) == IMAGE
    fake.queue(Reply(text='[{"box_2d": [0, 0, 1000, 1000]}]'))
    result = await engine.ground(
        GroundRequest(prompt="car", image=ImageBlock(url=str(path)), model="fake-gemini")
    )
    assert result.boxes == [BoundingBox(x1=0, y1=0, x2=640, y2=480)]
    with pytest.raises(InvalidInput, match="cannot read the image"):
        await load_image(ImageBlock(url=str(tmp_path / "missing.png")), 1)


async def test_not_an_image_is_invalid_input(engine: InferenceEngine) -> None:
    text = base64.b64encode(b"just some text, not a picture").decode()
    with pytest.raises(InvalidInput, match="not a PNG"):
        await engine.ground(GroundRequest(prompt="car", image=ImageBlock(data=text), model="fake-gemini"))


async def test_an_image_of_too_many_pixels_is_refused_before_it_is_decoded(engine: InferenceEngine) -> None:
    """A 110 KB PNG of 30,000 x 30,000 px ended in PIL's DecompressionBombError (a traceback from
    `car ground`); its header says its size, so it is refused first, for every model."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 30_000, 30_000, 1, 0, 0, 0, 0))
    png = b"\x89PNG\r\n\x1a\n" + header + chunk(b"IEND", b"")
    image = ImageBlock(data=base64.b64encode(png).decode())
    for model in ("fake-gemini", "rapidocr"):
        with pytest.raises(InvalidInput, match=r"30000x30000 pixels .* at most 64 megapixels"):
            await engine.ground(GroundRequest(prompt="car", image=image, model=model))


async def test_a_bmp_of_negative_width_or_a_gif_of_no_pixels_is_refused(engine: InferenceEngine) -> None:
    """A BMP whose header says -640 px wide passed the size bound (negative) and PIL decoded it
    as 4,294,966,656 px: a 500, and a traceback from `car ground`. A 0x0 GIF had boxes found
    outside its size."""
    import struct

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 24), "white").save(buffer, format="BMP")
    bmp = bytearray(buffer.getvalue())
    bmp[18:22] = struct.pack("<i", -640)
    empty = b"GIF89a" + struct.pack("<HH", 0, 0) + b"\x00\x00\x00;"  # a screen of 0x0 and no frame
    for data, says in ((bmp, r"4294966656x24 pixels"), (empty, r"0x0 pixels: it holds no picture")):
        image = ImageBlock(data=base64.b64encode(bytes(data)).decode())
        for model in ("fake-gemini", "rapidocr"):
            with pytest.raises(InvalidInput, match=says):
                await engine.ground(GroundRequest(prompt="exit", image=image, model=model))
