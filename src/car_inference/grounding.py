"""Visual grounding: how each model family is asked for boxes, and how its answer is read.

Families answer in different coordinate systems; every box leaves here in pixels of the input
image (``x1, y1`` top-left, ``x2, y2`` bottom-right, clamped to the image):

- Qwen2.5-VL: JSON ``{"bbox_2d": [x1, y1, x2, y2], "label": ...}`` in absolute pixels of the image
  *as the model saw it*, resized so each side is a multiple of 28 (``smart_resize``);
- Qwen2-VL: ``<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``
  on a 0-1000 grid (llama.cpp drops the special tokens when it detokenizes, leaving the bare
  ``(x1,y1),(x2,y2)``, which is read too);
- Qwen3-VL: ``bbox_2d`` JSON on a 0-1000 grid;
- Gemini: JSON ``{"box_2d": [ymin, xmin, ymax, xmax], "label": ...}`` on a 0-1000 grid.

Other vision models are asked for ``bbox_2d`` in pixels of the image, its size stated in the prompt.
An answer with no box in it means the model found nothing (no boxes); an answer that tries to give
boxes we cannot read raises ``GroundingOutputError`` quoting what was received.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from .errors import InferenceFailed, InvalidInput
from .requests import BoundingBox, GroundRequest, GroundResult
from .schema import ModelCapability, ModelSchema

__all__ = [
    "BoxSpace",
    "Grounder",
    "GroundingOutputError",
    "GroundingStyle",
    "answer_boxes",
    "grounding_prompt",
    "image_size",
    "parse_grounding",
    "smart_resize",
    "style_for",
]


class GroundingOutputError(InferenceFailed):
    """A grounding model's answer held boxes we could not read."""


class BoxSpace(StrEnum):
    PIXELS = "pixels"  # absolute pixels of the image the model was given
    QWEN_RESIZED = "qwen_resized"  # absolute pixels of the image after Qwen2.5-VL's smart_resize
    NORM_1000 = "norm_1000"  # 0..1000 on each axis


@dataclass(frozen=True)
class GroundingStyle:
    """How a family is prompted, and the coordinate space of its ``bbox_2d``."""

    name: str
    prompt: str  # {target}, {width}, {height}
    bbox_space: BoxSpace


_JSON_ASK = (
    'Locate every instance of "{target}" in the image. Report the bounding box coordinates of each '
    'as JSON: [{{"bbox_2d": [x1, y1, x2, y2], "label": "..."}}].'
)
# Qwen2.5-VL's own grounding prompt (its cookbook), answered in bbox_2d JSON.
_QWEN25 = GroundingStyle("qwen2.5-vl", _JSON_ASK, BoxSpace.QWEN_RESIZED)
_QWEN3 = GroundingStyle("qwen3-vl", _JSON_ASK, BoxSpace.NORM_1000)
# Qwen2-VL was trained to answer "<|object_ref_start|>...<|box_start|>(x1,y1),(x2,y2)<|box_end|>".
_QWEN2 = GroundingStyle(
    "qwen2-vl",
    "Output the bounding box of {target} in the image.",
    BoxSpace.NORM_1000,
)
# Google's documented object-detection prompt for Gemini (box_2d is always on a 0-1000 grid).
_GEMINI = GroundingStyle(
    "gemini",
    'Detect "{target}" in the image. Output a JSON list where each entry contains the 2D bounding '
    'box in "box_2d" ([ymin, xmin, ymax, xmax], normalized to 0-1000) and a text label in "label". '
    "Never return masks or code fencing.",
    BoxSpace.NORM_1000,
)
_GENERIC = GroundingStyle(
    "generic",
    'The image is {width}x{height} pixels. Locate every instance of "{target}" in it. Answer with '
    'JSON only: [{{"bbox_2d": [x1, y1, x2, y2], "label": "..."}}] in pixel coordinates, x to the '
    "right and y down from the top-left corner; [] if there is none.",
    BoxSpace.PIXELS,
)
# Family prefixes, most specific first ("qwen2.5-vl" before "qwen2-vl").
_STYLES: tuple[tuple[str, GroundingStyle], ...] = (
    ("qwen2.5-vl", _QWEN25),
    ("qwen2_5_vl", _QWEN25),
    ("qwen3-vl", _QWEN3),
    ("qwen2-vl", _QWEN2),
    ("gemini", _GEMINI),
)


def style_for(model: ModelSchema) -> GroundingStyle:
    """The grounding style of ``model``'s family (the generic pixel JSON for unknown families)."""
    family = (model.family or "").lower()
    for prefix, style in _STYLES:
        if family.startswith(prefix):
            return style
    return _GENERIC


def grounding_prompt(style: GroundingStyle, target: str, width: int, height: int) -> str:
    return style.prompt.format(target=target.strip(), width=width, height=height)


@runtime_checkable
class Grounder(Protocol):
    """A backend that grounds directly (not through a generated answer), e.g. OCR."""

    async def ground(self, model: ModelSchema, request: GroundRequest, image: bytes) -> GroundResult: ...


