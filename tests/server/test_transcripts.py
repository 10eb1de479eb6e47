"""Streamed transcriptions (``stream=true`` on ``/v1/audio/transcriptions``): each segment sent as
it is decoded, failures before and after the first words, a client that leaves. An engine whose
``transcribe`` follows a script (the audio's first bytes name it) stands in for a long decode;
the real Whisper's stream runs in ``test_media.py``."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import threading
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from car_inference.backends.base import SegmentCallback
from car_inference.engine import InferenceEngine
from car_inference.errors import InferenceFailed, InvalidInput
from car_inference.requests import TranscribedSegment, TranscribedWord, TranscribeRequest, TranscribeResult
from car_inference.server import ServerThread, create_app
from car_inference.server.transcripts import with_times

# What the scripted engine does (the audio's first bytes say which): segments that come
# while the test holds the rest back, a failure after the first words, one that never ends.
RELEASE = threading.Event()
STREAMS: dict[str, str] = {}  # what happened to each scripted transcription


class ScriptedEngine(InferenceEngine):
    async def transcribe(
        self, request: TranscribeRequest, on_segment: SegmentCallback | None = None
    ) -> TranscribeResult:
        audio = Path(request.audio_path).read_bytes()
        script = audio.split(b":")[0].decode("latin-1")
        if script in ("HELD", "FAIL-LATER", "HANG") and on_segment is not None:
            return await self._scripted(script, request, on_segment)
        if script == "BAD":
            raise InvalidInput(f"could not transcribe {request.audio_path}: not audio")
        return TranscribeResult(
            text=f"{len(audio)} bytes heard", model_used="test/stt", language=request.language
        )

    async def _scripted(
        self, script: str, request: TranscribeRequest, on_segment: SegmentCallback
    ) -> TranscribeResult:
        first = TranscribedSegment(start=0.0, end=30.0, text="First window.")
        on_segment(first)
        try:
            if script == "HANG":
                await asyncio.sleep(60)
            if script == "FAIL-LATER":
                await asyncio.sleep(0.3)  # decoding the next window, which fails
                raise InferenceFailed(f"the decoder broke on {request.audio_path}")
            released = await asyncio.to_thread(RELEASE.wait, 10)
        except asyncio.CancelledError:
            STREAMS[script] = "cancelled"
            raise
        STREAMS[script] = "released" if released else "timed out"
        second = TranscribedSegment(start=30.0, end=41.0, text="Second window.")
        on_segment(second)
        return TranscribeResult(
            text="First window. Second window.", model_used="test/stt", segments=[first, second]
        )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    engine = ScriptedEngine(home=tmp_path_factory.mktemp("transcripts-home"))
    with ServerThread(create_app(engine)) as running:
        yield running
    engine.close()


def _media_folders() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("car-upload-")}


WAV = b"RIFF\x24\x00\x00\x00WAVEfmt "


def _events(lines: Iterator[str]) -> Iterator[dict[str, object]]:
    for line in lines:
        if line.startswith("data: "):
            yield json.loads(line[len("data: ") :])


def _stream(server: ServerThread, audio: bytes) -> httpx.Response:
    return httpx.post(
        server.url + "/v1/audio/transcriptions",
        files={"file": ("talk.wav", audio, "audio/wav")},
        data={"model": "auto", "stream": "true"},
        timeout=30,
    )


def test_a_streamed_transcription_sends_each_window_as_it_is_decoded(server: ServerThread) -> None:
    """stream=true waited for the whole audio, then sent its segments at once: ten minutes of
    speech showed nothing until all of it was decoded."""
    RELEASE.clear()
    before = _media_folders()
    url = server.url + "/v1/audio/transcriptions"
    files = {"file": ("talk.wav", b"HELD:" + WAV, "audio/wav")}
    with httpx.stream("POST", url, files=files, data={"stream": "true"}, timeout=30) as answer:
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
        events = _events(answer.iter_lines())
        assert next(events) == {"type": "transcript.text.delta", "delta": "First window."}
        assert "HELD" not in STREAMS, "the first window came while the rest was still being decoded"
        RELEASE.set()
        assert list(events) == [
            {"type": "transcript.text.delta", "delta": " Second window."},
            {"type": "transcript.text.done", "text": "First window. Second window."},
        ]
    assert STREAMS["HELD"] == "released"
    assert _media_folders() <= before, "the upload is removed once the transcription ends"
    # Through OpenAI's SDK, which iterates the events.
    RELEASE.set()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    done = list(client.audio.transcriptions.create(model="auto", file=("t.wav", b"HELD:"), stream=True))
    assert [e.type for e in done] == ["transcript.text.delta"] * 2 + ["transcript.text.done"]


def test_a_streamed_transcriptions_failure_is_a_status_before_its_first_words_and_an_event_after(
    server: ServerThread,
) -> None:
    before = _media_folders()
    bad = _stream(server, b"BAD:" + WAV)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_input"
    assert "car-upload-" not in bad.text and "talk.wav" in bad.text, "the server's path is not shown"
    late = _stream(server, b"FAIL-LATER:" + WAV)
    assert late.status_code == 200
    first, error = list(_events(iter(late.text.splitlines())))
    assert first == {"type": "transcript.text.delta", "delta": "First window."}
    assert error["error"]["message"] == "the decoder broke on talk.wav"  # type: ignore[index]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    events = client.audio.transcriptions.create(model="auto", file=("t.wav", b"FAIL-LATER:"), stream=True)
    with pytest.raises(openai.APIError, match=r"the decoder broke on t\.wav"):
        list(events)
    assert _media_folders() <= before


def test_a_client_that_leaves_a_streamed_transcription_stops_it(server: ServerThread) -> None:
    before = _media_folders()
    url = server.url + "/v1/audio/transcriptions"
    files = {"file": ("talk.wav", b"HANG:" + WAV, "audio/wav")}
    with httpx.stream("POST", url, files=files, data={"stream": "true"}, timeout=30) as answer:
        assert next(_events(answer.iter_lines()))["delta"] == "First window."
    deadline = time.monotonic() + 10
    while STREAMS.get("HANG") != "cancelled" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert STREAMS.get("HANG") == "cancelled", "the transcription was stopped, not left to run"
    while not _media_folders() <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _media_folders() <= before


def test_a_stream_past_the_time_limit_ends_with_a_timeout_event(tmp_path: Path) -> None:
    before = _media_folders()
    engine = ScriptedEngine(home=tmp_path)
    settings = engine.config.server.model_copy(update={"request_timeout_s": 1.0})
    with ServerThread(create_app(engine, settings)) as slow:
        answer = _stream(slow, b"HANG:" + WAV)
    engine.close()
    first, error = list(_events(iter(answer.text.splitlines())))
    assert answer.status_code == 200 and first["delta"] == "First window."
    assert error["error"]["code"] == "request_timeout"  # type: ignore[index]
    assert "1 s, server.request_timeout_s" in error["error"]["message"]  # type: ignore[index]
    assert _media_folders() <= before


def test_a_transcript_without_segments_gets_times_from_its_words_or_its_file(tmp_path: Path) -> None:
    """A hosted model answers text and words: subtitles were one cue from 0:00 to 0:00."""
    words = [
        TranscribedWord(word=w, start=i * 0.5, end=i * 0.5 + 0.4)
        for i, w in enumerate(["Hi", "there.", "Bye"])
    ]
    timed = with_times(
        TranscribeResult(text="Hi there. Bye", words=words, duration=2.0), tmp_path / "none.wav"
    )
    assert [(s.start, s.end, s.text) for s in timed.segments] == [(0.0, 0.9, "Hi there."), (1.0, 1.4, "Bye")]
    clip = tmp_path / "a.wav"
    with wave.open(str(clip), "wb") as out:  # 1.5 s of silence at 16 kHz
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16_000)
        out.writeframes(b"\0\0" * 24_000)
    whole = with_times(TranscribeResult(text="Hello."), clip)
    assert whole.duration == 1.5 and [(s.start, s.end) for s in whole.segments] == [(0.0, 1.5)]
