"""`car image` and `car video`: generate (or edit) an image, generate a video, and write the file.

Local models report their denoising steps and hosted video jobs their percentage; both show as a
progress bar on stderr when it is a terminal. stdout carries only the result: the file's path,
or the result object with ``--json``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..requests import GenerateImageRequest, GenerateVideoRequest, VideoMode
from .common import EXIT_USAGE, JsonOpt, ModelOpt, engine, err, fail, handle_errors, out, print_json, run

SizeOpt = Annotated[str | None, typer.Option("--size", "-s", help="WIDTHxHEIGHT (default: the model's own)")]
StepsOpt = Annotated[int | None, typer.Option("--steps", min=1, help="denoising steps (local models)")]
GuidanceOpt = Annotated[float | None, typer.Option("--guidance", help="guidance scale (local models)")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="the same seed gives the same result (local)")]
NegativeOpt = Annotated[str | None, typer.Option("--negative", help="what the picture should not show")]

IMAGE_FORMATS = ("png", "jpeg", "webp")
VIDEO_FORMATS = ("mp4", "mov", "gif")


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def image(
        prompt: Annotated[str, typer.Argument(help="what to draw (or how to change the --edit image)")],
        output: Annotated[
            Path | None,
            typer.Option("--output", "-o", help="image file to write (default: a temporary file)"),
        ] = None,
        model: ModelOpt = None,
        size: SizeOpt = None,
        steps: StepsOpt = None,
        guidance: GuidanceOpt = None,
        seed: SeedOpt = None,
        negative: NegativeOpt = None,
        count: Annotated[int, typer.Option("--count", "-n", min=1, help="how many images")] = 1,
        edit: Annotated[
            list[Path] | None, typer.Option("--edit", help="an image to edit (repeat for several)")
        ] = None,
        mask: Annotated[
            Path | None, typer.Option("--mask", help="edits: transparent where it may change")
        ] = None,
        image_format: Annotated[
            str | None, typer.Option("--format", "-f", help="png, jpeg or webp (default: from -o, else png)")
        ] = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Generate an image from a prompt (or edit one with --edit) and print the file's path."""
        fmt = _format(image_format, output, IMAGE_FORMATS, {"jpg": "jpeg"})
        request = GenerateImageRequest.model_validate(
            {
                **_common(prompt, model, steps, guidance, seed, negative),
                "variant_count": count if count > 1 else None,
                "image_paths": [str(p) for p in edit or []],
                "mask_path": str(mask) if mask else None,
                "format": fmt,
                "output_path": str(output) if output else None,
                **_dimensions(size),
            }
        )
        with progress_bar(err, "Editing" if edit else "Generating") as report:
            result = run(engine().generate_image(request, progress=report))
        if as_json:
            print_json(result)
            return
        for path in result.image_paths or [result.image_path]:
            out.print(path, markup=False)
        facts = [f"{result.width}x{result.height}"] if result.width and result.height else []  # not NonexNone
        facts += [f"seed {result.seed}"] if result.seed is not None else []
        err.print(f"{result.model_used}" + (f" ({', '.join(facts)})" if facts else ""), style="dim")

    @app.command()
    @handle_errors
    def video(
        prompt: Annotated[str, typer.Argument(help="what happens in the video")],
        output: Annotated[
            Path | None,
            typer.Option("--output", "-o", help="video file to write (default: a temporary file)"),
        ] = None,
        model: ModelOpt = None,
        size: SizeOpt = None,
        duration: Annotated[float | None, typer.Option("--duration", "-d", min=0.1, help="seconds")] = None,
        fps: Annotated[int | None, typer.Option("--fps", min=1, help="frames per second")] = None,
        steps: StepsOpt = None,
        guidance: GuidanceOpt = None,
        seed: SeedOpt = None,
        negative: NegativeOpt = None,
        from_image: Annotated[
            Path | None, typer.Option("--image", help="start from this image (image-to-video)")
        ] = None,
        video_format: Annotated[
            str | None, typer.Option("--format", "-f", help="mp4, mov or gif (default: from -o, else mp4)")
        ] = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Generate a video from a prompt and print the file's path."""
        fmt = _format(video_format, output, VIDEO_FORMATS, {})
        optional = {"duration_s": duration, "fps": fps, **_dimensions(size)}
        request = GenerateVideoRequest.model_validate(
            {
                **_common(prompt, model, steps, guidance, seed, negative),
                "mode": VideoMode.IMAGE_TO_VIDEO if from_image else VideoMode.TEXT_TO_VIDEO,
                "image_path": str(from_image) if from_image else None,
                "format": fmt,
                "output_path": str(output) if output else None,
                **{k: v for k, v in optional.items() if v is not None},
            }
        )
        with progress_bar(err, "Generating") as report:
            result = run(engine().generate_video(request, progress=report))
        if as_json:
            print_json(result)
            return
        out.print(result.video_path, markup=False)
        shape = f"{result.width}x{result.height}, " if result.width else ""
        err.print(f"{result.model_used} ({shape}{result.duration_s} s, {result.media_type})", style="dim")


@contextmanager
def progress_bar(console: Console, label: str) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on ``console`` while it is a terminal, fed by the callback this yields
    (thread-safe: the engine calls it from its worker thread); None when nothing is shown."""
    if not console.is_terminal or os.environ.get("CAR_NO_SPINNER"):
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(label, total=None)

        def report(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield report


def _format(given: str | None, output: Path | None, known: tuple[str, ...], aliases: dict[str, str]) -> str:
    """The format asked for, else the one the output name's suffix says, else the first known."""
    raw = (given or (output.suffix.lstrip(".") if output else "") or known[0]).lower()
    fmt = aliases.get(raw, raw)
    if fmt not in known:
        raise fail(f"cannot write {raw} files; use one of {', '.join(known)}", EXIT_USAGE)
    return fmt


def _common(
    prompt: str,
    model: str | None,
    steps: int | None,
    guidance: float | None,
    seed: int | None,
    negative: str | None,
) -> dict[str, Any]:
    """The fields image and video requests share, from the options they share."""
    return {
        "prompt": prompt,
        "model": model,
        "steps": steps,
        "guidance": guidance,
        "seed": seed,
        "negative_prompt": negative,
    }


def _dimensions(size: str | None) -> dict[str, int]:
    if size is None:
        return {}
    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise fail(f"--size must be WIDTHxHEIGHT, e.g. 512x512, not {size!r}", EXIT_USAGE) from None
    return {"width": width, "height": height}
