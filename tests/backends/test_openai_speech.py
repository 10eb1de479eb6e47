"""Hosted speech on the OpenAI wire format: the real ``openai`` SDK against the loopback fake
(``fakes/provider_speech.py``), through the OpenAI-compatible backend and the engine."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from car_inference.backends.openai_compat import OpenAICompatBackend
from car_inference.catalog import load_builtin
from car_inference.config import CarConfig
from car_inference.engine import InferenceEngine
from car_inference.errors import InvalidInput, ProviderError
from car_inference.requests import SynthesizeRequest, TranscribeRequest
from car_inference.schema import ModelSchema
from fakes import FakeProviderServer, Fault
from fakes.optional import some
from fakes.provider_speech import spoken_text, wav
from fakes.remote_kit import remote_backend

CATALOG = {m.id: m for m in load_builtin().models}
KEY = "sk-openai-speech-key-0001"
OTHER = "sk-openai-speech-key-0002"
STT, TTS = "openai/gpt-transcribe", "openai/gpt-4o-mini-tts"


def make(tmp_path: Path, keys: str = KEY) -> OpenAICompatBackend:
    return remote_backend(OpenAICompatBackend, tmp_path, {"OPENAI_API_KEYS": keys})


def on_fake(fake: FakeProviderServer, model_id: str) -> ModelSchema:
    schema = CATALOG[model_id]
    return schema.model_copy(
        update={"source": schema.source.model_copy(update={"base_url": fake.openai_base_url})}
    )


def wav_header(path: str) -> tuple[int, int, int]:
    """(channels, sample rate, bits per sample) of a PCM WAV file."""
    data = Path(path).read_bytes()
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    channels, rate = struct.unpack("<HI", data[22:28])
    (bits,) = struct.unpack("<H", data[34:36])
    return channels, rate, bits


# --- synthesize ----------------------------------------------------------------------------------


async def test_synthesize_streams_the_audio_to_the_file(fake: FakeProviderServer, tmp_path: Path) -> None:
    fake.speech.chunk_bytes = 1000  # many chunks: the file is the concatenation of all of them
    target = tmp_path / "hi.wav"
    request = SynthesizeRequest(text="hello there world", output_path=str(target), voice="coral")
    result = await make(tmp_path).synthesize(on_fake(fake, TTS), request)
    sent = fake.requests[-1]
    assert (sent.path, sent.api_key) == ("/v1/audio/speech", KEY)
    assert sent.json == {
        "input": "hello there world",
        "model": "gpt-4o-mini-tts",
        "voice": "coral",
        "response_format": "wav",
    }
    assert (result.audio_path, result.media_type, result.model_used, result.voice_used) == (
        str(target),
        "audio/wav",
        TTS,
        "coral",
    )
    assert target.read_bytes() == wav("hello there world")
    assert wav_header(result.audio_path) == (1, 24_000, 16)
    assert list(tmp_path.glob(".*.part")) == []


async def test_speed_instructions_and_format_go_out(fake: FakeProviderServer, tmp_path: Path) -> None:
    request = SynthesizeRequest(text="fast", format="mp3", speed=1.5, voice_instruction="cheerful")
    result = await make(tmp_path).synthesize(on_fake(fake, TTS), request)
    body = fake.requests[-1].json
    assert (body["speed"], body["instructions"], body["response_format"], body["voice"]) == (
        1.5,
        "cheerful",
        "mp3",
        "alloy",
    )
    assert result.media_type == "audio/mpeg"
    assert Path(result.audio_path).read_bytes().startswith(b"ID3")
    Path(result.audio_path).unlink()


async def test_bad_speech_requests_fail_before_any_call(fake: FakeProviderServer, tmp_path: Path) -> None:
    be, model = make(tmp_path), on_fake(fake, TTS)
    with pytest.raises(InvalidInput, match=r"no voice 'bob'.*alloy, ash"):
        await be.synthesize(model, SynthesizeRequest(text="hi", voice="bob"))
    with pytest.raises(InvalidInput, match=r"speed from 0\.25 to 4\.0"):
        await be.synthesize(model, SynthesizeRequest(text="hi", speed=5.0))
    with pytest.raises(InvalidInput, match="no text"):
        await be.synthesize(model, SynthesizeRequest(text="  "))
    with pytest.raises(InvalidInput, match="reference_audio_path"):
        request = SynthesizeRequest(text="hi", reference_audio_path="a.wav", strict_capabilities=True)
        await be.synthesize(model, request)
    with pytest.raises(InvalidInput, match="does not exist"):
        await be.synthesize(model, SynthesizeRequest(text="hi", output_path=str(tmp_path / "no" / "a.wav")))
    assert fake.requests == []


async def test_voices_are_the_built_in_ones(fake: FakeProviderServer, tmp_path: Path) -> None:
    listed = await make(tmp_path).voices(on_fake(fake, TTS))
    assert listed.default == "alloy" and {"alloy", "nova", "marin"} <= set(listed.ids())
    assert "voice_" in (listed.note or "") and not fake.requests  # no call: the API has no list


async def test_a_custom_voice_id_is_passed_through(fake: FakeProviderServer, tmp_path: Path) -> None:
    request = SynthesizeRequest(text="hi", voice="voice_1234", output_path=str(tmp_path / "a.wav"))
    result = await make(tmp_path).synthesize(on_fake(fake, TTS), request)
    assert fake.requests[-1].json["voice"] == {"id": "voice_1234"}  # the provider checks it, not us
    assert result.voice_used == "voice_1234"


async def test_a_cut_audio_stream_leaves_no_file(fake: FakeProviderServer, tmp_path: Path) -> None:
    fake.speech.chunk_bytes = 1000
    target = tmp_path / "cut.wav"
    fake.queue(Fault.cut_stream(after_chunks=2))
    with pytest.raises(ProviderError, match=r"connection|ended|incomplete") as info:
        await make(tmp_path).synthesize(
            on_fake(fake, TTS), SynthesizeRequest(text="a b c", output_path=str(target))
        )
    assert info.value.retryable
    assert not target.exists() and list(tmp_path.glob(".*.part")) == []


async def test_a_rate_limited_key_rotates_to_the_next(fake: FakeProviderServer, tmp_path: Path) -> None:
    fake.set_key_behavior(KEY, Fault.rate_limit(retry_after=30))
    request = SynthesizeRequest(text="next key", output_path=str(tmp_path / "a.wav"))
    await make(tmp_path, keys=f"{KEY},{OTHER}").synthesize(on_fake(fake, TTS), request)
    assert [r.api_key for r in fake.requests] == [KEY, OTHER]
    assert spoken_text((tmp_path / "a.wav").read_bytes()) == "next key"


async def test_a_provider_refusal_is_a_provider_error(fake: FakeProviderServer, tmp_path: Path) -> None:
    fake.queue(Fault.bad_request("Input too long."))
    with pytest.raises(ProviderError, match="Input too long") as info:
        await make(tmp_path).synthesize(on_fake(fake, TTS), SynthesizeRequest(text="hi"))
    assert info.value.status == 400


# --- transcribe ----------------------------------------------------------------------------------


async def test_transcribe_uploads_the_file(fake: FakeProviderServer, tmp_path: Path) -> None:
    audio = tmp_path / "clip.wav"
    audio.write_bytes(wav("the quick brown fox"))
    request = TranscribeRequest(audio_path=str(audio), language="en", prompt="animals")
    result = await make(tmp_path).transcribe(on_fake(fake, STT), request)
    assert (fake.requests[-1].path, fake.requests[-1].api_key) == ("/v1/audio/transcriptions", KEY)
    form = fake.speech.transcribed[-1]
    assert form["file"] == ("clip.wav", audio.read_bytes(), "audio/x-wav")
    assert {k: form[k] for k in ("model", "language", "prompt", "response_format")} == {
        "model": "gpt-transcribe",
        "language": "en",
        "prompt": "animals",
        "response_format": "json",
    }
    assert (result.text, result.model_used, result.language, result.words) == (
        "the quick brown fox",
        STT,
        "en",
        [],
    )


async def test_timestamps_ask_for_word_timings(fake: FakeProviderServer, tmp_path: Path) -> None:
    audio = tmp_path / "clip.wav"
    audio.write_bytes(wav("one two"))
    request = TranscribeRequest(audio_path=str(audio), timestamps=True)
    result = await make(tmp_path).transcribe(on_fake(fake, STT), request)
    form = fake.speech.transcribed[-1]
    assert form["response_format"] == "verbose_json"
    assert form["timestamp_granularities"] == ["word", "segment"]
    assert [(w.word, w.start, w.end) for w in result.words] == [("one", 0.0, 0.3), ("two", 0.3, 0.6)]
    assert result.language == "english" and result.duration == 0.6
    [segment] = result.segments
    assert (segment.start, segment.end, segment.text, segment.avg_logprob) == (0.0, 0.6, "one two", -0.25)


async def test_bad_audio_is_refused(fake: FakeProviderServer, tmp_path: Path) -> None:
    be, model = make(tmp_path), on_fake(fake, STT)
    with pytest.raises(InvalidInput, match="not found"):
        await be.transcribe(model, TranscribeRequest(audio_path=str(tmp_path / "missing.wav")))
    assert fake.requests == []
    text = tmp_path / "notes.txt"
    text.write_text("not audio")
    with pytest.raises(ProviderError, match="Invalid file format") as info:
        await be.transcribe(model, TranscribeRequest(audio_path=str(text)))
    assert info.value.status == 400


# --- through the engine ---------------------------------------------------------------------------


async def test_the_engine_runs_hosted_speech_both_ways(
    fake: FakeProviderServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    engine = InferenceEngine(CarConfig(home=tmp_path / "home"))
    for model_id in (STT, TTS):
        engine.register_model(on_fake(fake, model_id))
    assert some(engine.registry.get(TTS)).available and some(engine.registry.get(STT)).available
    spoken = await engine.synthesize(
        SynthesizeRequest(text="round trip works", model=TTS, output_path=str(tmp_path / "a.wav"))
    )
    heard = await engine.transcribe(TranscribeRequest(audio_path=spoken.audio_path, model=STT))
    assert (spoken.model_used, heard.model_used, heard.text) == (TTS, STT, "round trip works")
    engine.close()


async def test_without_a_key_hosted_speech_is_unavailable(
    fake: FakeProviderServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    engine = InferenceEngine(CarConfig(home=tmp_path / "home"))
    engine.register_model(on_fake(fake, TTS))
    assert not some(engine.registry.get(TTS)).available
    engine.close()
