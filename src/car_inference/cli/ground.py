"""`car ground IMAGE TARGET`: boxes for a text target in an image, in the image's pixels."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..requests import GroundRequest, ImageBlock
from .common import EXIT_USAGE, engine, fail, handle_errors, named_model, out, print_json, run, spinner


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def ground(
        image: Annotated[str, typer.Argument(help="image file, http(s) URL or data: URL")],
        target: Annotated[
            str, typer.Argument(help='what to find, e.g. "the red car" ("*": every text line, OCR)')
        ],
        model: Annotated[
            str | None, typer.Option("--model", "-m", callback=named_model, help="model id, name or alias")
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="print the result object as JSON")] = False,
    ) -> None:
        """Find TARGET in IMAGE: bounding boxes (x1, y1, x2, y2) in pixels of the image."""
        request = GroundRequest(prompt=target, image=_image(image), model=model)
        eng = engine()
        with spinner("Grounding...", enabled=not as_json):
            result = run(eng.ground(request))
        if as_json:
            print_json(result)
            return
        size = f"{result.width}x{result.height}" if result.width else "?"
        if not result.boxes:
            out.print(escape(f"no box for {target!r} ({result.model_used}, image {size})"))
            out.print(escape(result.raw_text), style="dim")
            return
        table = Table(header_style="bold", caption=f"{result.model_used}, image {size} px")
        for column in ("label", "x1", "y1", "x2", "y2", "score"):
            table.add_column(column)
        for box in result.boxes:
            score = "" if box.score is None else f"{box.score:.3f}"
            coords = (f"{v:g}" for v in (box.x1, box.y1, box.x2, box.y2))
            table.add_row(escape(box.label or ""), *coords, score)
        out.print(table)


def _image(value: str) -> ImageBlock:
    """URLs go as they are (the engine fetches them); a file is read here, so a typo is exit 2."""
    if value.startswith(("http://", "https://", "data:")):
        return ImageBlock(url=value)
    path = Path(value).expanduser()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise fail(f"cannot read {path}: {exc.strerror or exc}", EXIT_USAGE) from None
    if not data:  # said "give exactly one of `url` or `data`", fields the user never set
        raise fail(f"{path} is empty (0 bytes): not an image", EXIT_USAGE)
    return ImageBlock(data=base64.b64encode(data).decode())
