"""Requests and results of the speech and media tasks: transcription, speech, images, videos.
Re-exported by ``requests``, where every task's models are imported from."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import Field, model_validator

from .requests_base import _INT64, Bool, Float, Int, _Input, _Model

__all__ = [
    "MAX_PIXELS_SIDE",
    "MAX_STEPS",
    "GenerateImageRequest",
    "GenerateImageResult",
    "GenerateVideoRequest",
    "GenerateVideoResult",
    "SynthesizeRequest",
    "SynthesizeResult",
    "TranscribeRequest",
    "TranscribeResult",
    "TranscribedSegment",
    "TranscribedWord",
    "VideoMode",
]


class TranscribeRequest(_Input):
    audio_path: str
    model: str | None = None
    language: str | None = None
    prompt: str | None = None
    timestamps: Bool = False


class TranscribedWord(_Model):
    word: str
    start: float
    end: float


class TranscribedSegment(_Model):
    """A stretch of the transcript with its times (seconds); the decoder's figures where the
    model gives them (faster-whisper does, as OpenAI's verbose_json segments)."""

    start: float
    end: float
    text: str
    tokens: list[int] = Field(default_factory=list)
    temperature: float | None = None
    avg_logprob: float | None = None
    compression_ratio: float | None = None
    no_speech_prob: float | None = None

    @classmethod
    def of(cls, segment: Any) -> TranscribedSegment:
        """A decoder's segment (faster-whisper's, or the Transcriptions API's verbose_json one:
        the same attribute names), times to the millisecond, its figures as plain numbers."""

        def number(name: str) -> float | None:
            value = getattr(segment, name, None)
            return None if value is None else float(value)

        return cls(
            start=round(float(segment.start), 3),
            end=round(float(segment.end), 3),
            text=str(segment.text).strip(),
            tokens=[int(t) for t in getattr(segment, "tokens", None) or ()],
            temperature=number("temperature"),
            avg_logprob=number("avg_logprob"),
            compression_ratio=number("compression_ratio"),
            no_speech_prob=number("no_speech_prob"),
        )


class TranscribeResult(_Model):
    text: str
    model_used: str | None = None
    language: str | None = None
    duration: float | None = Field(default=None, description="the audio's length in seconds, where known")
    words: list[TranscribedWord] = Field(default_factory=list)
    segments: list[TranscribedSegment] = Field(default_factory=list)


class SynthesizeRequest(_Input):
    text: str
    model: str | None = None
    voice: str | None = None
    language: str | None = None
    output_path: str | None = None
    format: Literal["wav", "mp3", "flac", "pcm"] = "wav"
    speed: Float | None = Field(default=None, ge=0.1, le=10.0, description="1.0 is normal")
    reference_audio_path: str | None = None
    reference_text: str | None = None
    voice_instruction: str | None = None
    strict_capabilities: Bool = False

    @model_validator(mode="after")
    def _no_nul(self) -> SynthesizeRequest:
        """A NUL character can be neither spoken nor passed to a speech engine or a file name
        (Piper failed on one with "embedded null character", a 500): refused up front."""
        for name in ("text", "voice", "language", "output_path", "reference_audio_path", "reference_text"):
            value = getattr(self, name)
            if isinstance(value, str) and "\x00" in value:
                raise ValueError(f"{name} contains a NUL character (\\x00)")
        return self


class SynthesizeResult(_Model):
    audio_path: str
    media_type: str
    model_used: str | None = None
    voice_used: str | None = None


MAX_PIXELS_SIDE = 8192
MAX_STEPS = 1000


class GenerateImageRequest(_Input):
    prompt: str
    model: str | None = None
    negative_prompt: str | None = None
    # Upper bounds far above what any pipeline or API takes (8K, OpenAI's n of 10), so that a
    # client's typo (a width of 10**9) is a 400, not an allocation that fails or never ends.
    width: Int = Field(default=1024, ge=64, le=MAX_PIXELS_SIDE)
    height: Int = Field(default=1024, ge=64, le=MAX_PIXELS_SIDE)
    steps: Int | None = Field(default=None, ge=1, le=MAX_STEPS)
    guidance: Float | None = None
    seed: Int | None = Field(default=None, ge=-_INT64 - 1, le=_INT64)
    variant_count: Int | None = Field(default=None, ge=1, le=10)
    output_path: str | None = None
    format: Literal["png", "jpeg", "webp"] = "png"
    image_paths: list[str] = Field(default_factory=list, description="images to edit (or take as references)")
    mask_path: str | None = Field(default=None, description="edits: transparent where the image may change")

    @model_validator(mode="after")
    def _has_prompt(self) -> GenerateImageRequest:
        if not self.prompt.strip():  # it went to the provider: a paid call with nothing to draw
            raise ValueError("an image needs a prompt (what to draw, or how to change the image)")
        return self


class GenerateImageResult(_Model):
    image_path: str
    media_type: str
    model_used: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    image_paths: list[str] = Field(default_factory=list, description="all images written (variant_count)")


class VideoMode(StrEnum):
    TEXT_TO_VIDEO = "text_to_video"
    IMAGE_TO_VIDEO = "image_to_video"
    AUDIO_TO_VIDEO = "audio_to_video"


class GenerateVideoRequest(_Input):
    prompt: str
    model: str | None = None
    mode: VideoMode = VideoMode.TEXT_TO_VIDEO
    image_path: str | None = None
    audio_path: str | None = None
    # Strict as the image request's: `steps: true` was 1 step, NaN guidance reached the pipeline.
    duration_s: Float = Field(default=4.0, gt=0, le=600)
    fps: Int = Field(default=24, ge=1, le=240)
    width: Int = Field(default=768, ge=64, le=MAX_PIXELS_SIDE)
    height: Int = Field(default=512, ge=64, le=MAX_PIXELS_SIDE)
    seed: Int | None = Field(default=None, ge=-_INT64 - 1, le=_INT64)
    output_path: str | None = None
    format: Literal["mp4", "mov", "gif"] = "mp4"
    negative_prompt: str | None = None
    steps: Int | None = Field(default=None, ge=1, le=MAX_STEPS)
    guidance: Float | None = None

    @model_validator(mode="after")
    def _inputs_match_mode(self) -> GenerateVideoRequest:
        if self.mode is VideoMode.IMAGE_TO_VIDEO and not self.image_path:
            raise ValueError("image_to_video needs image_path")
        if self.mode is VideoMode.AUDIO_TO_VIDEO and not self.audio_path:
            raise ValueError("audio_to_video needs audio_path")
        if self.mode is VideoMode.TEXT_TO_VIDEO and not self.prompt.strip():
            raise ValueError("a video from text needs a prompt (what happens in it)")
        return self


class GenerateVideoResult(_Model):
    video_path: str
    media_type: str
    model_used: str | None = None
    duration_s: float | None = None
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    seed: int | None = None
