"""The embedded OCR grounder: the real RapidOCR model on images drawn in the test."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import pytest

from car_inference.backends.ocr import match_text
from car_inference.engine import InferenceEngine
from car_inference.errors import InvalidInput
from car_inference.requests import GroundRequest, ImageBlock
from fakes.images import text_sign

pytest.importorskip("rapidocr_onnxruntime")
pytest.importorskip("PIL.Image")

OCR = "rapidai/pp-ocrv4-mobile"


@pytest.fixture(scope="module")
def sign() -> bytes:
    return text_sign()


@pytest.fixture
def engine() -> Iterator[InferenceEngine]:
    engine = InferenceEngine()
    yield engine
    engine.close()


def _ask(sign: bytes, target: str, model: str | None = OCR) -> GroundRequest:
    return GroundRequest(prompt=target, image=ImageBlock(data=base64.b64encode(sign).decode()), model=model)


async def test_a_word_is_boxed_down_to_its_letters(engine: InferenceEngine, sign: bytes) -> None:
    result = await engine.ground(_ask(sign, "world"))
    assert (result.model_used, result.width, result.height) == (OCR, 640, 240)
    [box] = result.boxes
    # "WORLD" is the second half of the first line (x 40..320, y 40..80): its own box, not the line's.
    assert 160 <= box.x1 <= 200 and 300 <= box.x2 <= 330, box
    assert 35 <= box.y1 <= 60 and 70 <= box.y2 <= 95, box
    assert box.label and "WORLD" in box.label.upper() and box.score and box.score > 0.5
    assert "exit 42" in result.raw_text


async def test_case_and_spaces_do_not_matter(engine: InferenceEngine, sign: bytes) -> None:
    [box] = (await engine.ground(_ask(sign, "EXIT 42"))).boxes
    assert 290 <= box.x1 <= 310 and 405 <= box.x2 <= 425 and 140 <= box.y1 <= 170, box


async def test_every_line_and_no_match(engine: InferenceEngine, sign: bytes) -> None:
    assert len((await engine.ground(_ask(sign, "*"))).boxes) == 2
    nothing = await engine.ground(_ask(sign, "the red car"))
    assert nothing.boxes == [] and "HELLO" in nothing.raw_text.upper()
    assert "car models pull qwen2.5-vl-3b" in nothing.raw_text  # what would find objects


async def test_it_is_the_default_without_a_vision_model(engine: InferenceEngine, sign: bytes) -> None:
    assert (await engine.ground(_ask(sign, "hello", model=None))).model_used == OCR


async def test_an_image_the_ocr_cannot_read_is_the_callers_error(engine: InferenceEngine) -> None:
    from PIL import Image

    thin = io.BytesIO()
    Image.new("RGB", (1, 60000), "white").save(thin, "PNG")  # RapidOCR cannot scale it
    for image, words in (
        (b"GIF89a\x10\x00\x10\x00" + b"junk" * 8, "cannot be decoded"),
        (thin.getvalue(), "1x60000"),
    ):
        with pytest.raises(InvalidInput, match=words) as info:
            await engine.ground(_ask(image, "x"))
        assert "BytesIO" not in str(info.value)


async def test_a_palette_gif_is_read_as_the_same_picture(engine: InferenceEngine, sign: bytes) -> None:
    """RapidOCR took a GIF's palette indices for grey levels: no text, answered 200 with no box."""
    from PIL import Image

    gif = io.BytesIO()
    Image.open(io.BytesIO(sign)).convert("P", dither=Image.Dither.NONE).save(gif, "GIF")
    [box] = (await engine.ground(_ask(gif.getvalue(), "exit 42"))).boxes
    assert 290 <= box.x1 <= 310 and 405 <= box.x2 <= 425, box


async def test_a_jpeg_cut_short_is_the_callers_error(engine: InferenceEngine, sign: bytes) -> None:
    """It was a 500 inference_failed: verify() does not read a JPEG's image data."""
    from PIL import Image

    jpeg = io.BytesIO()
    Image.open(io.BytesIO(sign)).convert("RGB").save(jpeg, "JPEG")
    cut = jpeg.getvalue()[: len(jpeg.getvalue()) // 3]
    with pytest.raises(InvalidInput, match="cannot be decoded: it is cut short"):
        await engine.ground(_ask(cut, "exit"))


def test_match_text_reads_line_and_character_boxes() -> None:
    quad = [[0, 0], [100, 0], [100, 20], [0, 20]]
    chars = [[[i * 10, 0], [i * 10 + 9, 0], [i * 10 + 9, 20], [i * 10, 20]] for i in range(10)]
    line = (quad, "ab cdefghi", 0.9, chars, list("ab cdefghi"), [0.9] * 10)
    [box] = match_text([line], "CD")
    assert (box.x1, box.x2) == (30, 49)  # characters 3 and 4 (the space has a box of its own)
    # Without character boxes the line's box; a near miss matches the whole line.
    assert match_text([(quad, "abcdefghi", 0.9)], "cd")[0].x2 == 100
    assert len(match_text([(quad, "exit 42", 0.9)], "exit 47")) == 1
    assert match_text([(quad, "exit 42", 0.9)], "banana") == []
    # A description quoting the text finds the quoted text.
    assert len(match_text([(quad, "exit 42", 0.9)], 'the sign that says "EXIT 42"')) == 1
    assert len(match_text([(quad, "exit 42", 0.9)], "the sign that says “exit 42”")) == 1
    assert match_text([(quad, "exit 42", 0.9)], "   ") == []
