"""Image and video generation in-process with diffusers pipelines.

A model is a pipeline folder (``model_index.json`` plus one folder per component): a pulled
Hugging Face snapshot or a local path. ``DiffusionPipeline`` picks the class the folder names
(StableDiffusion for SD-Turbo, Flux, LTX, Wan...), so a new family needs no code here. Pipelines
load only from disk (``local_files_only``), through the shared loaded-model cache, on CUDA or
MPS when present and otherwise on the CPU (in float32: half precision on a CPU is slow or
unsupported).

What the request says goes to the pipeline under the names its ``__call__`` takes: steps
(``num_inference_steps``), guidance (``guidance_scale``), the negative prompt, size, seed (a CPU
``torch.Generator``, so a seed gives the same picture on every device) and, for video, frames
and frame rate. A value the request set that the pipeline cannot take is ``UnsupportedMode``,
never dropped; the model's ``default_params`` (steps, guidance, width, height, fps,
duration_s) fill what the request left out. With ``image_paths`` an image pipeline runs as its
image-to-image sibling (``AutoPipelineForImage2Image``), and with ``image_path`` a video pipeline
as its image-to-video sibling, on the same loaded components.

Several images (``variant_count``) are one pipeline call each, variant i seeded with seed + i:
each call is a turn on the model, so another client's picture does not wait for all of them,
and a variant a user likes is the picture a single request with its seed gives again.
"""

from __future__ import annotations

import functools
import inspect
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..catalog.locate import local_path
from ..errors import DeviceError, InferenceFailed, InvalidInput, UnsupportedMode
from ..requests import GenerateImageRequest, GenerateImageResult, GenerateVideoRequest, GenerateVideoResult
from ..requests_media import MAX_PIXELS_SIDE
from ..schema import DiffusersSource, ModelSchema
from .base import BackendContext, openmp_thread, run_blocking, run_stoppable
from .cache import CachedModel
from .media_files import (
    IMAGE_MEDIA_TYPES,
    VIDEO_MEDIA_TYPES,
    encode_video,
    image_bytes,
    output_path,
    variant_path,
    write_atomic,
)

__all__ = ["DiffusersBackend", "Progress", "pick_device"]

Progress = Callable[[int, int], None]  # (steps done, steps in all), called from the worker thread

# Our request fields -> the pipeline's keyword, for the values a caller may set.
_PARAM_NAMES = {
    "negative_prompt": "negative_prompt",
    "steps": "num_inference_steps",
    "guidance": "guidance_scale",
}


class _Stopped(Exception):
    """Raised inside the step callback when nobody waits for the result any more."""


@dataclass
class _Loaded:
    pipe: Any
    device: str


def pick_device() -> str:
    """cuda, then mps, then cpu."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def _quiet() -> None:
    """No download or per-step progress bars and no advice about accelerate on the user's terminal."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - a pipeline without a transformers text encoder
        pass


def _folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


