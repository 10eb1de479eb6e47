"""Hosted images and video on the OpenAI wire format: the real ``openai`` SDK against the loopback
fake (``fakes/provider_media.py``), through the OpenAI-compatible backend."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest

from car_inference.backends.openai_compat import OpenAICompatBackend
from car_inference.catalog import load_builtin
from car_inference.config import CarConfig, SpendSettings
from car_inference.engine import InferenceEngine
from car_inference.errors import InvalidInput, ProviderError, SpendLimitExceeded, UnsupportedMode
from car_inference.requests import GenerateImageRequest, GenerateVideoRequest, VideoMode
from car_inference.schema import ModelCapability, ModelSchema, OpenAISource
from fakes import FakeProviderServer, Fault
from fakes.provider_media import FAKE_MP4, png
from fakes.remote_kit import remote_backend

CATALOG = {m.id: m for m in load_builtin().models}
KEY = "sk-openai-media-key-0001"
OTHER = "sk-openai-media-key-0002"


def make(tmp_path: Path, keys: str = KEY) -> OpenAICompatBackend:
    return remote_backend(OpenAICompatBackend, tmp_path, {"OPENAI_API_KEYS": keys})


def image_model(fake: FakeProviderServer, model_id: str = "openai/gpt-image-2") -> ModelSchema:
    schema = CATALOG[model_id]
    return schema.model_copy(
        update={"source": schema.source.model_copy(update={"base_url": fake.openai_base_url})}
    )


def hosted(fake: FakeProviderServer, wire_name: str, capability: ModelCapability) -> ModelSchema:
    source = OpenAISource(base_url=fake.openai_base_url, api_key_env="OPENAI_API_KEY", model_name=wire_name)
    return ModelSchema(
        id=f"host/{wire_name}", name=wire_name, provider="host", capabilities=[capability], source=source
    )


def png_size(path: str) -> tuple[int, int]:
    data = Path(path).read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return struct.unpack(">II", data[16:24])


def calls(fake: FakeProviderServer) -> list[tuple[str, str, str | None]]:
    return [(r.method, r.path, r.api_key) for r in fake.requests]


# --- images --------------------------------------------------------------------------------------


async def test_generate_writes_the_images_the_api_returns(fake: FakeProviderServer, tmp_path: Path) -> None:
    be = make(tmp_path)
    request = GenerateImageRequest(
        prompt="a red apple", width=1536, height=1024, variant_count=2, output_path=str(tmp_path / "a.png")
    )
    result = await be.generate_image(image_model(fake), request)
    sent = fake.requests[-1]
    assert (sent.path, sent.api_key) == ("/v1/images/generations", KEY)
    assert sent.json == {"model": "gpt-image-2", "prompt": "a red apple", "n": 2, "size": "1536x1024"}
    assert result.image_paths == [str(tmp_path / "a.png"), str(tmp_path / "a-2.png")]
    assert [png_size(p) for p in result.image_paths] == [(1536, 1024), (1536, 1024)]
    assert Path(result.image_path).read_bytes() == png(1536, 1024, seed="a red apple#0")
    assert (result.model_used, result.media_type, result.width, result.height) == (
        "openai/gpt-image-2",
        "image/png",
        1536,
        1024,
    )


async def test_size_and_format_go_out_only_when_asked(fake: FakeProviderServer, tmp_path: Path) -> None:
    be = make(tmp_path)
    result = await be.generate_image(image_model(fake), GenerateImageRequest(prompt="sky", format="webp"))
    assert fake.requests[-1].json == {"model": "gpt-image-2", "prompt": "sky", "output_format": "webp"}
    assert result.media_type == "image/webp" and Path(result.image_path).suffix == ".webp"
    Path(result.image_path).unlink()


async def test_edit_uploads_the_images_and_the_mask(fake: FakeProviderServer, tmp_path: Path) -> None:
    be = make(tmp_path)
    first, second, mask = tmp_path / "one.png", tmp_path / "two.png", tmp_path / "mask.png"
    first.write_bytes(png(8, 8, "one"))
    second.write_bytes(png(8, 8, "two"))
    mask.write_bytes(png(8, 8, "mask"))
    one = await be.generate_image(
        image_model(fake),
        GenerateImageRequest(
            prompt="make it blue",
            image_paths=[str(first)],
            mask_path=str(mask),
            output_path=str(tmp_path / "o.png"),
        ),
    )
    form = fake.media.forms[-1]
    assert fake.requests[-1].path == "/v1/images/edits"
    assert form["image"] == ("one.png", png(8, 8, "one"), "image/png")
    assert form["mask"] == ("mask.png", png(8, 8, "mask"), "image/png")
    assert (form["prompt"], form["model"]) == ("make it blue", "gpt-image-2")
    assert png_size(one.image_path) == (1024, 1024)
    await be.generate_image(
        image_model(fake),
        GenerateImageRequest(
            prompt="both", image_paths=[str(first), str(second)], output_path=str(tmp_path / "b.png")
        ),
    )
    assert [name for name, _, _ in fake.media.forms[-1]["image"]] == ["one.png", "two.png"]


async def test_an_image_behind_a_url_is_fetched(fake: FakeProviderServer, tmp_path: Path) -> None:
    be = make(tmp_path)
    result = await be.generate_image(
        hosted(fake, "dall-e-3", ModelCapability.IMAGE_GENERATION),
        GenerateImageRequest(prompt="a cat", width=512, height=512, output_path=str(tmp_path / "c.png")),
    )
    fetch = fake.requests[-1]
    assert fetch.method == "GET" and fetch.path.startswith("/files/") and fetch.api_key is None
    assert png_size(result.image_path) == (512, 512)
    # The answer has no `size`: the image's header says it (the CLI printed "NonexNone").
    assert (result.width, result.height) == (512, 512)


@pytest.mark.parametrize(
    ("field", "value"), [("seed", 1), ("steps", 4), ("guidance", 2.0), ("negative_prompt", "blue")]
)
async def test_what_the_images_api_cannot_take_is_refused_before_any_call(
    fake: FakeProviderServer, tmp_path: Path, field: str, value: Any
) -> None:
    with pytest.raises(UnsupportedMode, match=field.replace("_", " ")):
        await make(tmp_path).generate_image(
            image_model(fake), GenerateImageRequest(prompt="x", **{field: value})
        )
    assert fake.requests == []


async def test_bad_input_and_provider_errors(fake: FakeProviderServer, tmp_path: Path) -> None:
    be = make(tmp_path, f"{KEY},{OTHER}")
    with pytest.raises(InvalidInput, match="cannot read"):
        await be.generate_image(
            image_model(fake), GenerateImageRequest(prompt="x", image_paths=[str(tmp_path / "no.png")])
        )
    with pytest.raises(InvalidInput, match="mask needs an image"):
        await be.generate_image(image_model(fake), GenerateImageRequest(prompt="x", mask_path=str(tmp_path)))
    fake.queue(Fault.bad_request("Your request was rejected by the safety system."))
    with pytest.raises(ProviderError, match="safety system") as refused:
        await be.generate_image(image_model(fake), GenerateImageRequest(prompt="x"))
    assert refused.value.status == 400 and not refused.value.retryable
    # A rate-limited key hands the request to the next one.
    fake.reset()
    fake.queue(Fault.rate_limit(retry_after=5))
    result = await be.generate_image(
        image_model(fake), GenerateImageRequest(prompt="x", output_path=str(tmp_path / "r.png"))
    )
    first, second = (r.api_key for r in fake.requests)
    assert {first, second} == {KEY, OTHER} and Path(result.image_path).is_file()


# --- video ---------------------------------------------------------------------------------------


async def test_video_job_is_created_polled_and_downloaded_with_one_key(
    fake: FakeProviderServer, tmp_path: Path
) -> None:
    be = make(tmp_path, f"{KEY},{OTHER}")
    fake.queue(Fault.rate_limit(retry_after=5))  # the first key is rate limited at creation
    seen: list[tuple[int, int]] = []
    result = await be.generate_video(
        hosted(fake, "sora-2", ModelCapability.VIDEO_GENERATION),
        GenerateVideoRequest(prompt="a dog on the moon", duration_s=8, output_path=str(tmp_path / "v.mp4")),
        progress=lambda done, total: seen.append((done, total)),
    )
    job = next(iter(fake.media.jobs))
    assert calls(fake) == [
        ("POST", "/v1/videos", KEY),
        ("POST", "/v1/videos", OTHER),
        ("GET", f"/v1/videos/{job}", OTHER),
        ("GET", f"/v1/videos/{job}", OTHER),
        ("GET", f"/v1/videos/{job}/content", OTHER),
    ]
    assert fake.media.forms[-1] == {"prompt": "a dog on the moon", "model": "sora-2", "seconds": "8"}
    assert seen == [(0, 100), (50, 100), (100, 100)]
    assert Path(result.video_path).read_bytes() == FAKE_MP4
    assert (result.media_type, result.duration_s, result.width, result.height) == (
        "video/mp4",
        8.0,
        720,
        1280,
    )


async def test_video_from_an_image_uploads_it_as_the_reference(
    fake: FakeProviderServer, tmp_path: Path
) -> None:
    picture = tmp_path / "first.png"
    picture.write_bytes(png(16, 16, "frame"))
    await make(tmp_path).generate_video(
        hosted(fake, "sora-2", ModelCapability.VIDEO_GENERATION),
        GenerateVideoRequest(
            prompt="it moves",
            mode=VideoMode.IMAGE_TO_VIDEO,
            image_path=str(picture),
            width=1280,
            height=720,
            output_path=str(tmp_path / "v.mp4"),
        ),
    )
    form = fake.media.forms[0]
    assert form["input_reference"] == ("first.png", png(16, 16, "frame"), "image/png")
    assert (form["size"], form["seconds"]) == ("1280x720", "4")


async def test_video_failures(fake: FakeProviderServer, tmp_path: Path) -> None:
    be = make(tmp_path)
    model = hosted(fake, "sora-2", ModelCapability.VIDEO_GENERATION)
    fake.media.video_failure = "The prompt was blocked by moderation."
    with pytest.raises(ProviderError, match="failed: The prompt was blocked by moderation"):
        await be.generate_video(model, GenerateVideoRequest(prompt="x", output_path=str(tmp_path / "a.mp4")))
    assert not (tmp_path / "a.mp4").exists()
    with pytest.raises(ProviderError, match="Invalid value for seconds") as bad:
        await be.generate_video(model, GenerateVideoRequest(prompt="x", duration_s=5))
    assert bad.value.status == 400
    for request, what in [
        (GenerateVideoRequest(prompt="x", fps=30), "fps"),
        (GenerateVideoRequest(prompt="x", seed=3), "seed"),
        (GenerateVideoRequest(prompt="x", format="gif"), "gif"),
        (GenerateVideoRequest(prompt="x", mode=VideoMode.AUDIO_TO_VIDEO, audio_path="a.wav"), "audio"),
        (GenerateVideoRequest(prompt="x", duration_s=0.4), "whole seconds, not 0.4"),  # went out as "0"
        (GenerateVideoRequest(prompt="x", duration_s=4.5), "whole seconds, not 4.5"),
    ]:
        with pytest.raises(UnsupportedMode, match=what):
            await be.generate_video(model, request)


# --- through the engine ---------------------------------------------------------------------------


async def test_hosted_images_count_against_spend_limits(
    fake: FakeProviderServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    engine = InferenceEngine(CarConfig(home=tmp_path / "home", spend=SpendSettings(daily_usd=0.10)))
    engine.register_model(image_model(fake))
    request = GenerateImageRequest(prompt="a cat", model="gpt-image-2", output_path=str(tmp_path / "a.png"))
    result = await engine.generate_image(request)
    assert Path(result.image_path).is_file()
    assert engine.spend.status().by_provider_today == {"openai": pytest.approx(0.053)}
    with pytest.raises(SpendLimitExceeded):
        await engine.generate_image(request)
    assert len(fake.requests) == 1  # refused before the call
    engine.close()
