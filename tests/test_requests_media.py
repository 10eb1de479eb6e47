"""Speech and media requests (``requests_media``): numbers only, bounds, prompts, file names."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from car_inference.requests import (
    EmbedRequest,
    GenerateImageRequest,
    GenerateVideoRequest,
    RerankRequest,
    SynthesizeRequest,
    TranscribeRequest,
    VideoMode,
)


def test_speech_and_image_requests_take_numbers_only() -> None:
    with pytest.raises(ValidationError):
        SynthesizeRequest(text="hi", speed=0)
    with pytest.raises(ValidationError):
        SynthesizeRequest(text="hi", speed=5e-324)  # Piper's length scale would be infinite
    for field in ("text", "voice", "output_path"):
        with pytest.raises(ValidationError, match=f"{field} contains a NUL character"):
            SynthesizeRequest(**{"text": "hi", field: "a\x00b"})  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        GenerateImageRequest(prompt="cat", seed=False)
    with pytest.raises(ValidationError):
        RerankRequest(query="q", documents=["a"], top_n=True)
    with pytest.raises(ValidationError):
        EmbedRequest.model_validate({"texts": ["a"], "is_query": "yes"})
    # A video request took `steps: true` as 1 step, NaN guidance and sizes as strings.
    for bad in ({"steps": True}, {"guidance": float("nan")}, {"width": "512"}, {"duration_s": "4"}):
        with pytest.raises(ValidationError):
            GenerateVideoRequest.model_validate({"prompt": "waves", **bad})
    with pytest.raises(ValidationError):
        GenerateImageRequest.model_validate({"prompt": "cat", "height": 512.5})
    assert GenerateVideoRequest(prompt="waves", duration_s=4, guidance=3).duration_s == 4.0


def test_image_and_video_requests_have_upper_bounds() -> None:
    """A width of 10**9 or a million variants is a 400 (ValidationError), not an allocation."""
    for bad in ({"width": 10**9}, {"height": 8193}, {"steps": 10**6}, {"variant_count": 11}):
        with pytest.raises(ValidationError):
            GenerateImageRequest.model_validate({"prompt": "cat", **bad})
    assert GenerateImageRequest(prompt="cat", width=8192, height=8192, variant_count=10).width == 8192
    for bad in ({"duration_s": 601}, {"fps": 241}, {"width": 8193}, {"steps": 1001}):
        with pytest.raises(ValidationError):
            GenerateVideoRequest.model_validate({"prompt": "waves", **bad})


def test_file_names_need_not_be_utf8_but_texts_must() -> None:
    """A Linux file name may hold any bytes; Python reads the ones that are not UTF-8 as surrogates
    (os.fsdecode) and writes them back when it opens the file: `car transcribe` and `car speak -o`
    refused such names. The same byte in a text is named as a byte, not as Python's surrogate."""
    name = os.fsdecode(b"/tmp/out\xff.wav")
    assert SynthesizeRequest(text="ok", output_path=name).output_path == name
    assert TranscribeRequest(audio_path=name).audio_path == name
    with pytest.raises(ValidationError, match=r"text is not valid UTF-8 text \(it holds the byte 0xff"):
        SynthesizeRequest(text=os.fsdecode(b"caf\xff"))


def test_images_and_videos_from_text_need_a_prompt() -> None:
    """`car image ""` went to the provider: a paid call with nothing to draw."""
    for blank in ("", "  "):
        with pytest.raises(ValidationError, match="an image needs a prompt"):
            GenerateImageRequest(prompt=blank)
        with pytest.raises(ValidationError, match="a video from text needs a prompt"):
            GenerateVideoRequest(prompt=blank)
    GenerateVideoRequest(prompt="", mode=VideoMode.IMAGE_TO_VIDEO, image_path="first.png")  # the image