class DiffusersBackend:
    kind = "diffusers"

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx

    # --- loading -------------------------------------------------------------------------------

    def _entry(self, model: ModelSchema) -> CachedModel:
        path = local_path(model)

        def load() -> _Loaded:
            import torch
            from diffusers import DiffusionPipeline

            _quiet()
            device = pick_device()
            source = model.source
            wanted = source.dtype if isinstance(source, DiffusersSource) and source.dtype else "float16"
            dtype = torch.float32 if device == "cpu" else getattr(torch, wanted, torch.float16)
            try:
                pipe = DiffusionPipeline.from_pretrained(str(path), dtype=dtype, local_files_only=True)
                pipe.to(device)
            except (OSError, ValueError, ImportError, AttributeError, KeyError, RuntimeError) as exc:
                raise InferenceFailed(f"could not load {model.id} from {path}: {exc}") from exc
            pipe.set_progress_bar_config(disable=True)
            return _Loaded(pipe, device)

        size = model.cost.size_mb or _folder_mb(path)
        return self.ctx.cache.get_or_load(f"diffusers:{model.id}", size, load)

    def warm_up(self, model: ModelSchema) -> None:
        self._entry(model)

    # --- tasks ---------------------------------------------------------------------------------

    async def generate_image(
        self, model: ModelSchema, request: GenerateImageRequest, progress: Progress | None = None
    ) -> GenerateImageResult:
        if request.mask_path:
            raise UnsupportedMode("image-edit/mask", self.kind, f"{model.id} takes no mask (inpainting)")
        if len(request.image_paths) > 1:
            raise UnsupportedMode("image-edit", self.kind, f"{model.id} edits one image at a time")
        target = output_path(request.output_path, request.format, "car-image-")
        width, height = _size(model, request)
        seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
        given = _given(request, ("negative_prompt", "steps", "guidance"))
        count = request.variant_count or 1

        def work(stop: threading.Event, index: int) -> list[Any]:
            entry = self._entry(model)
            with entry.lock:
                pipe = entry.instance.pipe
                kwargs: dict[str, Any] = {"prompt": request.prompt, "output_type": "pil"}
                if request.image_paths:
                    pipe = _image_to_image(model, pipe)
                    size = (width, height) if {"width", "height"} & request.model_fields_set else None
                    if size is not None:
                        _check_size(model, pipe, width, height)  # as for a new picture: never adjusted
                    kwargs["image"] = _open_image(request.image_paths[0], size, _multiple(pipe))
                else:
                    _check_size(model, pipe, width, height)
                    kwargs |= {"width": width, "height": height}
                call = _Call(model, pipe, self.kind, _share(progress, index, count), stop)
                defaults = _defaults(model, ("steps", "guidance"))
                return call.run(kwargs, given, defaults, _variant_seed(seed, index)).images

        # One pipeline call per image, each its own turn on the model (``fair.FairExecutor``):
        # another client's picture goes between this one's variants, and variant i is the picture
        # a single request with seed + i gives.
        images: list[Any] = []
        for index in range(count):
            images += await run_stoppable(functools.partial(work, index=index), DIFFUSERS_THREAD)
        paths = [variant_path(target, i) for i in range(len(images))]

        def save() -> None:  # encoding a large PNG takes a while: not on the event loop
            for image, path in zip(images, paths, strict=True):
                write_atomic(path, image_bytes(image, request.format))

        await run_blocking(save)
        return GenerateImageResult(
            image_path=str(target),
            media_type=IMAGE_MEDIA_TYPES[request.format],
            model_used=model.id,
            width=images[0].width,
            height=images[0].height,
            seed=seed,
            image_paths=[str(p) for p in paths],
        )

    def check_video(self, model: ModelSchema, request: GenerateVideoRequest) -> None:
        """What no pipeline here takes, refused before one loads (the rest needs the pipeline)."""
        if request.audio_path:
            raise UnsupportedMode(
                str(request.mode), self.kind, f"{model.id} makes video from text or an image"
            )

    async def generate_video(
        self, model: ModelSchema, request: GenerateVideoRequest, progress: Progress | None = None
    ) -> GenerateVideoResult:
        self.check_video(model, request)
        target = output_path(request.output_path, request.format, "car-video-")
        width, height = _size(model, request)
        fps = int(_pick(model, request, "fps"))
        duration = float(_pick(model, request, "duration_s"))
        seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
        given = _given(request, ("negative_prompt", "steps", "guidance"))

        def work(stop: threading.Event) -> Any:
            entry = self._entry(model)
            with entry.lock:
                pipe = entry.instance.pipe
                _check_size(model, pipe, width, height)
                frames = _frame_count(model, pipe, duration, fps)
                kwargs = {"prompt": request.prompt, "output_type": "np", "width": width, "height": height}
                if request.image_path:  # the first frame: the image, at the video's size
                    pipe = _image_to_video(model, pipe)
                    kwargs["image"] = _open_image(request.image_path, (width, height), _multiple(pipe))
                kwargs["num_frames"] = frames
                accepted = inspect.signature(pipe.__call__).parameters
                if "frame_rate" in accepted:  # LTX conditions on the frame rate
                    kwargs["frame_rate"] = fps
                call = _Call(model, pipe, self.kind, progress, stop)
                frames = call.run(kwargs, given, _defaults(model, ("steps", "guidance")), seed).frames[0]
            return _uint8_frames(frames)

        pixels = await run_stoppable(work, DIFFUSERS_THREAD)
        await run_blocking(lambda: write_atomic(target, encode_video(pixels, fps, request.format)))
        return GenerateVideoResult(
            video_path=str(target),
            media_type=VIDEO_MEDIA_TYPES[request.format],
            model_used=model.id,
            duration_s=round(len(pixels) / fps, 3),
            width=int(pixels[0].shape[1]),
            height=int(pixels[0].shape[0]),
            frames=len(pixels),
            seed=seed,
        )