# --- reading answers ------------------------------------------------------------------------------

_NUM = r"-?\d+(?:\.\d+)?"
_KEYED = re.compile(r"""["']?(bbox_2d|box_2d)["']?\s*:\s*(\[[^\]]*\]?)""")
_PAIR = rf"\(\s*(?P<a>{_NUM})\s*,\s*(?P<b>{_NUM})\s*\)\s*,\s*\(\s*(?P<c>{_NUM})\s*,\s*(?P<d>{_NUM})\s*\)"
_TAG = re.compile(
    r"(?:<\|object_ref_start\|>(?P<label>[^<]*)<\|object_ref_end\|>)?\s*"
    rf"<\|box_start\|>\s*{_PAIR}\s*<\|box_end\|>"
)
# The same with the special tokens gone (llama.cpp detokenizes without them): "car(1,2),(3,4)".
_BARE_TAG = re.compile(rf"(?P<label>[^\n(),]*?)\s*{_PAIR}")
_LABEL_NEAR = re.compile(r"""["']label["']\s*:\s*["']([^"']*)["']""")
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def answer_boxes(text: str, model: ModelSchema) -> list[BoundingBox]:
    """``InferenceResult.bounding_boxes``: the boxes in a grounding model's generated answer, read
    by the same parser as ``engine.ground`` but in the model's own coordinates (no image size is
    known here), each as ``x1, y1, x2, y2`` (Gemini's ``box_2d`` reordered from y, x). Boxes that
    cannot be read give []: the generation itself succeeded and its text is in the result. A
    model that does not declare ``grounding`` gives [] (its numbers are not boxes)."""
    if not model.has_capability(ModelCapability.GROUNDING):
        return []
    try:
        return parse_grounding(text, None, None, style_for(model))
    except GroundingOutputError:
        return []


def parse_grounding(
    text: str, width: int | None, height: int | None, style: GroundingStyle
) -> list[BoundingBox]:
    """The boxes in ``text`` in pixels of a ``width`` x ``height`` image. ``box_2d`` is read as
    Gemini's [ymin, xmin, ymax, xmax] on 0-1000, tags on 0-1000, ``bbox_2d`` in ``style``'s space.
    With no size, the boxes stay in the model's own coordinates (unscaled, unclamped)."""
    found = _json_boxes(text)
    if found is None:
        found = _keyed_boxes(text)
    if not found:
        found = _tag_boxes(text, _TAG)
    if not found and style is _QWEN2:
        found = _tag_boxes(text, _BARE_TAG)
    if not found:
        if re.search(r"bbox_2d|box_2d|<\|box_start\|>", text):
            raise _unreadable(text, "a box key or tag with no coordinates")
        return []
    boxes = [_to_pixels(key, values, label, width, height, style) for key, values, label in found]
    for box, (key, values, _) in zip(boxes, found, strict=True):
        given_area = values[0] != values[2] and values[1] != values[3]  # either order of axes
        if width is not None and given_area and (box.x1 == box.x2 or box.y1 == box.y2):
            # wholly outside the image: clamped, it was a point at the corner, "never a wrong box"
            raise _unreadable(text, f"a box outside the {width}x{height} image: {key} {json.dumps(values)}")
    return boxes


def _tag_boxes(text: str, pattern: re.Pattern[str]) -> list[tuple[str, list[float], str | None]]:
    return [
        ("tag", [float(m.group(g)) for g in "abcd"], (m.group("label") or "").strip() or None)
        for m in pattern.finditer(text)
    ]


def _json_boxes(text: str) -> list[tuple[str, list[float], str | None]] | None:
    """Boxes from the JSON values in ``text`` (fenced blocks first); None when none holds any."""
    decoder = json.JSONDecoder()
    for candidate in [m.group(1) for m in _FENCE.finditer(text)] + [text]:
        boxes: list[tuple[str, list[float], str | None]] = []
        i = 0
        while i < len(candidate):
            if candidate[i] not in "[{":
                i += 1
                continue
            try:
                value, end = decoder.raw_decode(candidate, i)
            except ValueError:
                i += 1
                continue
            boxes += _walk(value, text)
            i = end
        if boxes:
            return boxes
    return None


def _walk(value: Any, text: str) -> Any:
    if isinstance(value, list):
        for item in value:
            yield from _walk(item, text)
    elif isinstance(value, dict):
        for key in ("bbox_2d", "box_2d"):
            if key in value:
                label = value.get("label")
                yield key, _four(value[key], text), str(label) if label is not None else None
                return
        for item in value.values():
            yield from _walk(item, text)


def _keyed_boxes(text: str) -> list[tuple[str, list[float], str | None]]:
    """``"bbox_2d": [...]`` pairs in text that is not valid JSON (single quotes, a cut answer)."""
    out = []
    for match in _KEYED.finditer(text):
        raw = match.group(2)
        if not raw.endswith("]"):
            raise _unreadable(text, f"an unfinished {match.group(1)} list")
        try:
            values = json.loads(raw.replace("'", '"'))
        except ValueError:
            raise _unreadable(text, f"{match.group(1)} = {raw}") from None
        label = _LABEL_NEAR.search(text, match.end(), match.end() + 200)
        out.append((match.group(1), _four(values, text), label.group(1) if label else None))
    return out


