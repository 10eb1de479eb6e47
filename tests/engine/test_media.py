"""Image and video calls are priced and recorded like text calls (engine/media.py): a tiny local
diffusers pipeline for successes, Gemini video on the fake provider for a hosted failure."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from car_inference.engine import InferenceEngine
from car_inference.errors import CircuitOpen, InvalidInput, ProviderError, SpendLimitExceeded, UnsupportedMode
from car_inference.requests import GenerateImageRequest, GenerateVideoRequest
from car_inference.routing import InferenceTask, ModelProfile
from car_inference.schema import ModelCapability
from fakes import FakeProviderServer
from fakes.optional import some
from fakes.tiny_diffusers import build_sd, media_model

SD, OMNI = "test/tiny-sd", "google/gemini-omni-flash"
GEMINI_IMAGE = "google/gemini-3.1-flash-image"


@pytest.fixture
def engine(
    fake: FakeProviderServer, isolated_home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[InferenceEngine]:
    (isolated_home / "models.toml").write_text(f'[hosts.gemini]\nbase_url = "{fake.gemini_base_url}"\n')
    (isolated_home / "config.toml").write_text("[spend]\ndaily_usd = 1.0\n")
    monkeypatch.setenv("GEMINI_API_KEY", "gemini-media-outcomes")
    engine = InferenceEngine(home=isolated_home)
    engine.register_model(media_model(SD, build_sd(tmp_path / "sd"), "image_generation"))
    yield engine
    engine.close()


def profile(engine: InferenceEngine, model_id: str) -> ModelProfile | None:
    return next((p for p in engine.export_profiles() if p.model_id == model_id), None)


async def test_a_local_image_is_an_outcome_and_costs_nothing(engine: InferenceEngine, tmp_path: Path) -> None:
    request = GenerateImageRequest(prompt="a red apple", model=SD, width=64, height=64, steps=1, seed=1)
    await engine.generate_image(request.model_copy(update={"output_path": str(tmp_path / "a.png")}))
    sd = profile(engine, SD)
    assert sd is not None and (sd.total_calls, sd.success_count, sd.fail_count) == (1, 1, 0)
    assert sd.task_stats["image"].calls == 1 and sd.total_latency_ms > 0
    assert engine.spend.status().by_provider_today == {}


async def test_a_hosted_video_failure_is_counted_and_a_refusal_is_not(
    engine: InferenceEngine, fake: FakeProviderServer
) -> None:
    fake.media.video_failure = "blocked"
    with pytest.raises(ProviderError, match="blocked"):
        await engine.generate_video(GenerateVideoRequest(prompt="x", model=OMNI))
    with pytest.raises(UnsupportedMode):  # the request's fault: not the model's
        await engine.generate_video(GenerateVideoRequest(prompt="x", model=OMNI, duration_s=6))
    omni = profile(engine, OMNI)
    assert omni is not None and (omni.total_calls, omni.success_count, omni.fail_count) == (1, 0, 1)
    assert engine.spend.status().by_provider_today == {}  # a failed call is not charged
    fake.media.video_failure = None
    await engine.generate_video(GenerateVideoRequest(prompt="x", model=OMNI))
    # The fake's mp4 says no length: the longest Omni Flash makes, 10 s at $0.10.
    assert engine.spend.status().by_provider_today == {"google": pytest.approx(1.0)}
    engine.spend.record("google", OMNI, 0.5)
    with pytest.raises(SpendLimitExceeded):
        await engine.generate_video(GenerateVideoRequest(prompt="x", model=OMNI))
    assert some(profile(engine, OMNI)).total_calls == 2  # refused before the call


async def test_an_image_request_naming_no_model_is_routed_by_what_calls_showed(
    engine: InferenceEngine, tmp_path: Path
) -> None:
    """Two local image models, one whose calls failed, and Gemini's hosted one, which takes no
    ``steps``: the router picks the other local model (Gemini, when it leads, refuses ``steps``
    and the request goes on to the next model), and records the call for the next choice."""
    other = "test/tiny-sd-2"
    engine.register_model(media_model(other, build_sd(tmp_path / "sd2"), "image_generation"))
    for i in range(30):
        engine.tracker.record_attempt(
            SD, InferenceTask.GENERATE_IMAGE, "image", "media", trace_id=f"bad-{i}", started_at=0.0,
            success=False, latency_ms=500.0,
        )  # fmt: skip
    for i in range(30):  # Gemini's calls went well: it leads, and must pass a `steps` request on
        engine.tracker.record_attempt(
            GEMINI_IMAGE, InferenceTask.GENERATE_IMAGE, "image", "media", trace_id=f"good-{i}",
            started_at=0.0, success=True, latency_ms=500.0,
        )  # fmt: skip
    # No exploration draw: the ranking is the beliefs' (Gemini leads by what its calls showed).
    engine.config.routing = engine.config.routing.model_copy(update={"exploration": 0.0})
    ranked = engine._media_models(None, ModelCapability.IMAGE_GENERATION)
    assert ranked[0].id == GEMINI_IMAGE and ranked[1].id == other
    for n in range(3):
        request = GenerateImageRequest(prompt="a red apple", width=64, height=64, steps=1, seed=n)
        await engine.generate_image(request.model_copy(update={"output_path": str(tmp_path / f"{n}.png")}))
    engine.bookkeeper.flush()
    chosen = profile(engine, other)
    assert chosen is not None and chosen.success_count == 3
    assert some(profile(engine, SD)).total_calls == 30  # never chosen again
    assert some(profile(engine, GEMINI_IMAGE)).total_calls == 30  # refusals uncounted


async def test_failing_media_calls_open_the_models_circuit(
    engine: InferenceEngine, fake: FakeProviderServer
) -> None:
    """Ten 500s in a row from an image model left its circuit closed: every request paid the
    wait for another failure, and "a model whose circuit is open is skipped" never held."""
    fake.media.video_failure = "the service is overloaded"
    for _ in range(3):  # [breaker] failure_threshold
        with pytest.raises(ProviderError):
            await engine.generate_video(GenerateVideoRequest(prompt="x", model=OMNI))
    before = len(fake.requests)
    with pytest.raises(CircuitOpen):
        await engine.generate_video(GenerateVideoRequest(prompt="x", model=OMNI))
    assert len(fake.requests) == before, "not called while its circuit is open"


async def test_a_routed_image_the_spend_limit_keeps_from_a_hosted_model_runs_locally(
    engine: InferenceEngine, tmp_path: Path
) -> None:
    """With the day's budget spent, a request naming no model got a 402 from the hosted model
    the router ranked first, though the free local pipeline could serve it."""
    for i in range(30):  # Gemini's calls went well: the router ranks it first
        engine.tracker.record_attempt(
            GEMINI_IMAGE, InferenceTask.GENERATE_IMAGE, "image", "media", trace_id=f"good-{i}",
            started_at=0.0, success=True, latency_ms=500.0,
        )  # fmt: skip
    engine.config.routing = engine.config.routing.model_copy(update={"exploration": 0.0})
    assert engine._media_models(None, ModelCapability.IMAGE_GENERATION)[0].id == GEMINI_IMAGE
    engine.spend.record("google", GEMINI_IMAGE, 1.0)  # the daily limit, spent
    request = GenerateImageRequest(prompt="a red apple", width=64, height=64, seed=1)
    made = await engine.generate_image(request.model_copy(update={"output_path": str(tmp_path / "a.png")}))
    assert made.model_used == SD
    with pytest.raises(SpendLimitExceeded):  # named, it is the answer
        await engine.generate_image(request.model_copy(update={"model": GEMINI_IMAGE}))


async def test_a_hosted_video_the_caller_stops_waiting_for_is_charged(
    engine: InferenceEngine, fake: FakeProviderServer
) -> None:
    """The provider bills a job it accepted: a cancelled one (a client that left, `DELETE
    /v1/videos/{id}`, Ctrl-C) was charged nothing, so spend limits never saw it."""
    fake.media.video_polls = 10_000
    job = asyncio.ensure_future(engine.generate_video(GenerateVideoRequest(prompt="x", model=OMNI)))
    for _ in range(100):
        await asyncio.sleep(0.05)
        if fake.requests:
            break
    assert fake.requests, "the job was sent"
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert engine.spend.status().by_provider_today == {"google": pytest.approx(1.0)}  # its estimate


async def test_an_output_names_suffix_is_its_format_and_never_another(
    engine: InferenceEngine, tmp_path: Path
) -> None:
    """JPEG bytes were written into x.png (`-o x.png -f jpeg`); as for speech, a suffix naming
    another format than the one asked for is refused, and without one asked for it decides."""
    request = GenerateImageRequest(prompt="a red apple", model=SD, width=64, height=64, steps=1, seed=1)
    with pytest.raises(InvalidInput, match=r"names a \.png file but format is 'jpeg'"):
        await engine.generate_image(
            request.model_copy(update={"output_path": str(tmp_path / "x.png"), "format": "jpeg"})
        )
    made = await engine.generate_image(request.model_copy(update={"output_path": str(tmp_path / "x.jpg")}))
    assert made.media_type == "image/jpeg" and (tmp_path / "x.jpg").read_bytes()[:2] == b"\xff\xd8"


def test_a_video_model_refuses_at_once_what_it_would_refuse_of_the_request(
    engine: InferenceEngine, fake: FakeProviderServer
) -> None:
    """A server starts a video job only after ``media_model``: `steps` named for Gemini Omni (no
    such field there), or an estimate past the spend limit, was accepted as a job that then failed
    (a 200 and a poll, not a 400/402 the client could act on)."""
    video = ModelCapability.VIDEO_GENERATION
    with pytest.raises(UnsupportedMode, match="steps"):
        engine.media_model(OMNI, video, GenerateVideoRequest(prompt="waves", model=OMNI, steps=4))
    with pytest.raises(UnsupportedMode, match="picks the length"):
        engine.media_model(OMNI, video, GenerateVideoRequest(prompt="waves", model=OMNI, duration_s=4))
    asked = GenerateVideoRequest(prompt="waves", model=OMNI)
    assert engine.media_model(OMNI, video, asked).id == OMNI  # 10 s at $0.10: the $1 a day fits
    engine.spend.record("google", OMNI, 0.5)
    with pytest.raises(SpendLimitExceeded):
        engine.media_model(OMNI, video, asked)
    assert engine.media_model(OMNI, video).id == OMNI  # without the request, only the model is judged
    assert engine.spend.status().by_provider_today == {"google": pytest.approx(0.5)}  # nothing held
    assert not fake.requests  # nothing was sent
