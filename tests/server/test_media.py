"""Speech and image routes: a 501 naming the missing capability while no backend exists, and
working answers as soon as the engine has one (simulated here by an engine whose task methods
behave like a backend)."""

from __future__ import annotations

import base64
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from car_inference.backends.base import SegmentCallback
from car_inference.engine import InferenceEngine
from car_inference.requests import (
    GenerateImageRequest,
    GenerateImageResult,
    SynthesizeRequest,
    SynthesizeResult,
    TranscribedSegment,
    TranscribeRequest,
    TranscribeResult,
)
from car_inference.server import ServerThread, create_app
from car_inference.server.media import parse_multipart, subtitles
from fakes import FakeProviderServer
from fakes.provider_speech import spoken_text

WAV = b"RIFF\x24\x00\x00\x00WAVEfmt \r\n\r\n--boundary-like\r\n" + bytes(range(256))


def test_speech_round_trip_and_missing_images_501(local_server: ServerThread) -> None:
    client = openai.OpenAI(base_url=local_server.url + "/v1", api_key="unused", max_retries=0)
    # Text to speech on the embedded Piper voice. A voice it does not have (OpenAI's "alloy") is a
    # 400 listing its voices, unless config.toml's [speech] voices maps the name.
    with pytest.raises(openai.BadRequestError) as unknown:
        client.audio.speech.create(model="auto", voice="alloy", input="Hi.", response_format="wav")
    assert "has no voice 'alloy'; its voices: en_US-joe-medium" in unknown.value.message
    assert unknown.value.param == "voice"  # it was null: OpenAI names the field
    speech = client.audio.speech.create(
        model="auto",
        voice="en_US-joe-medium",
        input="The quick brown fox jumps over the lazy dog.",
        response_format="wav",
    )
    audio = speech.read()
    assert audio[:4] == b"RIFF" and audio[8:12] == b"WAVE" and len(audio) > 10_000
    # The voices "voice" takes, per model (default: the one "auto" speech runs on).
    voices = httpx.get(local_server.url + "/v1/audio/voices").json()
    assert voices["model"] == "piper/en_us-joe-medium" and voices["voices"] == [
        {"id": "en_US-joe-medium", "name": None}
    ]
    unknown_model = httpx.get(local_server.url + "/v1/audio/voices", params={"model": "no-such-voice"})
    assert unknown_model.status_code == 404 and "no-such-voice" in unknown_model.text
    not_tts = httpx.get(local_server.url + "/v1/audio/voices", params={"model": "whisper-base"})
    assert not_tts.status_code == 400 and "text_to_speech" in not_tts.text, "the model named lacks it"
    assert speech.response.headers["x-car-model"] == "piper/en_us-joe-medium"
    # ... and back to text on the embedded Whisper.
    text = client.audio.transcriptions.create(model="auto", file=("fox.wav", audio, "audio/wav"))
    # Piper's voice varies from run to run ("fox" came back once as "box"): most words, not each.
    with pytest.raises(openai.BadRequestError) as unknown_language:
        client.audio.transcriptions.create(model="auto", file=("fox.wav", audio, "audio/wav"), language="xx")
    assert unknown_language.value.param == "language" and "'xx'" in unknown_language.value.message
    heard = set(text.text.lower().replace(".", "").split())
    assert len(heard & {"quick", "brown", "fox", "jumps", "lazy", "dog"}) >= 4, text.text
    # The SDK sends a list as one part per item: only the last one ("segment") was read, and the
    # word timestamps asked for were lost. verbose_json has OpenAI's duration and segments.
    verbose = client.audio.transcriptions.create(
        model="auto",
        file=("fox.wav", audio, "audio/wav"),
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
    )
    seconds = (len(audio) - 44) / (22050 * 2)  # Piper's 16-bit mono at 22,050 Hz
    assert verbose.duration is not None and abs(verbose.duration - seconds) < 0.1
    assert verbose.words and len(verbose.words) >= 6 and verbose.words[0].start < verbose.words[-1].end
    assert verbose.segments and verbose.segments[0].text and verbose.segments[-1].end <= seconds + 0.5
    assert verbose.segments[0].avg_logprob < 0 and verbose.segments[0].id == 0
    srt = client.audio.transcriptions.create(
        model="auto", file=("fox.wav", audio, "audio/wav"), response_format="srt"
    )
    assert str(srt).startswith("1\n00:00:0") and " --> 00:00:0" in str(srt)
    vtt = client.audio.transcriptions.create(
        model="auto", file=("fox.wav", audio, "audio/wav"), response_format="vtt"
    )
    assert str(vtt).startswith("WEBVTT\n\n00:00:0") and "fox" in str(vtt).lower()
    # stream=True: the SDK iterated the plain JSON answer as no events at all, silently.
    events = list(
        client.audio.transcriptions.create(model="auto", file=("fox.wav", audio, "audio/wav"), stream=True)
    )
    assert [e.type for e in events][-1] == "transcript.text.done" and len(events) >= 2
    done = events[-1]
    assert done.type == "transcript.text.done"
    assert "".join(e.delta for e in events if e.type == "transcript.text.delta") == done.text
    assert "fox" in done.text.lower()
    # Audio that is not audio is the caller's mistake: 400, not 500.
    with pytest.raises(openai.BadRequestError) as bad:
        client.audio.transcriptions.create(model="auto", file=("a.wav", WAV, "audio/wav"))
    assert bad.value.code == "invalid_input" and "could not transcribe" in bad.value.message
    # No image model: a 501 naming the capability and the engine's reason.
    with pytest.raises(openai.APIStatusError) as info:
        client.images.generate(model="auto", prompt="a red apple")
    error = info.value
    assert error.status_code == 501 and error.code == "capability_unavailable"
    assert error.type == "not_implemented_error"
    assert "image_generation is not available on this server: " in error.message
    assert "car models pull stabilityai/sd-turbo" in error.message and "OPENAI_API_KEY" in error.message
    # A named model that is not pulled is that model's 503, as on /v1/rerank: it was this 501
    # saying image generation was missing while other image models answered on the server.
    with pytest.raises(openai.APIStatusError) as named:
        client.images.generate(model="sd-turbo", prompt="a red apple")
    assert named.value.status_code == 503 and named.value.code == "model_unavailable"
    assert "stabilityai/sd-turbo" in named.value.message and "car models pull" in named.value.message


