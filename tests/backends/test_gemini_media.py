"""Gemini native image generation (Nano Banana), the real ``google-genai`` SDK against the fake."""

from __future__ import annotations

import base64
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest

from car_inference.backends.gemini import GeminiBackend
from car_inference.catalog import load_builtin
from car_inference.engine import InferenceEngine
from car_inference.errors import InvalidInput, ProviderError, SpendLimitExceeded, UnsupportedMode
from car_inference.requests import GenerateImageRequest, GenerateVideoRequest
from car_inference.schema import ModelSchema
from fakes import FakeProviderServer, Fault
from fakes.http_answer import answering
from fakes.provider_media import FAKE_MP4, png
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


async def test_variants_take_seed_plus_i_and_one_that_fails_keeps_the_others(
    fake: FakeProviderServer, tmp_path: Path
) -> None:
    """Every call had the same seed (n paid copies of one picture; local models make variant i
    with seed + i), and one failed variant threw away the images made and paid for."""
    result = await make(tmp_path).generate_image(
        nano(fake),
        GenerateImageRequest(prompt="x", seed=7, variant_count=3, output_path=str(tmp_path / "s.png")),
    )
    assert sorted(r.json["generationConfig"]["seed"] for r in fake.requests) == [7, 8, 9]
    assert len(result.image_paths) == 3
    fake.requests.clear()
    fake.queue(Fault.bad_request("blocked variant"))
    kept = await make(tmp_path).generate_image(
        nano(fake), GenerateImageRequest(prompt="x", variant_count=3, output_path=str(tmp_path / "k.png"))
    )
    assert len(fake.requests) == 3 and len(kept.image_paths) == 2
    assert all(Path(p).read_bytes().startswith(b"\x89PNG") for p in kept.image_paths)
    fake.queue(*[Fault.server_error(503)] * 2)
    with pytest.raises(ProviderError) as none:
        await make(tmp_path).generate_image(nano(fake), GenerateImageRequest(prompt="x", variant_count=2))
    assert none.value.status == 503


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


# --- video: Gemini Omni Flash through the Interactions API ---------------------------------------

OMNI = "google/gemini-omni-flash"


def omni(fake: FakeProviderServer) -> ModelSchema:
    schema = CATALOG[OMNI]
    return schema.model_copy(
        update={"source": schema.source.model_copy(update={"base_url": fake.gemini_base_url})}
    )


async def test_video_runs_the_interaction_and_writes_the_mp4(
    fake: FakeProviderServer, tmp_path: Path
) -> None:
    """create (background) -> get until completed -> the model_output step's video, on one key."""
    fake.media.video_polls = 3
    seen: list[tuple[int, int]] = []
    start = tmp_path / "start.png"
    start.write_bytes(png(8, 8))
    request = GenerateVideoRequest(
        prompt="a dog on the moon", seed=9, image_path=str(start), output_path=str(tmp_path / "dog.mp4")
    )
    result = await make(tmp_path).generate_video(
        omni(fake), request, progress=lambda d, t: seen.append((d, t))
    )
    assert Path(result.video_path).read_bytes() == FAKE_MP4 and result.video_path == str(tmp_path / "dog.mp4")
    assert (result.model_used, result.media_type, result.seed) == (OMNI, "video/mp4", 9)
    create, *polls = fake.requests
    assert create.method == "POST" and create.path.endswith("/interactions") and create.api_key == KEY
    body = create.json
    assert body["model"] == "gemini-omni-1.1-flash" and body["background"] is True
    assert body["response_modalities"] == ["video"]
    assert body["generation_config"] == {"seed": 9, "video_config": {"task": "image_to_video"}}
    (turn,) = body["input"]
    text, image = turn["content"]
    assert text == {"type": "text", "text": "a dog on the moon"}
    assert image["type"] == "image" and base64.b64decode(image["data"]) == png(8, 8)
    assert [p.method for p in polls] == ["GET"] * 3 and {p.api_key for p in polls} == {KEY}
    assert seen == [(0, 1), (1, 1)]


async def test_a_video_the_answer_links_to_is_downloaded(fake: FakeProviderServer, tmp_path: Path) -> None:
    fake.media.video_as_uri = True
    result = await make(tmp_path).generate_video(omni(fake), GenerateVideoRequest(prompt="waves"))
    assert Path(result.video_path).read_bytes() == FAKE_MP4
    assert fake.requests[-1].path.startswith("/files/") and fake.requests[-1].api_key == KEY


