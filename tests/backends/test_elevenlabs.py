"""ElevenLabs speech both ways: the real ``elevenlabs`` SDK against the loopback fake
(``fakes/provider_speech.py``), through the ElevenLabs backend and the engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from car_inference.backends.elevenlabs import DEFAULT_VOICE, ElevenLabsBackend
from car_inference.catalog import load_builtin
from car_inference.config import CarConfig
from car_inference.engine import InferenceEngine
from car_inference.errors import InvalidInput, ProviderError, UnsupportedMode
from car_inference.requests import SynthesizeRequest, TranscribeRequest
from car_inference.schema import ModelSchema
from fakes import FakeProviderServer, Fault
from fakes.optional import some
from fakes.provider_speech import spoken_text, wav
from fakes.remote_kit import remote_backend

CATALOG = {m.id: m for m in load_builtin().models}
KEY = "sk-eleven-key-0001"
OTHER = "sk-eleven-key-0002"
TTS, FLASH, STT = "elevenlabs/eleven-multilingual-v2", "elevenlabs/eleven-flash-v2-5", "elevenlabs/scribe-v2"


def make(tmp_path: Path, keys: str = KEY) -> ElevenLabsBackend:
    return remote_backend(ElevenLabsBackend, tmp_path, {"ELEVENLABS_API_KEYS": keys})


def on_fake(fake: FakeProviderServer, model_id: str) -> ModelSchema:
    schema = CATALOG[model_id]
    return schema.model_copy(update={"source": schema.source.model_copy(update={"base_url": fake.base_url})})


async def test_synthesize_streams_the_audio_to_the_file(fake: FakeProviderServer, tmp_path: Path) -> None:
    fake.speech.chunk_bytes = 1000
    target = tmp_path / "hi.wav"
    request = SynthesizeRequest(text="hello from eleven", output_path=str(target), language="en")
    result = await make(tmp_path).synthesize(on_fake(fake, TTS), request)
    sent = fake.requests[-1]
    assert (sent.path, sent.query, sent.api_key) == (
        f"/v1/text-to-speech/{DEFAULT_VOICE}",
        {"output_format": "wav_24000"},
        KEY,
    )
    assert sent.json == {
        "text": "hello from eleven",
        "model_id": "eleven_multilingual_v2",
        "language_code": "en",
    }
    assert (result.model_used, result.media_type, result.voice_used) == (TTS, "audio/wav", DEFAULT_VOICE)
    assert target.read_bytes() == wav("hello from eleven")


async def test_speed_and_mp3_go_out(fake: FakeProviderServer, tmp_path: Path) -> None:
    request = SynthesizeRequest(text="quick", format="mp3", speed=1.1, output_path=str(tmp_path / "a.mp3"))
    result = await make(tmp_path).synthesize(on_fake(fake, FLASH), request)
    sent = fake.requests[-1]
    assert sent.query == {"output_format": "mp3_44100_128"}
    assert sent.json["voice_settings"] == {"speed": 1.1} and sent.json["model_id"] == "eleven_flash_v2_5"
    assert result.media_type == "audio/mpeg" and Path(result.audio_path).read_bytes().startswith(b"ID3")


async def test_bad_requests_fail_before_any_call(fake: FakeProviderServer, tmp_path: Path) -> None:
    be, model = make(tmp_path), on_fake(fake, TTS)
    with pytest.raises(UnsupportedMode, match="flac"):
        await be.synthesize(model, SynthesizeRequest(text="hi", format="flac"))
    with pytest.raises(InvalidInput, match=r"speed from 0\.7 to 1\.2"):
        await be.synthesize(model, SynthesizeRequest(text="hi", speed=2.0))
    with pytest.raises(InvalidInput, match="voice_instruction"):
        await be.synthesize(
            model, SynthesizeRequest(text="hi", voice_instruction="calm", strict_capabilities=True)
        )
    with pytest.raises(UnsupportedMode, match="prompt"):
        await be.transcribe(on_fake(fake, STT), TranscribeRequest(audio_path=__file__, prompt="names"))
    assert fake.requests == []


async def test_an_unknown_voice_is_invalid_input_listing_the_accounts_voices(
    fake: FakeProviderServer, tmp_path: Path
) -> None:
    """The service's 404 voice_not_found becomes InvalidInput (exit 2 / HTTP 400) with the list."""
    fake.speech.eleven_voices.add("cloned-voice-0001")
    request = SynthesizeRequest(text="hi", voice="no-such-voice", output_path=str(tmp_path / "a.wav"))
    with pytest.raises(InvalidInput, match="has no voice 'no-such-voice'") as info:
        await make(tmp_path).synthesize(on_fake(fake, TTS), request)
    assert f"{DEFAULT_VOICE} (George)" in str(info.value) and "cloned-voice-0001" in str(info.value)
    assert isinstance(info.value.__cause__, ProviderError) and info.value.__cause__.status == 404
    assert [r.path for r in fake.requests] == ["/v1/text-to-speech/no-such-voice", "/v1/voices"]
    assert not (tmp_path / "a.wav").exists()