def test_bad_media_requests_are_400(local_server: ServerThread) -> None:
    url = local_server.url + "/v1"
    cases = [
        ("/audio/speech", {"model": "auto"}, "input"),
        ("/audio/speech", {"input": "x" * 4097}, "input"),  # at most 4,096 characters, as OpenAI
        ("/audio/speech", {"input": "hi", "response_format": "opus"}, "response_format"),
        ("/audio/speech", {"input": "hi", "response_format": []}, "response_format"),  # was WAV
        ("/images/generations", {"prompt": "x", "response_format": []}, "response_format"),
        ("/images/generations", {"prompt": "x", "output_format": 0}, "output_format"),
        ("/images/generations", {"prompt": "x", "response_format": "url"}, "response_format"),
        ("/images/generations", {"prompt": "x", "size": "big"}, "size"),
        ("/images/generations", {}, "prompt"),
        # OpenAI's options no model here honours were dropped without a word (the default came back,
        # billed); at their default ("auto") they are fine.
        ("/images/generations", {"prompt": "x", "quality": "high"}, "quality"),
        ("/images/generations", {"prompt": "x", "background": "transparent"}, "background"),
        ("/images/generations", {"prompt": "x", "style": "vivid"}, "style"),
        ("/videos", {"prompt": "x", "format": "gif"}, "format"),  # an mp4 came for it
        # Named as the client sent them, not as our request models call them.
        ("/audio/speech", {"input": "hi", "instructions": 5}, "instructions"),
        ("/videos", {"prompt": "x", "seconds": -1}, "seconds"),
        # Coerced before: 1.5 frames a second became 1, "2" images 2, a 31-digit seed passed.
        ("/videos", {"prompt": "x", "fps": 1.5}, "fps"),
        ("/videos", {"prompt": "x", "fps": "24"}, "fps"),
        ("/videos", {"prompt": "x", "seed": 10**30}, "seed"),
        ("/images/generations", {"prompt": "x", "n": "2"}, "n"),
        # OpenAI's SSE speech stream got raw WAV bytes back; an unknown field was dropped.
        ("/audio/speech", {"input": "hi", "stream_format": "sse"}, "stream_format"),
        ("/audio/speech", {"input": "hi", "foo": 1}, "foo"),
    ]
    for path, body, param in cases:
        response = httpx.post(url + path, json=body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, (
            path,
            response.text,
        )
        assert not {"voice_instruction", "duration_s"} & set(response.text.replace(":", " ").split())
    nul = httpx.post(url + "/audio/speech", json={"input": "a\x00b"})  # schemathesis found a 500
    assert nul.status_code == 400 and "NUL character" in nul.json()["error"]["message"], nul.text
    no_file = httpx.post(url + "/audio/transcriptions", files={"model": (None, "auto")})
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
    not_multipart = httpx.post(url + "/audio/transcriptions", json={"file": "x"})
    assert not_multipart.status_code == 400
    hot = httpx.post(
        url + "/audio/transcriptions", files={"file": ("a.wav", WAV), "temperature": (None, "0.8")}
    )
    assert hot.status_code == 400 and hot.json()["error"]["param"] == "temperature", hot.text


def test_undecodable_audio_is_a_400_without_server_paths(local_server: ServerThread) -> None:
    png = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108000000003a7e9b55")
    for name, data in (("notes.pcm", b"\x00\x01" * 400), ("picture.png", png)):  # the PNG was a 500
        response = httpx.post(
            local_server.url + "/v1/audio/transcriptions", files={"file": (name, data)}, timeout=60
        )
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_input" and name in error["message"]
        assert "car-upload-" not in response.text and "/tmp" not in response.text, error["message"]
        assert "index out of range" not in error["message"]  # what PyAV's IndexError said of the PNG


def test_multipart_keeps_binary_uploads_intact() -> None:
    boundary = "XyZ123"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nauto\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="clip.wav"\r\n'
            f"Content-Type: audio/wav\r\n\r\n"
        ).encode()
        + WAV
        + f"\r\n--{boundary}--\r\n".encode()
    )
    fields = parse_multipart(body, f"multipart/form-data; boundary={boundary}")
    assert fields["model"].text == "auto"
    upload = fields["file"]
    assert upload.value == WAV and upload.filename == "clip.wav" and upload.content_type == "audio/wav"


