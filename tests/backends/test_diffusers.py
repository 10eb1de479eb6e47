"""The diffusers backend end to end through the engine, on tiny random-weight pipelines built in
the test (Stable Diffusion for images, LTX-Video for video): real pipeline code, real files out."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict

import av
import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from car_inference.backends.diffusers import pick_device
from car_inference.backends.fair import CLIENT
from car_inference.engine import InferenceEngine
from car_inference.errors import InvalidInput, ModelUnavailable, UnsupportedMode
from car_inference.requests import GenerateImageRequest, GenerateVideoRequest, VideoMode
from car_inference.schema import DiffusersSource, ModelCapability, ModelSchema, OpenAISource
from fakes.tiny_diffusers import build_ltx, build_sd, media_model

SD = "test/tiny-sd"
LTX = "test/tiny-ltx"


class _ImageBase(TypedDict):
    prompt: str
    model: str
    width: int
    height: int
    seed: int


class _VideoBase(_ImageBase):
    fps: int
    duration_s: float


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {"sd": build_sd(root / "sd"), "ltx": build_ltx(root / "ltx")}


@pytest.fixture
def engine(pipelines: dict[str, Path]) -> InferenceEngine:
    engine = InferenceEngine()
    engine.register_model(
        media_model(SD, pipelines["sd"], "image_generation", default_params={"steps": 2, "guidance": 1.5})
    )
    engine.register_model(media_model(LTX, pipelines["ltx"], "video_generation", default_params={"steps": 2}))
    return engine


def _png(path: str) -> Image.Image:
    data = Path(path).read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return Image.open(io.BytesIO(data))


async def test_image_is_a_png_of_the_requested_size_and_a_seed_repeats_it(
    engine: InferenceEngine, tmp_path: Path
) -> None:
    def request(name: str, seed: int) -> GenerateImageRequest:
        return GenerateImageRequest(
            prompt="a red apple", model=SD, width=128, height=64, seed=seed, output_path=str(tmp_path / name)
        )

    first = await engine.generate_image(request("a.png", 7))
    again = await engine.generate_image(request("b.png", 7))
    other = await engine.generate_image(request("c.png", 8))
    assert first.model_used == SD and first.media_type == "image/png" and first.seed == 7
    assert _png(first.image_path).size == (128, 64) and (first.width, first.height) == (128, 64)
    assert Path(first.image_path).read_bytes() == Path(again.image_path).read_bytes()
    assert Path(first.image_path).read_bytes() != Path(other.image_path).read_bytes()


async def test_steps_guidance_negative_prompt_and_variants_reach_the_pipeline(
    engine: InferenceEngine, tmp_path: Path
) -> None:
    seen: list[tuple[int, int]] = []
    base: _ImageBase = {"prompt": "a cat", "model": SD, "width": 64, "height": 64, "seed": 3}
    plain = await engine.generate_image(GenerateImageRequest(**base, output_path=str(tmp_path / "p.png")))
    variants = GenerateImageRequest(
        **base,
        steps=3,
        guidance=4.0,
        negative_prompt="blue",
        variant_count=2,
        format="webp",
        output_path=str(tmp_path / "v.webp"),
    )
    result = await engine.generate_image(variants, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 6), (2, 6), (3, 6), (4, 6), (5, 6), (6, 6)]  # both images' steps
    assert result.image_paths == [str(tmp_path / "v.webp"), str(tmp_path / "v-2.webp")]
    images = [Image.open(p) for p in result.image_paths]
    assert all(i.format == "WEBP" and i.size == (64, 64) for i in images)
    assert np.asarray(images[0]).tobytes() != np.asarray(images[1]).tobytes()
    assert result.media_type == "image/webp"
    assert Path(plain.image_path).is_file()
    # Variant i is the picture seed + i gives alone.
    second = {"seed": 4, "variant_count": None, "output_path": str(tmp_path / "alone.webp")}
    alone = await engine.generate_image(variants.model_copy(update=second))
    assert np.asarray(Image.open(alone.image_path)).tobytes() == np.asarray(images[1]).tobytes()


async def test_another_clients_picture_goes_between_variants(engine: InferenceEngine, tmp_path: Path) -> None:
    """Client A asks for four variants, client B for one picture while A's first is made: B's
    picture is made after A's first variant, not after all four (``fair.FairExecutor``)."""
    order: list[str] = []
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    def progress_of(who: str) -> Callable[[int, int], None]:
        def progress(done: int, total: int) -> None:
            if done == total or (who == "A" and done % 20 == 0):
                order.append(f"{who}{done}")
            loop.call_soon_threadsafe(started.set)

        return progress

    async def as_client(client: str, request: GenerateImageRequest, who: str) -> None:
        CLIENT.set(client)
        await engine.generate_image(request, progress=progress_of(who))

    def picture(prompt: str, steps: int, count: int | None) -> GenerateImageRequest:
        path = str(tmp_path / f"{prompt}.png")
        return GenerateImageRequest(
            prompt=prompt, model=SD, width=64, height=64, steps=steps, variant_count=count, output_path=path
        )

    big, small = picture("a", 20, 4), picture("b", 2, None)
    first = asyncio.create_task(as_client("client-a", big, "A"))
    await started.wait()
    await as_client("client-b", small, "B")
    await first
    assert "A40" in order and order.index("B2") < order.index("A40"), order  # before A's second ended
    assert order[-1] == "A80"


