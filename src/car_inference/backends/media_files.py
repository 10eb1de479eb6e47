"""Where generated images and videos go, and how frames become a video file.

Shared by the local (diffusers) and hosted (OpenAI) media backends. Files are written atomically
(a temporary name, then a rename), so a reader never sees half an image. A requested path whose
folder does not exist is the caller's mistake (``InvalidInput``); with no path, a new temporary
file is made.
"""

from __future__ import annotations

import contextlib
import io
import mimetypes
import os
import secrets
import stat
import tempfile
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import InferenceFailed, InvalidInput, UnsupportedMode
from ..schema import ModelSchema

__all__ = [
    "IMAGE_MEDIA_TYPES",
    "VIDEO_MEDIA_TYPES",
    "atomic_file",
    "encode_video",
    "image_bytes",
    "output_path",
    "read_upload",
    "readable_file",
    "refuse_unset",
    "variant_path",
    "write_atomic",
]

IMAGE_MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
VIDEO_MEDIA_TYPES = {"mp4": "video/mp4", "mov": "video/quicktime", "gif": "image/gif"}
# PyAV container and codec per video format; h264 needs even sides (yuv420p), gif takes palettes.
_VIDEO_CODECS = {"mp4": ("mp4", "libx264", "yuv420p"), "mov": ("mov", "libx264", "yuv420p")}


def readable_file(path: str, what: str) -> Path:
    """``path`` (``~`` expanded) when it is a file this process can read; otherwise
    ``InvalidInput`` saying which of missing, a folder or unreadable it is."""
    if not path.strip():  # Path("") is ".", which was "a folder, not a file: ."
        raise InvalidInput(f"no {what} given: the path is empty")
    file = Path(path).expanduser()
    if file.is_dir():
        raise InvalidInput(f"{what} is a folder, not a file: {file}")
    if not file.is_file():
        raise InvalidInput(f"{what} not found: {file}")
    if not os.access(file, os.R_OK):
        raise InvalidInput(f"{what} is not readable: {file}")
    return file


def output_path(requested: str | None, fmt: str, prefix: str) -> Path:
    """The file to write: the requested one, whose folder must exist (a typo in a path must not
    silently create folders), else a new name in the temporary folder. A symbolic link is
    written through (its file is replaced, the link stays); a folder, a device, a FIFO or a
    socket is refused: the atomic rename would put a regular file in its place."""
    if requested:
        target = Path(requested).expanduser()
        if target.is_symlink():
            target = target.resolve()
        if not target.parent.is_dir():
            why = "is not a folder" if target.parent.exists() else "does not exist"
            raise InvalidInput(f"cannot write {target}: {target.parent} {why}")
        if target.is_dir():
            raise InvalidInput(f"cannot write {target}: it is a folder")
        if target.exists() and not target.is_file():
            raise InvalidInput(f"cannot write {target}: it is not a regular file (a device, FIFO or socket)")
        try:  # now, not after a paid or minutes-long call whose result then had nowhere to go
            with tempfile.TemporaryFile(dir=target.parent):
                pass
        except OSError as exc:
            raise InvalidInput(f"cannot write {target}: {exc.strerror or exc}") from None
        return target
    # Named now, created by the write: a generation that fails leaves no empty file behind.
    return Path(tempfile.gettempdir()) / f"{prefix}{secrets.token_hex(8)}.{fmt}"


def variant_path(first: Path, index: int) -> Path:
    """``out.png``, ``out-2.png``, ``out-3.png``...: where the ``index``-th (0-based) variant goes."""
    return first if index == 0 else first.with_name(f"{first.stem}-{index + 1}{first.suffix}")


@contextlib.contextmanager
def atomic_file(target: Path, *, what: str = "", keep_empty: bool = True) -> Iterator[BinaryIO]:
    """A new file beside ``target`` to write, renamed over it when the block ends: readers see
    the old file or the whole new one, and a failed write leaves no part behind. The file gets
    the umask's permissions (``os.open``, not mkstemp's 0600), or those of the file it replaces
    (a private file stays private). ``keep_empty=False``: nothing written, nothing replaced. An
    ``OSError`` (disk full, no permission) is ``InferenceFailed`` naming ``what`` and the file."""
    temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
    try:
        handle = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with contextlib.suppress(FileNotFoundError):
            os.chmod(temp, stat.S_IMODE(os.stat(target).st_mode))
        with os.fdopen(handle, "wb") as file:
            yield file
            written = file.tell()
        if keep_empty or written:
            os.replace(temp, target)
    except OSError as exc:
        raise InferenceFailed(f"cannot write {what}{target}: {exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def write_atomic(target: Path, data: bytes) -> None:
    """``data`` written to ``target`` through ``atomic_file``."""
    with atomic_file(target) as file:
        file.write(data)


def image_bytes(image: Any, fmt: str) -> bytes:
    """A PIL image encoded as ``fmt`` (png, jpeg or webp)."""
    buffer = io.BytesIO()
    if fmt == "jpeg" and image.mode != "RGB":
        image = image.convert("RGB")
    image.save(buffer, format=fmt.upper())
    return buffer.getvalue()


def encode_video(frames: Sequence[Any], fps: int, fmt: str) -> bytes:
    """RGB frames (``uint8`` arrays of shape (height, width, 3)) as an mp4/mov (H.264) or gif file."""
    import av

    if not len(frames):
        raise InferenceFailed("the model produced no frames")
    height, width = frames[0].shape[:2]
    buffer = io.BytesIO()
    container_format, codec, pix_fmt = _VIDEO_CODECS.get(fmt, ("gif", "gif", "rgb8"))
    if codec == "libx264" and (width % 2 or height % 2):
        raise InvalidInput(f"{fmt} (H.264) needs an even width and height, not {width}x{height}")
    try:
        with av.open(buffer, mode="w", format=container_format) as container:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
            if not isinstance(stream, av.VideoStream):  # our codec table names video codecs only
                raise InferenceFailed(f"{codec} is not a video codec")
            stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    except (OSError, ValueError) as exc:  # PyAV's errors derive from both
        raise InferenceFailed(f"cannot encode the video as {fmt}: {exc}") from exc
    return buffer.getvalue()


def refuse_unset(kind: str, model: ModelSchema, request: Any, fields: tuple[str, ...], api: str) -> None:
    """A value the caller set that the API has no field for is refused, not dropped."""
    for field in fields:
        if getattr(request, field, None) is not None:
            raise UnsupportedMode(field, kind, f"{model.id} ({api}) takes no {field.replace('_', ' ')}")


def read_upload(path: str) -> tuple[str, bytes, str]:
    """A file to send: its name, bytes and media type (``InvalidInput`` when it cannot be read)."""
    file = Path(path).expanduser()
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read {file}: {exc.strerror or exc}") from None
    return file.name, data, mimetypes.guess_type(file.name)[0] or "application/octet-stream"