def test_a_repeated_field_keeps_every_value() -> None:
    """An SDK sends a list (image[], timestamp_granularities[]) as one part per item; a dict by
    name kept only the last of them."""
    parts = [("image[]", "a"), ("image[]", "b"), ("model", "x"), ("model", "y"), ("image", "c")]
    body = "".join(
        f'--B\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n' for name, value in parts
    )
    fields = parse_multipart((body + "--B--\r\n").encode(), "multipart/form-data; boundary=B")
    assert [f.text for f in fields.listed("image")] == ["a", "b", "c"]
    assert fields["model"].text == "y"  # a single field given twice: the last, as JSON's duplicate keys


def test_subtitles_of_a_transcript() -> None:
    segments = [
        TranscribedSegment(start=0.0, end=1.5, text="Hello there."),
        TranscribedSegment(start=1.5, end=3661.25, text="A long one."),
    ]
    result = TranscribeResult(text="Hello there. A long one.", segments=segments, duration=3662.0)
    assert subtitles(result, "srt") == (
        "1\n00:00:00,000 --> 00:00:01,500\nHello there.\n\n2\n00:00:01,500 --> 01:01:01,250\nA long one.\n"
    )
    assert subtitles(result, "vtt").startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello there.\n")
    whole = TranscribeResult(text="No segments.", duration=2.0)  # a model that gives none: one cue
    assert subtitles(whole, "srt") == "1\n00:00:00,000 --> 00:00:02,000\nNo segments.\n"