def _four(values: Any, text: str) -> list[float]:
    ok = isinstance(values, list) and len(values) == 4
    if ok and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        numbers = [float(v) for v in values]
        if all(math.isfinite(v) for v in numbers):
            return numbers
    raise _unreadable(text, f"a box that is not four numbers: {json.dumps(values)[:80]}")


def _unreadable(text: str, what: str) -> GroundingOutputError:
    shown = text if len(text) <= 300 else text[:300] + "..."
    return GroundingOutputError(f"could not read boxes from the model's answer ({what}); received: {shown!r}")


def _to_pixels(
    key: str,
    values: list[float],
    label: str | None,
    width: int | None,
    height: int | None,
    style: GroundingStyle,
) -> BoundingBox:
    if key == "box_2d":  # Gemini: [ymin, xmin, ymax, xmax] on 0-1000
        y1, x1, y2, x2 = values
    else:
        x1, y1, x2, y2 = values
    if width is None or height is None:  # the model's own coordinates
        sx = sy = 1.0
    elif key in ("box_2d", "tag"):
        sx, sy = width / 1000, height / 1000
    else:
        sx, sy = _bbox_scale(style.bbox_space, width, height)
    xs = sorted((x1 * sx, x2 * sx))
    ys = sorted((y1 * sy, y2 * sy))

    def clamp(v: float, hi: int | None) -> float:
        return round(v if hi is None else min(max(v, 0.0), float(hi)), 1)

    return BoundingBox(
        x1=clamp(xs[0], width),
        y1=clamp(ys[0], height),
        x2=clamp(xs[1], width),
        y2=clamp(ys[1], height),
        label=label,
    )


def _bbox_scale(space: BoxSpace, width: int, height: int) -> tuple[float, float]:
    if space is BoxSpace.NORM_1000:
        return width / 1000, height / 1000
    if space is BoxSpace.QWEN_RESIZED:
        rh, rw = smart_resize(height, width)
        return width / rw, height / rh
    return 1.0, 1.0


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 16384
) -> tuple[int, int]:
    """Qwen2.5-VL's resize of an input image (its processor's ``smart_resize``): sides rounded to
    multiples of ``factor``, the area kept within [min_pixels, max_pixels]. Its pixel boxes are
    in this resized image."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


# --- image size -----------------------------------------------------------------------------------


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG, JPEG, GIF, WebP or BMP header, without decoding the image;
    ``InvalidInput`` for a header of no pixels (a 0x0 GIF had boxes found outside its size)."""
    width, height = _header_size(data)
    if width <= 0 or height <= 0:
        raise InvalidInput(f"the image's header says it is {width}x{height} pixels: it holds no picture")
    return width, height


def _header_size(data: bytes) -> tuple[int, int]:
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 13:
        return _gif_size(data)
    if data[:2] == b"BM" and len(data) >= 26:
        w, h = struct.unpack("<Ii", data[18:26])  # as PIL reads it: a negative width passed the
        return w, abs(h)  # size bound negative and PIL decoded 4294966656 px (a 500); h < 0: top-down
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        size = _webp_size(data)
        if size:
            return size
    if data[:2] == b"\xff\xd8":
        size = _jpeg_size(data)
        if size:
            return size
    raise InvalidInput("the image is not a PNG, JPEG, GIF, WebP or BMP file (or its header is cut)")


def _gif_size(data: bytes) -> tuple[int, int]:
    """A GIF's size as decoders take it: its logical screen, grown to hold every frame. A 107 KB
    GIF whose screen said 10x10 held a 12000x12000 frame: past the pixel bound unseen, decoded at
    900 MB, and its boxes clamped to 10x10."""
    width, height = struct.unpack("<HH", data[6:10])
    pos = 13 + _color_table(data[10])
    while pos < len(data):
        block = data[pos]
        if block == 0x21:  # an extension: its label, then data sub-blocks
            pos = _past_sub_blocks(data, pos + 2)
        elif block == 0x2C and pos + 10 <= len(data):  # a frame: where it lies, and how large
            left, top, w, h = struct.unpack("<HHHH", data[pos + 1 : pos + 9])
            width, height = max(width, left + w), max(height, top + h)
            pos = _past_sub_blocks(data, pos + 11 + _color_table(data[pos + 9]))  # + LZW code size
        else:  # the trailer (0x3B), or a file cut short
            break
    return width, height


def _color_table(flags: int) -> int:
    return 3 * (2 << (flags & 7)) if flags & 0x80 else 0


def _past_sub_blocks(data: bytes, pos: int) -> int:
    while pos < len(data):
        size = data[pos]
        pos += 1 + size
        if size == 0:
            break
    return pos


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30:
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


# Start-of-frame markers carry the size; DHT (C4), JPG (C8) and DAC (CC) share the range but not.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in _SOF:
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return w, h
        i += 2 + length
    return None
