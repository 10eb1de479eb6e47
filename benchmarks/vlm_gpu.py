"""A pulled Qwen2.5-VL GGUF grounding one object, through the engine and through raw
llama-cpp-python, on a machine with a GPU (or, slowly, a CPU) and access to Hugging Face.

Pulls ``qwen2.5-vl-3b`` (ggml-org/Qwen2.5-VL-3B-Instruct-GGUF: the Q4_K_M model and its Q8_0
mmproj, about 2.8 GB) unless it is in the HF cache, draws a test image with one red rectangle at a
known place among other shapes, and asks for "the red rectangle": once through
``engine.ground`` (our prompt, our parser, pixels of the image) and once through
``llama_cpp.Llama`` + ``Qwen25VLChatHandler`` directly with the same prompt. Prints a table of
latency, the box found and its IoU with the truth; exits 1 when our box misses (IoU < 0.5), 2 when
nothing could be measured (no llama-cpp-python, no weights and no network).

    .venv/bin/python benchmarks/vlm_gpu.py [--n-gpu-layers -1] [--reps 3] [--no-pull]

llama-cpp-python must be built with CUDA for the GPU to be used
(CMAKE_ARGS="-DGGML_CUDA=on" pip install llama-cpp-python); a CPU build runs the same code.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import sys
import time
from typing import Any

from car_inference.catalog.locate import local_path
from car_inference.config import load_config
from car_inference.engine import InferenceEngine
from car_inference.errors import InferenceError
from car_inference.grounding import grounding_prompt, parse_grounding, style_for
from car_inference.requests import BoundingBox, GroundRequest, ImageBlock

MODEL = "qwen2.5-vl-3b"
TARGET = "the red rectangle"
TRUTH = (380.0, 220.0, 560.0, 330.0)  # x1, y1, x2, y2 of the red rectangle in the 640x480 image


def test_image() -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (640, 480), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    draw.ellipse((60, 60, 200, 200), fill=(30, 90, 220))  # a blue circle
    draw.rectangle((80, 300, 260, 420), fill=(40, 160, 60))  # a green rectangle
    draw.rectangle(TRUTH, fill=(220, 30, 30))  # the red rectangle
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def iou(box: BoundingBox | None) -> float:
    if box is None:
        return 0.0
    x1, y1, x2, y2 = TRUTH
    ix = max(0.0, min(box.x2, x2) - max(box.x1, x1))
    iy = max(0.0, min(box.y2, y2) - max(box.y1, y1))
    inter = ix * iy
    union = (box.x2 - box.x1) * (box.y2 - box.y1) + (x2 - x1) * (y2 - y1) - inter
    return inter / union if union > 0 else 0.0


def ours(engine: InferenceEngine, image: bytes, reps: int) -> tuple[float, BoundingBox | None, str]:
    request = GroundRequest(
        prompt=TARGET, image=ImageBlock(data=base64.b64encode(image).decode()), model=MODEL
    )
    asyncio.run(engine.ground(request))  # load the model and projector once, outside the timing
    best, result = float("inf"), None
    for _ in range(reps):
        start = time.perf_counter()
        result = asyncio.run(engine.ground(request))
        best = min(best, time.perf_counter() - start)
    assert result is not None
    return best, (result.boxes[0] if result.boxes else None), result.raw_text


def raw(
    engine: InferenceEngine, image: bytes, reps: int, n_gpu_layers: int
) -> tuple[float, BoundingBox | None, str]:
    """The same prompt and image straight through llama-cpp-python, parsed by our parser."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Qwen25VLChatHandler

    from car_inference.backends.vision import mmproj_path

    model = engine.resolve(MODEL)
    projector = mmproj_path(model)
    assert projector is not None
    llm = Llama(
        str(local_path(model)),
        chat_handler=Qwen25VLChatHandler(clip_model_path=str(projector), verbose=False),
        n_ctx=engine.config.local.n_ctx,
        n_gpu_layers=n_gpu_layers,
        verbose=False,
    )
    style = style_for(model)
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    messages: list[Any] = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": grounding_prompt(style, TARGET, 640, 480)},
            ],
        }
    ]
    best, text = float("inf"), ""
    for run in range(reps + 1):  # the first run warms up, as on our side
        start = time.perf_counter()
        answer = llm.create_chat_completion(messages=messages, temperature=0.0, max_tokens=1024)
        if run:
            best = min(best, time.perf_counter() - start)
        assert isinstance(answer, dict)  # not streamed
        text = answer["choices"][0]["message"]["content"] or ""
    boxes = parse_grounding(text, 640, 480, style)
    return best, (boxes[0] if boxes else None), text


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-gpu-layers", type=int, default=-1, help="layers on the GPU (-1: all)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-pull", action="store_true", help="use only what the HF cache holds")
    args = parser.parse_args()
    os.environ["CAR_LOCAL__N_GPU_LAYERS"] = str(args.n_gpu_layers)
    try:
        import llama_cpp  # noqa: F401
        import PIL  # noqa: F401
    except ImportError as exc:
        print(f"needs llama-cpp-python and Pillow: {exc}", file=sys.stderr)
        return 2
    engine = InferenceEngine(load_config())
    try:
        if not args.no_pull:
            print(f"pulling {MODEL} (skipped when cached)...", file=sys.stderr)
            try:
                print(f"  {engine.pull(MODEL)}", file=sys.stderr)
            except InferenceError as exc:
                print(f"cannot pull {MODEL}: {exc}", file=sys.stderr)
                return 2
        model = engine.resolve(MODEL)
        if not model.available:
            print(f"{MODEL} cannot run here: {engine.registry.unavailable_reason(model)}", file=sys.stderr)
            return 2
        image = test_image()
        rows = [("car-inference engine.ground", *ours(engine, image, args.reps))]
        rows.append(("raw llama-cpp-python", *raw(engine, image, args.reps, args.n_gpu_layers)))
    finally:
        engine.close()
    print(f"\n{MODEL}, target {TARGET!r}, truth {TRUTH}, n_gpu_layers {args.n_gpu_layers}\n")
    print(f"{'path':30} {'best s':>8} {'IoU':>6}  box")
    for name, seconds, box, _ in rows:
        shown = f"({box.x1:g}, {box.y1:g}, {box.x2:g}, {box.y2:g})" if box else "none"
        print(f"{name:30} {seconds:8.2f} {iou(box):6.2f}  {shown}")
    print(f"\nratio ours/raw latency: {rows[0][1] / rows[1][1]:.2f}")
    print(f"our raw answer: {rows[0][3]!r}")
    return 0 if iou(rows[0][2]) >= 0.5 else 1


if __name__ == "__main__":
    sys.exit(main())
