"""The embedded grounding default: boxes for text targets by OCR (RapidOCR, PP-OCRv4 mobile on
onnxruntime; its 15 MB of weights ship inside the ``rapidocr-onnxruntime`` package).

OCR reads every line of text with its box and, per character, a box of its own; grounding a
target finds it in the lines read (case and spaces ignored) and returns the box of exactly the
characters matched, else the whole line when the line is close to the target (a misread letter).
It finds text, not objects: "the red car" finds nothing unless the words are painted on it.
"""

from __future__ import annotations

import difflib
import io
import re
import time
from typing import Any

from ..catalog.locate import local_path
from ..errors import InferenceError, InferenceFailed, InvalidInput
from ..requests import BoundingBox, GroundRequest, GroundResult
from ..schema import ModelSchema
from .base import BackendContext, run_blocking

__all__ = ["RapidOcrBackend", "match_text"]

# A line this close to the target (difflib ratio) is a match though no substring is exact.
FUZZY_RATIO = 0.8
EVERY_LINE = "*"  # the target that asks for every line read
VISION_HINT = "car models pull qwen2.5-vl-3b, or a Gemini key"
# 'the sign that says "EXIT"': the quoted words are the text to find.
_QUOTED = re.compile(r'"([^"]+)"|“([^”]+)”')

# One OCR line as RapidOCR returns it with return_word_box: (quad, text, score, word quads, words, ...).
Line = tuple[Any, ...]


class RapidOcrBackend:
    kind = "rapidocr"

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx

    def _engine(self, model: ModelSchema) -> Any:
        local_path(model)  # the package and its model folder are there, or ModelUnavailable says why
        size = model.cost.size_mb or 16

        def load() -> Any:
            from rapidocr_onnxruntime import RapidOCR

            return RapidOCR()

        return self.ctx.cache.get_or_load(f"rapidocr:{model.id}", size, load)

    def warm_up(self, model: ModelSchema) -> None:
        self._engine(model)

    async def ground(self, model: ModelSchema, request: GroundRequest, image: bytes) -> GroundResult:
        from ..grounding import image_size

        width, height = image_size(image)

        def work() -> list[Line]:
            picture = _picture(image, (width, height))
            entry = self._engine(model)
            with entry.lock:
                try:
                    lines, _ = entry.instance(picture, return_word_box=True)
                except Exception as exc:  # onnxruntime and OpenCV raise their own types
                    raise _failure(model, image, (width, height), exc) from exc
            return list(lines or [])

        start = time.perf_counter()
        lines = await run_blocking(work)
        boxes = match_text(lines, request.prompt)
        read = "; ".join(str(line[1]) for line in lines) or "(no text)"
        summary = f"text read in {(time.perf_counter() - start) * 1000:.0f} ms: {read}"
        if not boxes:
            summary += f" ({model.id} finds text; for objects use a vision model: {VISION_HINT})"
        return GroundResult(boxes=boxes, raw_text=summary, model_used=model.id, width=width, height=height)


def _picture(image: bytes, size: tuple[int, int]) -> Any:
    """The caller's image decoded whole, in a mode the OCR reads as colours: RapidOCR took a
    palette image's (a GIF's) indices for grey levels and read no text in it, and a JPEG cut
    short failed inside it as the model's fault (a 500); here it is the caller's (a 400)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(image)) as opened:
            opened.load()
            if opened.mode in ("RGB", "RGBA", "L", "LA"):
                return opened.copy()
            alpha = opened.mode in ("PA", "P") and "transparency" in opened.info
            return opened.convert("RGBA" if alpha or opened.mode == "PA" else "RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        cut = ": it is cut short" if "truncated" in str(exc) else ""  # PIL's other words name a BytesIO
        raise InvalidInput(
            f"the image cannot be decoded{cut} (its header says {size[0]}x{size[1]} px)"
        ) from None


def _failure(model: ModelSchema, image: bytes, size: tuple[int, int], exc: Exception) -> InferenceError:
    """What an OCR failure was: the caller's image when it does not decode, or has a shape the
    OCR cannot scale (RapidOCR's ResizeImgError, with no message, for 1x60000 px), each a 400;
    otherwise the model's failure."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(image)) as opened:
            opened.verify()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError):
        return InvalidInput(f"the image cannot be decoded (its header says {size[0]}x{size[1]} px)")
    if type(exc).__name__ == "ResizeImgError":
        return InvalidInput(f"the image's shape ({size[0]}x{size[1]} px) is one the OCR cannot scale")
    return InferenceFailed(f"{model.id}: OCR failed: {str(exc) or type(exc).__name__}")


def match_text(lines: list[Line], target: str) -> list[BoundingBox]:
    """The boxes of ``target`` in OCR ``lines``: each exact occurrence (case and spaces ignored)
    as the union of its characters' boxes, else each line within FUZZY_RATIO of the target."""
    if target.strip() == EVERY_LINE:
        return [_box(line[0], line) for line in lines]
    quoted = [a or b for a, b in _QUOTED.findall(target)]
    if quoted:
        return [box for text in quoted for box in match_text(lines, text)]
    wanted = _norm(target)
    if not wanted:
        return []
    exact: list[BoundingBox] = []
    for line in lines:
        exact += _occurrences(line, wanted)
    if exact:
        return exact
    return [
        _box(line[0], line)
        for line in lines
        if difflib.SequenceMatcher(None, wanted, _norm(str(line[1]))).ratio() >= FUZZY_RATIO
    ]


def _occurrences(line: Line, wanted: str) -> list[BoundingBox]:
    chars, owners = _characters(line)
    joined = "".join(chars)
    found, start = [], joined.find(wanted)
    while start >= 0:
        if owners is None:  # no per-character boxes: the line's
            found.append(_box(line[0], line))
            break
        quads = [line[3][i] for i in dict.fromkeys(owners[start : start + len(wanted)])]
        found.append(_box([point for quad in quads for point in quad], line))
        start = joined.find(wanted, start + len(wanted))
    return found


def _characters(line: Line) -> tuple[list[str], list[int] | None]:
    """The line's characters (normalised) and, per character, the index of the word box holding
    it; None when RapidOCR gave no word boxes that cover the line."""
    if len(line) >= 5 and line[3] and len(line[3]) == len(line[4]):
        chars, owners = [], []
        for index, word in enumerate(line[4]):
            for ch in _norm(str(word)):
                chars.append(ch)
                owners.append(index)
        if "".join(chars) == _norm(str(line[1])):
            return chars, owners
    return list(_norm(str(line[1]))), None


def _norm(text: str) -> str:
    return "".join(text.split()).casefold()


def _box(points: Any, line: Line) -> BoundingBox:
    xs = [float(p[0]) for p in points]
    ys = [float(p[1]) for p in points]
    return BoundingBox(
        x1=min(xs), y1=min(ys), x2=max(xs), y2=max(ys), label=str(line[1]), score=round(float(line[2]), 4)
    )