class _CallerFailed(Exception):
    """The caller's progress callback raised ``error``: passed on as it is. Read as the
    pipeline's ValueError it was the model's InvalidInput, and a routed request went on to the
    next model (perhaps a paid one) over a bug in the caller's progress bar."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class _Call:
    """One pipeline call: the request's values under the pipeline's names, a seeded generator,
    and a step callback that reports progress and stops work nobody waits for."""

    def __init__(
        self, model: ModelSchema, pipe: Any, kind: str, progress: Progress | None, stop: threading.Event
    ) -> None:
        self.model, self.pipe, self.kind, self.progress, self.stop = model, pipe, kind, progress, stop
        self.accepted = inspect.signature(pipe.__call__).parameters

    def run(self, kwargs: dict[str, Any], given: dict[str, Any], defaults: dict[str, Any], seed: int) -> Any:
        import torch

        for field, value in {**defaults, **given}.items():
            name = _PARAM_NAMES[field]
            if name in self.accepted:
                kwargs[name] = value
            elif field in given:  # asked for and impossible: say so rather than drop it
                raise UnsupportedMode(
                    field, self.kind, f"{self.model.id} ({type(self.pipe).__name__}) takes no {field}"
                )
        declared = self.accepted.get("num_inference_steps")
        steps = kwargs.get("num_inference_steps") or (declared.default if declared is not None else 1)
        if not -(2**63) <= seed < 2**64:  # what torch's generator takes
            raise InvalidInput(f"seed {seed} is out of range (-2**63 to 2**64 - 1)")
        kwargs["generator"] = torch.Generator("cpu").manual_seed(seed)
        if "callback_on_step_end" in self.accepted:
            kwargs["callback_on_step_end"] = self._step_callback(int(steps))
        try:
            return self.pipe(**kwargs)
        except _Stopped:
            raise InferenceFailed(f"{self.model.id}: generation stopped (the caller went away)") from None
        except _CallerFailed as exc:  # the caller's own progress callback: its error, as it raised it
            raise exc.error from None
        except ValueError as exc:  # pipelines check their inputs with ValueError
            raise InvalidInput(f"{self.model.id}: {exc}") from exc
        except torch.OutOfMemoryError as exc:
            raise DeviceError(f"{self.model.id} ran out of memory: {exc}") from exc
        except RuntimeError as exc:
            raise InferenceFailed(f"{self.model.id} failed: {exc}") from exc

    def _step_callback(self, steps: int) -> Callable[..., dict[str, Any]]:
        def on_step(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if self.stop.is_set():
                raise _Stopped
            if self.progress is not None:
                # img2img runs only part of the schedule; the pipeline knows how much.
                total = getattr(pipe, "num_timesteps", None) or steps
                try:
                    self.progress(step + 1, int(total))
                except Exception as exc:  # a ValueError read as the model refusing the input
                    raise _CallerFailed(exc) from exc
            return tensors

        return on_step


# Every pipeline call of the process runs on this one thread: torch's CPU kernels use OpenMP, which
# keeps a thread pool per calling thread (``base.openmp_thread``). From the shared model pool,
# calls that landed on different threads left a pool each: the same tiny pipeline then ran 28-45 %
# slower (112 -> 141-161 ms, 2 cores) though no two calls overlapped. Calls queue here in order;
# sentence-transformers has its own thread, so embeddings never wait behind a picture.
DIFFUSERS_THREAD = openmp_thread("car-diffusers")


def _variant_seed(seed: int, index: int) -> int:
    """Variant ``index``'s seed: ``seed + index``, wrapped into what torch's generator takes."""
    value = seed + index
    return value - 2**64 if value >= 2**64 else value


def _share(progress: Progress | None, index: int, count: int) -> Progress | None:
    """Progress of variant ``index`` of ``count`` as progress of the whole request."""
    if progress is None or count == 1:
        return progress
    return lambda done, total: progress(index * total + done, count * total)


def _given(request: Any, fields: tuple[str, ...]) -> dict[str, Any]:
    return {f: getattr(request, f) for f in fields if getattr(request, f) is not None}


def _defaults(model: ModelSchema, fields: tuple[str, ...]) -> dict[str, Any]:
    return {f: model.default_params[f] for f in fields if f in model.default_params}


def _pick(model: ModelSchema, request: Any, field: str) -> Any:
    """The request's value when the caller set it, else the model's default, else the request's."""
    if field not in request.model_fields_set and field in model.default_params:
        return model.default_params[field]
    return getattr(request, field)


def _size(model: ModelSchema, request: Any) -> tuple[int, int]:
    return int(_pick(model, request, "width")), int(_pick(model, request, "height"))


def _multiple(pipe: Any) -> int:
    """What width and height must be multiples of: the VAE's scale (as the pipeline's image or
    video processor applies it: Flux packs 2x2 latents into it) times the transformer's patch."""
    processor = getattr(pipe, "image_processor", None) or getattr(pipe, "video_processor", None)
    scale = getattr(getattr(processor, "config", None), "vae_scale_factor", None) or 8
    transformer = getattr(pipe, "transformer", None)
    patch = getattr(getattr(transformer, "config", None), "patch_size", None) or 1
    return int(scale) * int(patch[-1] if isinstance(patch, list | tuple) else patch)