class MediaEngine(InferenceEngine):
    """An engine whose speech and image tasks act like installed backends."""

    async def transcribe(
        self, request: TranscribeRequest, on_segment: SegmentCallback | None = None
    ) -> TranscribeResult:
        audio = Path(request.audio_path).read_bytes()
        return TranscribeResult(
            text=f"{len(audio)} bytes heard", model_used="test/stt", language=request.language
        )

    async def synthesize(self, request: SynthesizeRequest) -> SynthesizeResult:
        assert request.output_path is not None
        Path(request.output_path).write_bytes(b"RIFF" + request.text.encode())
        return SynthesizeResult(audio_path=request.output_path, media_type="audio/wav", model_used="test/tts")

    async def generate_image(
        self, request: GenerateImageRequest, progress: Callable[[int, int], None] | None = None
    ) -> GenerateImageResult:
        assert request.output_path is not None
        Path(request.output_path).write_bytes(b"\x89PNG" + f"{request.width}x{request.height}".encode())
        return GenerateImageResult(
            image_path=request.output_path, media_type="image/png", model_used="test/image"
        )


@pytest.fixture(scope="module")
def media_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    engine = MediaEngine(home=tmp_path_factory.mktemp("media-home"))
    with ServerThread(create_app(engine)) as server:
        yield server
    engine.close()


def _media_folders() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith(("car-upload-", "car-speech-"))}


def test_routes_work_once_a_backend_exists(media_server: ServerThread) -> None:
    before = _media_folders()  # a server killed earlier on this machine may have left its own
    client = openai.OpenAI(base_url=media_server.url + "/v1", api_key="unused", max_retries=0)
    heard = client.audio.transcriptions.create(model="auto", file=("a.wav", WAV, "audio/wav"), language="en")
    assert heard.text == f"{len(WAV)} bytes heard"
    text = client.audio.transcriptions.create(model="auto", file=("a.wav", WAV), response_format="text")
    assert text.strip() == f"{len(WAV)} bytes heard"
    spoken = client.audio.speech.with_raw_response.create(
        model="auto", voice="alloy", input="Hi", response_format="wav"
    )
    assert spoken.content == b"RIFFHi" and spoken.headers["content-type"] == "audio/wav"
    assert spoken.headers["x-car-model"] == "test/tts"
    image = client.images.generate(model="auto", prompt="an apple", size="512x256")
    assert image.data and base64.b64decode(image.data[0].b64_json or "") == b"\x89PNG512x256"
    # Uploads and outputs live in temporary folders that are gone afterwards.
    assert _media_folders() <= before


def test_the_audio_routes_follow_the_speech_policy(
    tmp_path: Path, fake_provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``[speech] prefer_local = false`` and an OpenAI key, "auto" speech runs on the hosted
    models (the catalog's, their host pointed at the fake provider)."""
    fake_provider.reset()
    (tmp_path / "models.toml").write_text(f'[hosts.openai]\nbase_url = "{fake_provider.openai_base_url}"\n')
    (tmp_path / "config.toml").write_text("[speech]\nprefer_local = false\n")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-policy-route")
    engine = InferenceEngine(home=tmp_path)
    with ServerThread(create_app(engine)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        spoken = client.audio.speech.with_raw_response.create(
            model="auto", voice="alloy", input="hosted by policy", response_format="wav"
        )
        assert spoken.headers["x-car-model"] == "openai/gpt-4o-mini-tts"
        assert spoken_text(spoken.content) == "hosted by policy"
        heard = client.audio.transcriptions.with_raw_response.create(
            model="auto", file=("a.wav", spoken.content, "audio/wav")
        )
        assert heard.headers["x-car-model"] == "openai/gpt-transcribe"
        assert heard.parse().text == "hosted by policy"
        # Subtitles of a hosted transcript have real times (it was one cue from 0:00 to 0:00).
        srt = client.audio.transcriptions.create(
            model="auto", file=("a.wav", spoken.content, "audio/wav"), response_format="srt"
        )
        assert "00:00:00,000 --> 00:00:00,900\nhosted by policy" in str(srt), srt
    assert [r.path for r in fake_provider.requests] == ["/v1/audio/speech"] + ["/v1/audio/transcriptions"] * 2
    engine.close()