async def test_voices_lists_the_account_voices(fake: FakeProviderServer, tmp_path: Path) -> None:
    listed = await make(tmp_path).voices(on_fake(fake, TTS))
    assert [(v.id, v.name) for v in listed.voices] == [(DEFAULT_VOICE, "George")]
    assert listed.default == DEFAULT_VOICE and fake.requests[-1].api_key == KEY


async def test_a_rate_limited_key_rotates(fake: FakeProviderServer, tmp_path: Path) -> None:
    fake.set_key_behavior(KEY, Fault.rate_limit(retry_after=30))
    request = SynthesizeRequest(text="second key", output_path=str(tmp_path / "a.wav"))
    await make(tmp_path, keys=f"{KEY},{OTHER}").synthesize(on_fake(fake, TTS), request)
    assert [r.api_key for r in fake.requests] == [KEY, OTHER]
    assert spoken_text((tmp_path / "a.wav").read_bytes()) == "second key"


async def test_transcribe_uploads_the_file(fake: FakeProviderServer, tmp_path: Path) -> None:
    audio = tmp_path / "clip.wav"
    audio.write_bytes(wav("scribe hears this"))
    request = TranscribeRequest(audio_path=str(audio), language="en", timestamps=True)
    result = await make(tmp_path).transcribe(on_fake(fake, STT), request)
    form = fake.speech.transcribed[-1]
    assert (fake.requests[-1].path, fake.requests[-1].api_key) == ("/v1/speech-to-text", KEY)
    assert (form["model_id"], form["language_code"], form["timestamps_granularity"]) == (
        "scribe_v2",
        "en",
        "word",
    )
    assert form["file"][1] == audio.read_bytes()
    assert (result.text, result.language, result.model_used) == ("scribe hears this", "en", STT)
    assert [w.word for w in result.words] == ["scribe", "hears", "this"]  # spacing entries dropped
    assert [w.start for w in result.words] == pytest.approx([0.0, 0.3, 0.6])
    plain = await make(tmp_path).transcribe(on_fake(fake, STT), TranscribeRequest(audio_path=str(audio)))
    assert fake.speech.transcribed[-1]["timestamps_granularity"] == "none" and plain.words == []


async def test_the_engine_runs_elevenlabs_with_a_key(
    fake: FakeProviderServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ELEVENLABS_API_KEY", raising=False)
    engine = InferenceEngine(CarConfig(home=tmp_path / "home"))
    assert not some(engine.registry.get(TTS)).available
    monkeypatch.setenv("ELEVENLABS_API_KEY", KEY)
    for model_id in (TTS, STT):
        assert engine.register_model(on_fake(fake, model_id)).available
    spoken = await engine.synthesize(
        SynthesizeRequest(text="all the way", model=TTS, output_path=str(tmp_path / "a.wav"))
    )
    heard = await engine.transcribe(TranscribeRequest(audio_path=spoken.audio_path, model=STT))
    assert (spoken.model_used, heard.model_used, heard.text) == (TTS, STT, "all the way")
    engine.close()