def _check_size(model: ModelSchema, pipe: Any, width: int, height: int) -> None:
    m = _multiple(pipe)
    if width % m or height % m:
        near = f"{max(m, round(width / m) * m)}x{max(m, round(height / m) * m)}"
        raise InvalidInput(
            f"{model.id} makes sizes in multiples of {m} pixels, not {width}x{height} (try {near})"
        )


def _frame_count(model: ModelSchema, pipe: Any, duration_s: float, fps: int) -> int:
    """Frames as the VAE compresses them in time: ``k * ratio + 1`` nearest to the length asked
    for, ``k`` at least 1. A length nearer none than that least (0.1 s at 1 fps made 5 s) is
    ``InvalidInput`` naming the shortest it makes, never lengthened."""
    ratio = int(
        getattr(pipe, "vae_temporal_compression_ratio", None)
        or getattr(pipe, "vae_scale_factor_temporal", None)
        or 1
    )
    steps = round((duration_s * fps - 1) / ratio)
    if steps < 1:
        least = ratio + 1
        raise InvalidInput(
            f"{model.id} makes at least {least} frames, {least / fps:g} s at {fps} fps,"
            f" not {duration_s:g} s: ask for a longer video or more frames a second"
        )
    return steps * ratio + 1


def _image_to_image(model: ModelSchema, pipe: Any) -> Any:
    from diffusers import AutoPipelineForImage2Image

    try:
        sibling = AutoPipelineForImage2Image.from_pipe(pipe)
    except (ValueError, KeyError) as exc:
        raise UnsupportedMode(
            "image-edit", "diffusers", f"{model.id} has no image-to-image pipeline"
        ) from exc
    sibling.set_progress_bar_config(disable=True)
    return sibling


def _image_to_video(model: ModelSchema, pipe: Any) -> Any:
    """The pipeline's image-to-video sibling on the same components (LTXPipeline ->
    LTXImageToVideoPipeline): diffusers names them so, and has no auto class for video."""
    import diffusers

    name = type(pipe).__name__.replace("Pipeline", "ImageToVideoPipeline")
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise UnsupportedMode("image_to_video", "diffusers", f"{model.id} has no image-to-video pipeline")
    wanted = inspect.signature(cls.__init__).parameters
    required = [n for n, p in wanted.items() if n != "self" and p.default is inspect.Parameter.empty]
    missing = [n for n in required if pipe.components.get(n) is None]
    if missing:
        raise UnsupportedMode(
            "image_to_video",
            "diffusers",
            f"{name} needs {', '.join(missing)}, which {model.id} does not have",
        )
    sibling = cls(**{k: v for k, v in pipe.components.items() if k in wanted})
    sibling.set_progress_bar_config(disable=True)
    return sibling


def _open_image(path: str, size: tuple[int, int] | None, multiple: int) -> Any:
    """The image to edit, RGB, at the requested size or its own, rounded down to what the model
    makes. Its size is checked from the header, before it is decoded: a 20,000-pixel PNG of 1 MB
    was a traceback (PIL's DecompressionBombError), and a 12,000 x 64 one was edited at that
    size, past the 8,192-pixel bound of every request."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(Path(path).expanduser()) as image:
            _check_input_size(path, image.size, size)
            rgb = image.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise InvalidInput(f"cannot read the image {path}: {exc}") from exc
    width, height = size or rgb.size
    size = (max(multiple, width // multiple * multiple), max(multiple, height // multiple * multiple))
    return rgb if rgb.size == size else rgb.resize(size)


def _check_input_size(path: str, found: tuple[int, int], size: tuple[int, int] | None) -> None:
    """An image to edit has at most MAX_PIXELS_SIDE² pixels (decoding more is the memory of a
    bomb), and without a size asked for, sides of at most MAX_PIXELS_SIDE (it is edited at its
    own size)."""
    width, height = found
    if width * height > MAX_PIXELS_SIDE**2:
        raise InvalidInput(
            f"the image {path} is {width}x{height}: at most {MAX_PIXELS_SIDE**2:,} pixels", param="image"
        )
    if size is None and max(width, height) > MAX_PIXELS_SIDE:
        raise InvalidInput(
            f"the image {path} is {width}x{height}, more than {MAX_PIXELS_SIDE} pixels a side: "
            "ask for a size (width and height) to edit it at",
            param="image",
        )


def _uint8_frames(frames: Any) -> list[Any]:
    """Pipeline frames (floats in [0, 1], or PIL images) as uint8 RGB arrays."""
    import numpy as np

    if isinstance(frames, list) and frames and not isinstance(frames[0], np.ndarray):
        return [np.asarray(f.convert("RGB")) for f in frames]
    array = np.asarray(frames)
    if array.dtype != np.uint8:
        array = (array.clip(0, 1) * 255).round().astype(np.uint8)
    return list(array)
