"""The fake provider's speech endpoints, driven by plain HTTP and the official SDKs: real WAV
files, chunked audio, and the providers' error shapes."""

from __future__ import annotations

import io
import wave
from collections.abc import Iterator

import elevenlabs
import httpx
import openai
import pytest
from elevenlabs.core.api_error import ApiError

from .provider_server import FakeProviderServer, Fault
from .provider_speech import RATE, spoken_text, wav


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProviderServer]:
    with FakeProviderServer() as server:
        yield server


def test_the_wav_is_a_real_wav_that_carries_its_text() -> None:
    data = wav("three little words")
    with wave.open(io.BytesIO(data), "rb") as audio:
        assert (audio.getnchannels(), audio.getsampwidth(), audio.getframerate()) == (1, 2, RATE)
        assert audio.getnframes() == int(RATE * 0.9)
    assert spoken_text(data) == "three little words"
    assert spoken_text(b"ID3" + data) is None and spoken_text(b"") is None


def test_openai_speech_is_chunked_audio(fake: FakeProviderServer) -> None:
    fake.reset()
    fake.speech.chunk_bytes = 500
    body = {"model": "gpt-4o-mini-tts", "input": "hi there", "voice": "alloy", "response_format": "wav"}
    with httpx.stream("POST", fake.openai_base_url + "/audio/speech", json=body) as response:
        assert response.headers["transfer-encoding"] == "chunked" and "content-length" not in response.headers
        assert response.headers["content-type"] == "audio/wav"
        chunks = list(response.iter_raw())
    assert b"".join(chunks) == wav("hi there") and len(chunks) > 1


def test_openai_errors_have_openais_shape(fake: FakeProviderServer) -> None:
    fake.reset()
    client = openai.OpenAI(base_url=fake.openai_base_url, api_key="sk-fake", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="Invalid value for 'voice'"):
        client.audio.speech.create(model="gpt-4o-mini-tts", input="hi", voice="bob")
    with pytest.raises(openai.BadRequestError, match="Invalid file format"):
        client.audio.transcriptions.create(model="gpt-transcribe", file=("a.txt", b"text", "text/plain"))
    fake.queue(Fault.server_error(503))
    with pytest.raises(openai.InternalServerError):
        client.audio.speech.create(model="gpt-4o-mini-tts", input="hi", voice="alloy")
    assert client.audio.transcriptions.create(model="gpt-transcribe", file=("a.wav", wav("ok"))).text == "ok"


def test_elevenlabs_speaks_and_refuses_like_elevenlabs(fake: FakeProviderServer) -> None:
    fake.reset()
    client = elevenlabs.ElevenLabs(api_key="xi-fake", base_url=fake.base_url)
    audio = b"".join(
        client.text_to_speech.convert("JBFqnCBsd6RMkjVDRZzb", text="eleven", output_format="wav_24000")
    )
    assert audio == wav("eleven")
    with pytest.raises(ApiError) as info:
        b"".join(client.text_to_speech.convert("nobody", text="eleven"))
    assert info.value.status_code == 404 and info.value.body["detail"]["status"] == "voice_not_found"
    heard = client.speech_to_text.convert(model_id="scribe_v2", file=("a.wav", audio))
    assert isinstance(heard, elevenlabs.SpeechToTextChunkResponseModel)  # one channel, no webhook
    assert heard.text == "eleven" and [w.text for w in heard.words] == ["eleven"]
