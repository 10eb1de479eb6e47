"""``/v1/audio/transcriptions`` with ``stream=true``: OpenAI's ``transcript.text.delta`` events
as the audio is decoded, then ``transcript.text.done`` with the whole text.

Local Whisper decodes a 30-second window a step and hands each segment over as it comes
(``engine.transcribe(..., on_segment=)``), so ten minutes of audio show their first words after
the first window, not after the last. As with generation streams (``sse.py``), the status and
headers wait for the first segment: a failure before it (audio that is no audio, an unknown
language, the time limit) is an ordinary JSON error with its status; a failure after it is an
error event, on which OpenAI's SDK raises. A model that answers whole (a hosted one) sends its
segments at once when it is done. A client that disconnects cancels the transcription, which
stops at its next window.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.responses import Response

from ..engine.speech import audio_seconds
from ..errors import InferenceError
from ..requests import TranscribedSegment, TranscribedWord, TranscribeResult
from .common import ServerState, car_headers
from .errors import ErrorInfo, describe, error_body
from .sse import send_body, sse, until_gone

__all__ = ["TranscriptEvents", "transcript_events", "with_times"]


Send = Any
Receive = Any

STT = "speech_to_text"


def _delta(text: str, first: bool) -> bytes:
    return sse({"type": "transcript.text.delta", "delta": text if first else " " + text})


def transcript_events(result: TranscribeResult) -> Response:
    """A finished transcription as the events of a stream: a delta per segment (one for the whole
    text where the model gave no segments), then the done event."""
    pieces = [p for p in ([s.text for s in result.segments] or [result.text]) if p]
    body = b"".join(_delta(p, not i) for i, p in enumerate(pieces))
    body += sse({"type": "transcript.text.done", "text": result.text})
    return Response(body, media_type="text/event-stream", headers=car_headers(result.model_used))


class TranscriptEvents(Response):
    """A transcription running in a task of its own, its segments streamed as they come.

    ``opening()`` waits for the first segment or the end: it raises the transcription's error,
    returns the whole answer as events when it ended first, or returns this response. ``ended``
    runs once the transcription is over, whichever way (the route removes the upload there);
    ``clean`` rewrites an error's text before a client sees it (the upload's path)."""

    def __init__(
        self,
        state: ServerState,
        work: Callable[[Callable[[TranscribedSegment], None]], Awaitable[TranscribeResult]],
        model_id: str,
        ended: Callable[[], None],
        clean: Callable[[InferenceError], InferenceError],
    ) -> None:
        self.background = None  # a Response only so that FastAPI passes it through
        self.state = state
        self.model_id = model_id
        self.ended = ended
        self.clean = clean
        self.segments: asyncio.Queue[TranscribedSegment] = asyncio.Queue()
        self.head: TranscribedSegment | None = None  # the first segment, taken by opening()
        loop = asyncio.get_running_loop()

        def heard(segment: TranscribedSegment) -> None:  # from the worker thread decoding
            loop.call_soon_threadsafe(self.segments.put_nowait, segment)

        async def run() -> TranscribeResult:
            async with asyncio.timeout(state.settings.request_timeout_s):
                return await work(heard)

        self.task = asyncio.ensure_future(run())
        self.task.add_done_callback(lambda _: ended())

    async def opening(self) -> Response:
        first = asyncio.ensure_future(self.segments.get())
        try:
            await asyncio.wait((first, self.task), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the client went away before a word: stop decoding
            first.cancel()
            self.task.cancel()
            raise
        if self.task.done():
            first.cancel()
            try:
                return transcript_events(self.task.result())
            except InferenceError as exc:
                raise self.clean(exc) from None
        self.head = first.result()
        return self

    async def __call__(self, scope: Any, receive: Receive, send: Send) -> None:
        try:
            await until_gone(self._pump(send), receive)
        finally:
            self.task.cancel()  # the client left: stop decoding at the next window
            await asyncio.gather(self.task, return_exceptions=True)

    async def _pump(self, send: Send) -> None:
        headers = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}
        headers |= {"x-accel-buffering": "no"} | car_headers(self.model_id)
        raw = [(k.encode(), v.encode()) for k, v in headers.items()]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": raw})
            await self._events(send)
        except OSError:  # the client went away while we were writing
            return
        with contextlib.suppress(OSError):
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _events(self, send: Send) -> None:
        first = True
        if self.head is not None and self.head.text:
            await send_body(send, _delta(self.head.text, first))
            first = False
        while True:
            getting = asyncio.ensure_future(self.segments.get())
            try:
                await asyncio.wait((getting, self.task), return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                getting.cancel()
                if not self.state.stopping:
                    raise
                if (pump := asyncio.current_task()) is not None:
                    pump.uncancel()  # the server stops: say so in the stream, as sse.py does
                await send_body(send, sse(error_body(describe(self.state.shutdown_error()))))
                return
            if getting.done():
                segment = getting.result()
            else:
                getting.cancel()
                if self.segments.empty():
                    break
                segment = self.segments.get_nowait()
            if segment.text:
                await send_body(send, _delta(segment.text, first))
                first = False
        try:
            result = self.task.result()
        except Exception as exc:  # after the first words: an error event, not a status
            await send_body(send, sse(error_body(self._failure(exc))))
            return
        await send_body(send, sse({"type": "transcript.text.done", "text": result.text}))

    def _failure(self, exc: Exception) -> ErrorInfo:
        if isinstance(exc, InferenceError):
            exc = self.clean(exc)
            self.state.metrics.failure(exc, STT)
        return describe(exc, capability=STT, timeout_s=self.state.settings.request_timeout_s)  # logs a bug


# A subtitle cue made of words ends after a sentence or this many words.
CUE_WORDS = 12


def with_times(result: TranscribeResult, audio: Path) -> TranscribeResult:
    """``result`` with the times subtitles and verbose_json need where the model gave none (a
    hosted model answers text and words): segments made of its words, else one over the whole
    file, and the duration read off the file. Subtitles were a cue from 0:00 to 0:00."""
    duration = result.duration if result.duration is not None else audio_seconds(audio)
    segments = result.segments or _cues(result.words)
    if not segments and result.text and duration:
        segments = [TranscribedSegment(start=0.0, end=round(duration, 3), text=result.text)]
    return result.model_copy(update={"duration": duration, "segments": segments})


def _cues(words: list[TranscribedWord]) -> list[TranscribedSegment]:
    cues: list[TranscribedSegment] = []
    run: list[TranscribedWord] = []
    for i, word in enumerate(words):
        run.append(word)
        if len(run) >= CUE_WORDS or word.word.endswith((".", "?", "!")) or i == len(words) - 1:
            text = " ".join(w.word for w in run)
            cues.append(TranscribedSegment(start=run[0].start, end=run[-1].end, text=text))
            run = []
    return cues
