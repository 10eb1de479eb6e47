"""Image and video generation: what car-inference adds to a diffusers pipeline call, same run.

    python benchmarks/media.py [--reps 5] [--pipeline PATH] [--size 64] [--steps 2]

Without ``--pipeline`` it builds the tests' tiny random-weight Stable Diffusion and LTX-Video
pipelines (no download), where the pipeline itself takes milliseconds and any overhead of ours
shows; with a pulled folder (e.g. SD-Turbo's snapshot) it measures a real model. Rows:

  image   engine.generate_image (PNG file written) / raw pipeline call + PIL PNG save
  video   engine.generate_video (mp4 written) / raw pipeline call + the same PyAV encoding

Both sides run the same pipeline object settings (same steps, size, seed, CPU float32) on the
same thread (the engine's diffusers thread: a pipeline ran 28-45 % slower once calls had landed on
several threads, and the raw side on the event loop's thread came out 20 % "slower" than ours);
runs alternate; each side's min / median / max of ``--reps``, the ratio of the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from car_inference.backends.diffusers import DIFFUSERS_THREAD
from car_inference.backends.media_files import encode_video
from car_inference.config import CarConfig
from car_inference.engine import InferenceEngine
from car_inference.requests import GenerateImageRequest, GenerateVideoRequest
from fakes.tiny_diffusers import build_ltx, build_sd, media_model


async def alternate(
    ours: Callable[[], Awaitable[Any]], raw: Callable[[], Any], reps: int
) -> tuple[list[float], list[float]]:
    """Each side's milliseconds over ``reps`` runs, the two taking turns; ``raw`` runs on the
    engine's diffusers thread, as ours does."""
    ours_times, raw_times = [], []
    for _ in range(reps):
        start = time.perf_counter()
        await ours()
        ours_times.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        DIFFUSERS_THREAD.submit(raw).result()
        raw_times.append((time.perf_counter() - start) * 1000)
    return ours_times, raw_times


def spread(values: list[float]) -> str:
    return f"{min(values):.1f} / {statistics.median(values):.1f} / {max(values):.1f} ms"


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--pipeline", type=Path, help="a pulled image pipeline folder (default: tiny)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()

    import torch
    from diffusers import DiffusionPipeline

    work = Path(tempfile.mkdtemp(prefix="car-bench-media-"))
    image_dir = args.pipeline or build_sd(work / "sd")
    video_dir = build_ltx(work / "ltx")
    engine = InferenceEngine(CarConfig(home=work / "home"))
    engine.register_model(media_model("bench/image", image_dir, "image_generation"))
    engine.register_model(media_model("bench/video", video_dir, "video_generation"))
    raw_image = DiffusionPipeline.from_pretrained(str(image_dir), dtype=torch.float32).to("cpu")
    raw_video = DiffusionPipeline.from_pretrained(str(video_dir), dtype=torch.float32).to("cpu")
    for pipe in (raw_image, raw_video):
        pipe.set_progress_bar_config(disable=True)
    size, steps = args.size, args.steps

    def raw_image_call() -> None:
        generator = torch.Generator("cpu").manual_seed(1)
        image = raw_image(
            "a red apple", width=size, height=size, num_inference_steps=steps, generator=generator
        )
        image.images[0].save(work / "raw.png")

    def raw_video_call() -> None:
        generator = torch.Generator("cpu").manual_seed(1)
        out = raw_video(
            "a dog", width=64, height=64, num_frames=9, frame_rate=8, num_inference_steps=2,
            generator=generator, output_type="np",
        )  # fmt: skip
        frames = [(f.clip(0, 1) * 255).round().astype("uint8") for f in out.frames[0]]
        (work / "raw.mp4").write_bytes(encode_video(frames, 8, "mp4"))

    image_request = GenerateImageRequest(
        prompt="a red apple", model="bench/image", width=size, height=size, steps=steps, seed=1,
        output_path=str(work / "ours.png"),
    )  # fmt: skip
    video_request = GenerateVideoRequest(
        prompt="a dog", model="bench/video", width=64, height=64, fps=8, duration_s=1.0, steps=2, seed=1,
        output_path=str(work / "ours.mp4"),
    )  # fmt: skip
    await engine.generate_image(image_request)  # load both once, outside the timing
    await engine.generate_video(video_request)
    DIFFUSERS_THREAD.submit(raw_image_call).result()
    DIFFUSERS_THREAD.submit(raw_video_call).result()

    ours, raw = await alternate(lambda: engine.generate_image(image_request), raw_image_call, args.reps)
    rows = [(f"image {size}x{size}, {steps} steps", ours, raw)]
    ours, raw = await alternate(lambda: engine.generate_video(video_request), raw_video_call, args.reps)
    rows.append(("video 64x64, 9 frames, 2 steps", ours, raw))
    print(
        "| measure | car-inference (min / median / max) | raw diffusers (min / median / max) | added"
        " (medians) | ratio (medians) |\n| --- | --- | --- | --- | --- |"
    )
    for name, ours_ms, raw_ms in rows:
        ours_mid, raw_mid = statistics.median(ours_ms), statistics.median(raw_ms)
        added, ratio = ours_mid - raw_mid, ours_mid / raw_mid
        print(f"| {name} | {spread(ours_ms)} | {spread(raw_ms)} | {added:+.1f} ms | {ratio:.3f} |")
    engine.close()


if __name__ == "__main__":
    asyncio.run(main())
