"""The embedded OCR grounder: engine.ground against raw RapidOCR on the same image, same run.

    python benchmarks/ocr_grounding.py [--reps 5]

Draws two images (a 640x240 sign, a 1280x720 page of 12 text lines), then per image ``--reps``
pairs of runs of ``engine.ground`` (image decode, model lookup, OCR, matching) and of
``RapidOCR()(png_bytes, return_word_box=True)`` directly, after one warm-up each; which side runs
first alternates between pairs (on a busy machine the second of two runs was measured slower).
Prints the best run of each side and the ratio ours/raw per pair (1.00 = no overhead) as median,
min and max.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import statistics
import tempfile
import time

from car_inference.engine import InferenceEngine
from car_inference.requests import GroundRequest, ImageBlock

OCR = "rapidai/pp-ocrv4-mobile"


def sign() -> bytes:
    return _draw((640, 240), [((40, 40), "HELLO WORLD"), ((300, 150), "exit 42")])


def page() -> bytes:
    lines = [
        ((60, 40 + 55 * i), f"line {i}: the quick brown fox jumps over {i} lazy dogs") for i in range(12)
    ]
    return _draw((1280, 720), lines)


def _draw(size: tuple[int, int], texts: list[tuple[tuple[int, int], str]]) -> bytes:
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=36)
    for at, text in texts:
        draw.text(at, text, fill="black", font=font)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def bench(reps: int) -> list[tuple[str, str, list[float], list[float], int]]:
    """One event loop for the whole run, as in a server: its thread pool is made once."""
    from rapidocr_onnxruntime import RapidOCR

    raw_engine = RapidOCR()
    engine = InferenceEngine()
    rows = []
    try:
        for name, image, target in (("640x240", sign(), "exit 42"), ("1280x720", page(), "lazy dogs")):
            block = ImageBlock(data=base64.b64encode(image).decode())
            request = GroundRequest(prompt=target, image=block, model=OCR)
            result = await engine.ground(request)  # warm-up: loads the model
            raw_engine(image, return_word_box=True)
            ours: list[float] = []
            raw: list[float] = []
            for rep in range(reps):
                for side in (0, 1) if rep % 2 else (1, 0):  # which goes first alternates
                    start = time.perf_counter()
                    if side == 0:
                        result = await engine.ground(request)
                        ours.append(time.perf_counter() - start)
                    else:
                        raw_engine(image, return_word_box=True)
                        raw.append(time.perf_counter() - start)
            rows.append((name, target, ours, raw, len(result.boxes)))
    finally:
        engine.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    os.environ["CAR_HOME"] = tempfile.mkdtemp(prefix="car-bench-")
    rows = asyncio.run(bench(args.reps))
    print(f"{'image':10} {'target':10} {'ours ms':>8} {'raw ms':>8} {'ratio':>6} {'min / max':>12}  boxes")
    for name, target, ours, raw, boxes in rows:
        pairs = [o / r for o, r in zip(ours, raw, strict=True)]
        spread = f"{min(pairs):.2f} / {max(pairs):.2f}"
        print(
            f"{name:10} {target:10} {min(ours) * 1000:8.0f} {min(raw) * 1000:8.0f}"
            f" {statistics.median(pairs):6.2f} {spread:>12}  {boxes}"
        )
    print("ours ms, raw ms: the best run of each; ratio: ours / raw per pair of runs, the median pair")


if __name__ == "__main__":
    main()