async def test_without_a_seed_the_result_names_the_one_used(engine: InferenceEngine, tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    result = await engine.generate_image(GenerateImageRequest(prompt="sky", model=SD, width=64, height=64))
    assert result.seed is not None and Path(result.image_path).is_file()
    again = await engine.generate_image(
        GenerateImageRequest(
            prompt="sky", model=SD, width=64, height=64, seed=result.seed, output_path=str(out)
        )
    )
    assert again.seed == result.seed and Path(result.image_path).read_bytes() == out.read_bytes()
    Path(result.image_path).unlink()


async def test_an_image_to_edit_runs_the_image_to_image_pipeline(
    engine: InferenceEngine, tmp_path: Path
) -> None:
    source = tmp_path / "in.png"
    Image.new("RGB", (96, 64), (200, 30, 30)).save(source)
    result = await engine.generate_image(
        GenerateImageRequest(
            prompt="make it blue",
            model=SD,
            image_paths=[str(source)],
            seed=1,
            output_path=str(tmp_path / "o.png"),
        )
    )
    assert _png(result.image_path).size == (96, 64)
    with pytest.raises(UnsupportedMode, match="mask"):
        await engine.generate_image(
            GenerateImageRequest(prompt="x", model=SD, image_paths=[str(source)], mask_path=str(source))
        )
    with pytest.raises(InvalidInput, match="cannot read the image"):
        await engine.generate_image(GenerateImageRequest(prompt="x", model=SD, image_paths=[str(tmp_path)]))


async def test_an_image_to_edit_is_bounded_before_it_is_decoded(
    engine: InferenceEngine, tmp_path: Path
) -> None:
    """A 20,000-pixel PNG of a megabyte was a traceback (PIL's DecompressionBombError) and a 500
    from the server; a 12,000 x 64 one was edited at that size (211 s, 788 MB on the tiny
    pipeline), past the 8,192-pixel bound of every request; a size the model cannot make was
    rounded for an edit, refused for a new picture."""
    bomb, big = tmp_path / "bomb.png", tmp_path / "big.png"
    Image.new("1", (20000, 20000)).save(bomb)  # past PIL's own bound
    Image.new("1", (9000, 9000)).save(big)  # under PIL's, over ours
    wide = tmp_path / "wide.png"
    Image.new("RGB", (12000, 64)).save(wide)
    small = tmp_path / "small.png"
    Image.new("RGB", (96, 64)).save(small)
    with pytest.raises(InvalidInput, match=r"cannot read the image .*could be decompression bomb"):
        await engine.generate_image(GenerateImageRequest(prompt="x", model=SD, image_paths=[str(bomb)]))
    with pytest.raises(InvalidInput, match="is 9000x9000: at most 67,108,864 pixels") as too_big:
        await engine.generate_image(
            GenerateImageRequest(prompt="x", model=SD, image_paths=[str(big)], width=64, height=64)
        )
    assert too_big.value.param == "image"
    with pytest.raises(InvalidInput, match="more than 8192 pixels a side: ask for a size"):
        await engine.generate_image(GenerateImageRequest(prompt="x", model=SD, image_paths=[str(wide)]))
    made = await engine.generate_image(
        GenerateImageRequest(
            prompt="x", model=SD, image_paths=[str(wide)], width=128, height=64,
            output_path=str(tmp_path / "w.png"),
        )
    )  # fmt: skip
    assert _png(made.image_path).size == (128, 64), "with a size asked for, it is edited at that size"
    with pytest.raises(InvalidInput, match="multiples of 2 pixels, not 65x64"):
        await engine.generate_image(
            GenerateImageRequest(prompt="x", model=SD, image_paths=[str(small)], width=65, height=64)
        )


async def test_a_progress_callback_that_raises_is_the_callers_error(engine: InferenceEngine) -> None:
    """Its ValueError was read as the pipeline refusing the input: InvalidInput from the model,
    and a routed request went on to the next model (perhaps a paid one)."""

    def broken(done: int, total: int) -> None:
        raise ValueError("my progress bar broke")

    request = GenerateImageRequest(prompt="x", model=SD, width=64, height=64, steps=2)
    with pytest.raises(ValueError, match="my progress bar broke") as info:
        await engine.generate_image(request, progress=broken)
    assert not isinstance(info.value, InvalidInput)


async def test_bad_input_is_invalid_input(engine: InferenceEngine, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="multiples of 2 pixels, not 65x64"):
        await engine.generate_image(GenerateImageRequest(prompt="x", model=SD, width=65, height=64))
    with pytest.raises(ValidationError, match="less than or equal to 9223372036854775807"):
        # Video requests bound their seed on validation, as image requests do (64-bit).
        GenerateVideoRequest(prompt="x", model=LTX, width=64, height=64, seed=2**70)
    with pytest.raises(InvalidInput, match="does not exist"):
        await engine.generate_image(
            GenerateImageRequest(prompt="x", model=SD, output_path=str(tmp_path / "no" / "x.png"))
        )


async def test_video_is_an_mp4_with_the_frames_size_and_seed_asked_for(
    engine: InferenceEngine, tmp_path: Path
) -> None:
    seen: list[tuple[int, int]] = []

    def request(name: str, seed: int) -> GenerateVideoRequest:
        return GenerateVideoRequest(
            prompt="a dog on the moon",
            model=LTX,
            width=64,
            height=64,
            fps=8,
            duration_s=1.0,
            seed=seed,
            output_path=str(tmp_path / name),
        )

    first = await engine.generate_video(request("a.mp4", 5), progress=lambda d, t: seen.append((d, t)))
    again = await engine.generate_video(request("b.mp4", 5))
    other = await engine.generate_video(request("c.mp4", 6))
    assert seen == [(1, 2), (2, 2)]
    # 8 frames asked for; the tiny VAE compresses time 4x, so the pipeline makes 4k + 1 = 9.
    assert (first.frames, first.width, first.height, first.seed) == (9, 64, 64, 5)
    assert first.media_type == "video/mp4" and first.duration_s == pytest.approx(9 / 8)
    decoded = _frames(first.video_path)
    assert decoded.shape == (9, 64, 64, 3)
    assert np.array_equal(decoded, _frames(again.video_path))
    assert not np.array_equal(decoded, _frames(other.video_path))


async def test_video_as_gif(engine: InferenceEngine, tmp_path: Path) -> None:
    result = await engine.generate_video(
        GenerateVideoRequest(
            prompt="blue sky", model=LTX, width=64, height=64, fps=8, duration_s=0.5, format="gif",
            output_path=str(tmp_path / "v.gif"),
        )
    )  # fmt: skip
    assert Path(result.video_path).read_bytes()[:6] in (b"GIF89a", b"GIF87a")
    assert result.media_type == "image/gif"


async def test_video_sizes_must_fit_the_model(engine: InferenceEngine) -> None:
    # The tiny LTX VAE downsamples 4x in space: 70 pixels cannot be made.
    with pytest.raises(InvalidInput, match="multiples of 4 pixels"):
        await engine.generate_video(GenerateVideoRequest(prompt="x", model=LTX, width=70, height=64))


async def test_a_video_shorter_than_the_least_the_model_makes_is_refused(engine: InferenceEngine) -> None:
    """0.1 s at 1 fps made 5 s (the least frames the VAE makes, at 1 a second): refused, saying
    the shortest it makes; a length the least frames are nearest to is still made."""
    with pytest.raises(InvalidInput, match=r"at least 5 frames, 5 s at 1 fps, not 0.1 s"):
        await engine.generate_video(
            GenerateVideoRequest(prompt="x", model=LTX, width=64, height=64, fps=1, duration_s=0.1)
        )


async def test_no_model_named_picks_an_available_one(engine: InferenceEngine, tmp_path: Path) -> None:
    image = await engine.generate_image(
        GenerateImageRequest(prompt="x", width=64, height=64, output_path=str(tmp_path / "i.png"))
    )
    video = await engine.generate_video(
        GenerateVideoRequest(
            prompt="x", width=64, height=64, fps=4, duration_s=1, output_path=str(tmp_path / "v.mp4")
        )
    )
    assert (image.model_used, video.model_used) == (SD, LTX)


async def test_a_pipeline_loads_once_through_the_model_cache(engine: InferenceEngine) -> None:
    assert await engine.warm_up([SD]) == [None]
    loaded = engine.cache.get(f"diffusers:{SD}")
    results = await asyncio.gather(
        *(
            engine.generate_image(GenerateImageRequest(prompt="x", model=SD, width=64, height=64))
            for _ in range(2)
        )
    )
    assert engine.cache.keys() == [f"diffusers:{SD}"] and engine.cache.get(f"diffusers:{SD}") is loaded
    assert loaded is not None and loaded.instance.device == pick_device()
    for result in results:
        Path(result.image_path).unlink()


def test_a_pipeline_not_on_disk_says_how_to_get_it(tmp_path: Path) -> None:
    engine = InferenceEngine()
    pulled = ModelSchema(
        id="stabilityai/sd-turbo-test",
        name="sd-turbo-test",
        provider="stabilityai",
        capabilities=[ModelCapability.IMAGE_GENERATION],
        source=DiffusersSource(hf_repo="stabilityai/not-pulled-here"),
    )
    schema = engine.register_model(pulled)
    assert not schema.available
    with pytest.raises(ModelUnavailable, match="car models pull stabilityai/sd-turbo-test"):
        asyncio.run(engine.generate_image(GenerateImageRequest(prompt="x", model=schema.id)))


def _frames(path: str) -> np.ndarray:
    with av.open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


async def test_a_caller_that_stops_waiting_stops_the_pipeline(engine: InferenceEngine) -> None:
    steps: list[int] = []
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    def progress(done: int, total: int) -> None:
        steps.append(done)
        loop.call_soon_threadsafe(started.set)

    request = GenerateImageRequest(prompt="x", model=SD, width=64, height=64, steps=500)
    task = asyncio.create_task(engine.generate_image(request, progress=progress))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    entry = engine.cache.get(f"diffusers:{SD}")
    assert entry is not None and await asyncio.to_thread(entry.lock.acquire, timeout=10)
    entry.lock.release()
    assert len(steps) < 500  # it stopped at the next step, not after all of them


def test_with_no_model_named_quality_decides_unless_local_is_preferred(engine: InferenceEngine) -> None:
    hosted = ModelSchema(
        id="host/painter",
        name="painter",
        provider="host",
        capabilities=[ModelCapability.IMAGE_GENERATION],
        quality=0.9,
        source=OpenAISource(base_url="http://127.0.0.1:9/v1", needs_key=False),
    )
    engine.register_model(hosted)
    engine.register_model(engine.resolve(SD).model_copy(update={"quality": 0.3}))
    assert engine.media_model(None, ModelCapability.IMAGE_GENERATION).id == "host/painter"
    engine.config.routing.prefer_local = True
    assert engine.media_model(None, ModelCapability.IMAGE_GENERATION).id == SD
    # A named model is used as named, and one that cannot do the task is refused, not replaced.
    assert engine.media_model("painter", ModelCapability.IMAGE_GENERATION).id == "host/painter"
    with pytest.raises(UnsupportedMode, match="does not declare video_generation"):
        engine.media_model(SD, ModelCapability.VIDEO_GENERATION)


async def test_video_from_an_image_runs_the_image_to_video_pipeline(
    engine: InferenceEngine, tmp_path: Path
) -> None:
    picture = tmp_path / "first.png"
    Image.new("RGB", (80, 48), (250, 200, 0)).save(picture)
    base: _VideoBase = {
        "prompt": "it moves",
        "model": LTX,
        "width": 64,
        "height": 64,
        "fps": 8,
        "duration_s": 1.0,
        "seed": 4,
    }
    from_image = await engine.generate_video(
        GenerateVideoRequest(
            **base,
            mode=VideoMode.IMAGE_TO_VIDEO,
            image_path=str(picture),
            output_path=str(tmp_path / "i.mp4"),
        )
    )
    from_text = await engine.generate_video(GenerateVideoRequest(**base, output_path=str(tmp_path / "t.mp4")))
    frames = _frames(from_image.video_path)
    assert frames.shape == (9, 64, 64, 3) and from_image.frames == 9
    assert not np.array_equal(frames, _frames(from_text.video_path))  # the image conditioned it
    with pytest.raises(UnsupportedMode, match="audio"):
        await engine.generate_video(
            GenerateVideoRequest(
                prompt="x", model=LTX, mode=VideoMode.AUDIO_TO_VIDEO, audio_path=str(picture)
            )
        )


async def test_every_pipeline_call_runs_on_one_thread(engine: InferenceEngine) -> None:
    """Images and videos asked for at once run one after another on one thread: torch keeps an
    OpenMP pool per calling thread, and calls spread over the model pool left a pool each (and two
    pipelines loading at once on two threads failed: "Unsupported device type 'meta'")."""
    threads: set[str] = set()

    def progress(done: int, total: int) -> None:
        threads.add(threading.current_thread().name)

    images = [GenerateImageRequest(prompt="a cat", model=SD, width=64, height=64, seed=i) for i in range(3)]
    videos = [
        GenerateVideoRequest(prompt="a dog", model=LTX, width=64, height=64, fps=8, duration_s=0.5, seed=i)
        for i in range(2)
    ]
    results = await asyncio.gather(
        *(engine.generate_image(r, progress=progress) for r in images),
        *(engine.generate_video(r, progress=progress) for r in videos),
    )
    assert len(results) == 5 and len(threads) == 1, threads
    assert next(iter(threads)).startswith("car-diffusers")