async def test_what_gemini_video_cannot_do_is_refused_before_any_call(
    fake: FakeProviderServer, tmp_path: Path
) -> None:
    backend = make(tmp_path)
    for extra, field in (
        ({"duration_s": 6}, "duration_s"),
        ({"width": 1280, "height": 720}, "width"),
        ({"fps": 30}, "fps"),
        ({"negative_prompt": "blur"}, "negative_prompt"),
        ({"format": "gif"}, "video/gif"),
    ):
        with pytest.raises(UnsupportedMode, match=field):
            await backend.generate_video(omni(fake), GenerateVideoRequest(prompt="x", **extra))
    assert fake.requests == []


async def test_a_failed_interaction_and_provider_errors(fake: FakeProviderServer, tmp_path: Path) -> None:
    fake.media.video_failure = "the prompt was blocked by safety filters"
    with pytest.raises(ProviderError, match="ended failed: the prompt was blocked by safety filters"):
        await make(tmp_path).generate_video(omni(fake), GenerateVideoRequest(prompt="x"))
    fake.media.video_failure = None
    fake.queue(Fault.rate_limit(retry_after=30))
    with pytest.raises(ProviderError) as info:
        await make(tmp_path).generate_video(omni(fake), GenerateVideoRequest(prompt="x"))
    assert info.value.status == 429 and info.value.retryable  # translated, not the SDK's own error


async def test_an_unreachable_interactions_api_is_a_provider_error(tmp_path: Path) -> None:
    """The Interactions client's own connection error escaped untranslated: `car video` printed
    a 100-line traceback, `car serve` failed the job as an internal error, no fallback ran."""
    schema = CATALOG[OMNI]
    closed = schema.model_copy(
        update={"source": schema.source.model_copy(update={"base_url": "http://127.0.0.1:9"})}
    )
    with pytest.raises(ProviderError, match="connection failed: APIConnectionError") as info:
        await make(tmp_path).generate_video(closed, GenerateVideoRequest(prompt="x"))
    assert info.value.retryable and info.value.status is None and info.value.model == OMNI


async def test_the_engine_charges_gemini_video_per_second(
    fake: FakeProviderServer, isolated_home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Hosted video counts against [spend]: the catalog's per-second price times the estimate is
    checked first (a job that could cross the limit never starts), what came out is recorded.
    Omni Flash picks the length (3-10 s): it is checked at its longest, 10 s (it was checked at
    the default 4 s and charged 10, twice a $0.50 daily limit in one call)."""
    (isolated_home / "models.toml").write_text(f'[hosts.gemini]\nbase_url = "{fake.gemini_base_url}"\n')
    (isolated_home / "config.toml").write_text("[spend]\ndaily_usd = 0.5\n")
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    engine = InferenceEngine(home=isolated_home)
    try:
        with pytest.raises(SpendLimitExceeded, match=r"would add about \$1\.00"):
            await engine.generate_video(GenerateVideoRequest(prompt="a dog", model="omni-flash"))
        assert fake.requests == [], "refused before the call"
    finally:
        engine.close()
    (isolated_home / "config.toml").write_text("[spend]\ndaily_usd = 1.5\n")
    engine = InferenceEngine(home=isolated_home)
    try:
        done = await engine.generate_video(GenerateVideoRequest(prompt="a dog", model="omni-flash"))
        assert done.duration_s is None  # the fake's mp4 has no length: its longest is charged
        assert engine.spend.status().by_provider_today == {"google": pytest.approx(1.0)}
        before = len(fake.requests)
        with pytest.raises(SpendLimitExceeded):
            await engine.generate_video(GenerateVideoRequest(prompt="another", model="omni-flash"))
        assert len(fake.requests) == before  # refused before the call
    finally:
        engine.close()


async def test_a_linked_video_keeps_the_key_to_its_own_origin(tmp_path: Path) -> None:
    """The key went to whatever host the video's link redirected to (httpx drops only
    Authorization on a cross-origin redirect, not x-goog-api-key)."""
    with answering(lambda path: (200, {"content-type": "video/mp4"}, FAKE_MP4)) as other:
        elsewhere = f"{other.url}/video.mp4"  # another port: another origin

        def home_answer(path: str) -> tuple[int, dict[str, str], bytes]:
            return 302, {"location": "/moved" if path == "/files/v" else elsewhere}, b""

        with answering(home_answer) as home:
            schema = CATALOG[OMNI]
            at_home = schema.model_copy(
                update={"source": schema.source.model_copy(update={"base_url": home.url})}
            )
            backend = make(tmp_path)
            client = SimpleNamespace(_api_client=SimpleNamespace(api_key=KEY))
            data = await backend._download(schema, client, backend.endpoint(at_home), f"{home.url}/files/v")
    assert data == FAKE_MP4
    assert [(path, headers.get("x-goog-api-key")) for path, headers in home.seen] == [
        ("/files/v", KEY), ("/moved", KEY),
    ]  # fmt: skip
    assert [headers.get("x-goog-api-key") for _, headers in other.seen] == [None], "another origin"
