"""Gemini native image generation (Nano Banana), the real ``google-genai`` SDK against the fake."""

from __future__ import annotations

import base64
import struct
from pathlib import Path

import pytest

from car_inference.backends.gemini import GeminiBackend
from car_inference.catalog import load_builtin
from car_inference.errors import InvalidInput, ProviderError, UnsupportedMode
from car_inference.requests import GenerateImageRequest
from car_inference.schema import ModelSchema
from fakes import FakeProviderServer, Fault
from fakes.provider_media import png
from fakes.remote_kit import remote_backend

CATALOG = {m.id: m for m in load_builtin().models}
KEY = "gemini-media-key-000001"
NANO = "google/gemini-3.1-flash-image"


def make(tmp_path: Path) -> GeminiBackend:
    return remote_backend(GeminiBackend, tmp_path, {"GEMINI_API_KEY": KEY})


def nano(fake: FakeProviderServer) -> ModelSchema:
    schema = CATALOG[NANO]
    return schema.model_copy(
        update={"source": schema.source.model_copy(update={"base_url": fake.gemini_base_url})}
    )


def size_of(path: str) -> tuple[int, int]:
    data = Path(path).read_bytes()
    assert data.startswith(b"\x89PNG")
    return struct.unpack(">II", data[16:24])


async def test_generate_asks_for_an_image_and_writes_it(fake: FakeProviderServer, tmp_path: Path) -> None:
    result = await make(tmp_path).generate_image(
        nano(fake),
        GenerateImageRequest(
            prompt="a banana", width=1600, height=900, seed=5, output_path=str(tmp_path / "b.png")
        ),
    )
    sent = fake.requests[-1]
    assert (
        sent.path.endswith("/models/gemini-3.1-flash-image-preview:generateContent") and sent.api_key == KEY
    )
    assert sent.json["contents"] == [{"role": "user", "parts": [{"text": "a banana"}]}]
    config = sent.json["generationConfig"]
    assert config["responseModalities"] == ["IMAGE"] and config["seed"] == 5
    assert config["imageConfig"] == {"aspectRatio": "16:9", "imageSize": "2K"}
    assert size_of(result.image_path) == (2048, 1152) and (result.width, result.height) == (2048, 1152)
    assert (result.model_used, result.media_type, result.seed) == (NANO, "image/png", 5)


async def test_edits_send_the_images_inline_and_variants_make_several_calls(
    fake: FakeProviderServer, tmp_path: Path
) -> None:
    source = tmp_path / "in.png"
    source.write_bytes(png(4, 4, "in"))
    result = await make(tmp_path).generate_image(
        nano(fake),
        GenerateImageRequest(
            prompt="make it blue",
            image_paths=[str(source)],
            variant_count=2,
            output_path=str(tmp_path / "e.png"),
        ),
    )
    assert len(fake.requests) == 2 and "imageConfig" not in fake.requests[-1].json["generationConfig"]
    inline = fake.requests[-1].json["contents"][0]["parts"][1]["inlineData"]
    assert inline["data"] == base64.b64encode(png(4, 4, "in")).decode()
    assert "image/png" in (inline.get("mimeType"), inline.get("mime_type"))  # the SDK's spelling varies
    assert result.image_paths == [str(tmp_path / "e.png"), str(tmp_path / "e-2.png")]
    assert [size_of(p) for p in result.image_paths] == [(1024, 1024), (1024, 1024)]


async def test_what_gemini_cannot_do_is_refused_before_any_call(
    fake: FakeProviderServer, tmp_path: Path
) -> None:
    be = make(tmp_path)
    for request, what in [
        (GenerateImageRequest(prompt="x", width=1000, height=700), "aspect ratios 1:1, 2:3"),
        (GenerateImageRequest(prompt="x", width=8192, height=8192), "up to 4096"),
        (GenerateImageRequest(prompt="x", steps=4), "steps"),
        (GenerateImageRequest(prompt="x", negative_prompt="dog"), "negative prompt"),
        (GenerateImageRequest(prompt="x", format="jpeg"), "png"),
        (GenerateImageRequest(prompt="x", image_paths=["a.png"], mask_path="m.png"), "mask"),
    ]:
        with pytest.raises(UnsupportedMode, match=what):
            await be.generate_image(nano(fake), request)
    with pytest.raises(InvalidInput, match="cannot read"):
        await be.generate_image(
            nano(fake), GenerateImageRequest(prompt="x", image_paths=[str(tmp_path / "no.png")])
        )
    assert fake.requests == []


async def test_blocked_prompts_and_provider_errors(fake: FakeProviderServer, tmp_path: Path) -> None:
    be = make(tmp_path)
    fake.media.gemini_block = "SAFETY"
    with pytest.raises(ProviderError, match=r"no image: blocked \(SAFETY\)"):
        await be.generate_image(nano(fake), GenerateImageRequest(prompt="x"))
    fake.media.gemini_block = None
    fake.queue(Fault.server_error(503))
    with pytest.raises(ProviderError) as unavailable:
        await be.generate_image(nano(fake), GenerateImageRequest(prompt="x"))
    assert unavailable.value.status == 503 and unavailable.value.retryable
