"""Every box format a grounding model answers in, read into pixels of the input image."""

from __future__ import annotations

import base64
import io
import struct

import pytest

from car_inference.errors import InferenceError, InvalidInput
from car_inference.grounding import (
    GroundingOutputError,
    answer_boxes,
    grounding_prompt,
    image_size,
    parse_grounding,
    smart_resize,
    style_for,
)
from car_inference.requests import BoundingBox
from car_inference.schema import ModelSchema
from fakes.images import png


def _model(family: str) -> ModelSchema:
    return ModelSchema.model_validate(
        {
            "id": f"test/{family}",
            "name": family,
            "provider": "test",
            "family": family,
            "capabilities": ["generate", "vision", "grounding"],
            "source": {"kind": "openai", "base_url": "http://127.0.0.1:1/v1", "needs_key": False},
        }
    )


QWEN25 = style_for(_model("qwen2.5-vl"))
QWEN2 = style_for(_model("qwen2-vl"))
QWEN3 = style_for(_model("qwen3-vl"))
GEMINI = style_for(_model("gemini-3"))
GENERIC = style_for(_model("gpt-5"))


def _box(x1: float, y1: float, x2: float, y2: float, label: str | None = None) -> BoundingBox:
    return BoundingBox(x1=x1, y1=y1, x2=x2, y2=y2, label=label)


def test_styles_follow_the_family() -> None:
    assert [s.name for s in (QWEN25, QWEN2, QWEN3, GEMINI, GENERIC)] == [
        "qwen2.5-vl",
        "qwen2-vl",
        "qwen3-vl",
        "gemini",
        "generic",
    ]
    assert '"the red car"' in grounding_prompt(QWEN25, " the red car ", 640, 480)
    assert "box_2d" in grounding_prompt(GEMINI, "cat", 640, 480)
    # A family we know nothing about is told the image size, since it answers in its pixels.
    assert "640x480" in grounding_prompt(GENERIC, "cat", 640, 480)


# --- Qwen2.5-VL: bbox_2d JSON in pixels of the smart-resized image ----------------------------------


def test_qwen25_json_in_a_code_fence_is_scaled_from_the_resized_image() -> None:
    # 1000x500 is seen as 1008x504 (multiples of 28): 504 -> 500 px.
    answer = '```json\n[\n  {"bbox_2d": [504, 252, 1008, 504], "label": "red car"}\n]\n```'
    assert parse_grounding(answer, 1000, 500, QWEN25) == [_box(500.0, 250.0, 1000.0, 500.0, "red car")]


def test_qwen25_several_objects_and_loose_json() -> None:
    answer = 'Here: {"bbox_2d": [0, 0, 28, 28], "label": "a"} and {"bbox_2d": [28, 28, 56, 56]}'
    boxes = parse_grounding(answer, 56, 56, QWEN25)
    assert boxes == [_box(0, 0, 28, 28, "a"), _box(28, 28, 56, 56)]


def test_python_style_dicts_are_read() -> None:
    answer = "[{'bbox_2d': [10, 20, 30, 40], 'label': 'dog'}]"
    assert parse_grounding(answer, 1000, 1000, GENERIC) == [_box(10, 20, 30, 40, "dog")]


def test_smart_resize_matches_qwen_processor() -> None:
    assert smart_resize(500, 1000) == (504, 1008)
    assert smart_resize(10, 10) == (56, 56)  # below min_pixels: scaled up
    h, w = smart_resize(20000, 20000)
    assert h == w and h * w <= 28 * 28 * 16384 and h % 28 == 0


# --- Qwen3-VL and Qwen2-VL: 0-1000 grids ------------------------------------------------------------


def test_qwen3_bbox_2d_is_on_a_thousand_grid() -> None:
    answer = '[{"bbox_2d": [100, 200, 500, 1000], "label": "tree"}]'
    assert parse_grounding(answer, 2000, 1000, QWEN3) == [_box(200, 200, 1000, 1000, "tree")]


def test_qwen2_box_tags_with_object_ref() -> None:
    answer = "<|object_ref_start|>the red car<|object_ref_end|><|box_start|>(100,250),(500,750)<|box_end|>"
    assert parse_grounding(answer, 640, 480, QWEN2) == [_box(64, 120, 320, 360, "the red car")]


def test_box_tags_without_label_are_read_for_any_family() -> None:
    answer = "<|box_start|>(0,0),(1000,1000)<|box_end|> and <|box_start|>(500, 500), (600, 600)<|box_end|>"
    assert parse_grounding(answer, 200, 100, GENERIC) == [_box(0, 0, 200, 100), _box(100, 50, 120, 60)]


def test_qwen2_tags_stripped_by_the_detokenizer_are_still_read() -> None:
    assert parse_grounding("the red car(100,250),(500,750)", 1000, 1000, QWEN2) == [
        _box(100, 250, 500, 750, "the red car")
    ]
    # Other families do not answer in bare pairs: "(1, 2), (3, 4)" in prose is not a box.
    assert parse_grounding("the point (1, 2), (3, 4)", 1000, 1000, GENERIC) == []


# --- Gemini: box_2d [ymin, xmin, ymax, xmax] on 0-1000 ----------------------------------------------


def test_gemini_box_2d_is_y_first_on_a_thousand_grid() -> None:
    answer = '[{"box_2d": [250, 100, 750, 500], "label": "the red car"}]'
    assert parse_grounding(answer, 640, 480, GEMINI) == [_box(64, 120, 320, 360, "the red car")]


def test_gemini_box_2d_is_read_whatever_the_family() -> None:
    # The key says the format: a model prompted generically that answers box_2d is read as Gemini.
    assert parse_grounding('{"box_2d": [0, 0, 500, 500]}', 100, 100, GENERIC) == [_box(0, 0, 50, 50)]


# --- edges --------------------------------------------------------------------------------------


def test_boxes_are_ordered_and_clamped_to_the_image() -> None:
    answer = '[{"bbox_2d": [120, 90, -5, 10]}]'
    assert parse_grounding(answer, 100, 80, GENERIC) == [_box(0, 10, 100, 80)]
    # a box partly outside is clamped; one the model gave as a point stays one
    assert parse_grounding('[{"bbox_2d": [90, 10, 140, 20]}]', 100, 80, GENERIC) == [_box(90, 10, 100, 20)]
    assert parse_grounding('[{"bbox_2d": [30, 10, 30, 20]}]', 100, 80, GENERIC) == [_box(30, 10, 30, 20)]


def test_an_answer_without_boxes_is_no_boxes() -> None:
    assert parse_grounding("There is no red car in this image.", 100, 100, QWEN25) == []
    assert parse_grounding("[]", 100, 100, GEMINI) == []


@pytest.mark.parametrize(
    ("answer", "what"),
    [
        ('[{"bbox_2d": [1, 2, 3]}]', "not four numbers"),
        ('[{"box_2d": ["a", 2, 3, 4]}]', "not four numbers"),
        ('[{"bbox_2d": [1, 2, 3, 4, 5], "label": "x"}]', "not four numbers"),
        ('{"bbox_2d": [12, 40, 300', "unfinished bbox_2d"),
        ("{'box_2d': [1, 2, oops, 4]}", "box_2d"),
        ("<|box_start|>(1,2)<|box_end|>", "no coordinates"),
        ('[{"bbox_2d": [1, 2, 3, NaN]}]', "not four numbers"),
        # wholly outside the image: clamped, a point at the corner came back as the answer
        ('[{"box_2d": [1100, 1100, 1200, 1200], "label": "x"}]', "a box outside the 100x100 image"),
        ('[{"bbox_2d": [150, 10, 190, 40]}]', "a box outside the 100x100 image"),
    ],
)
def test_malformed_answers_say_what_was_received(answer: str, what: str) -> None:
    with pytest.raises(GroundingOutputError) as info:
        parse_grounding(answer, 100, 100, QWEN25)
    message = str(info.value)
    assert what in message
    assert repr(answer)[1:20] in message  # the answer itself is quoted
    assert isinstance(info.value, InferenceError)


def test_a_long_malformed_answer_is_quoted_in_part() -> None:
    answer = '{"bbox_2d": [1, 2, 3]}' + "x" * 1000
    with pytest.raises(GroundingOutputError, match=r"\.\.\.'$"):
        parse_grounding(answer, 100, 100, QWEN25)


def test_answer_boxes_stay_in_the_models_coordinates() -> None:
    """InferenceResult.bounding_boxes: the same parser, no image size, so nothing is scaled or clamped."""
    answer = '[{"bbox_2d": [1200, 20, 30, 2000], "label": "dog"}]'
    assert answer_boxes(answer, _model("qwen2.5-vl")) == [_box(30, 20, 1200, 2000, "dog")]
    assert answer_boxes('{"box_2d": [250, 100, 750, 500]}', _model("gemini-3")) == [_box(100, 250, 500, 750)]
    tagged = "<|object_ref_start|>cat<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>"
    assert answer_boxes(tagged, _model("qwen2-vl")) == [_box(1, 2, 3, 4, "cat")]
    assert answer_boxes("cat(1,2),(3,4)", _model("qwen2-vl")) == [_box(1, 2, 3, 4, "cat")]
    assert answer_boxes("no boxes here", _model("gpt-5")) == []
    assert answer_boxes('[{"bbox_2d": [1, 2, 3]}]', _model("gpt-5")) == []  # unreadable: no boxes


# --- image sizes ----------------------------------------------------------------------------------


def test_image_size_ofpng() -> None:
    assert image_size(png(37, 11)) == (37, 11)


@pytest.mark.parametrize("fmt", ["JPEG", "GIF", "WEBP", "BMP", "PNG"])
def test_image_size_of_each_format(fmt: str) -> None:
    pil = pytest.importorskip("PIL.Image")
    buffer = io.BytesIO()
    pil.new("RGB", (123, 45), "red").save(buffer, format=fmt)
    assert image_size(buffer.getvalue()) == (123, 45)


def test_a_gif_is_as_large_as_its_largest_frame() -> None:
    """A screen of 10x10 holding a 1200x1200 frame passed the pixel bound unseen (12000x12000 was
    decoded at 900 MB) and its boxes were clamped to 10x10."""
    pil = pytest.importorskip("PIL.Image")
    buffer = io.BytesIO()
    pil.new("P", (1200, 900), 0).save(buffer, format="GIF")
    data = bytearray(buffer.getvalue())
    data[6:10] = struct.pack("<HH", 10, 10)  # the logical screen says 10x10
    assert image_size(bytes(data)) == (1200, 900)
    frames = [pil.new("P", (50, 40), i) for i in range(3)]
    animated = io.BytesIO()
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:])
    assert image_size(animated.getvalue()) == (50, 40)
    assert image_size(animated.getvalue()[:40]) == (50, 40)  # cut short: what was read


def test_image_size_of_lossless_webp() -> None:
    pil = pytest.importorskip("PIL.Image")
    buffer = io.BytesIO()
    pil.new("RGB", (77, 33), "blue").save(buffer, format="WEBP", lossless=True)
    assert image_size(buffer.getvalue()) == (77, 33)


def test_not_an_image_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="not a PNG, JPEG"):
        image_size(base64.b64decode("aGVsbG8gd29ybGQ="))
    with pytest.raises(InvalidInput):
        image_size(png(3, 3)[:12])
