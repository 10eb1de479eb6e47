"""An image a request brings, as bytes: inline base64, a data: URL, an http(s) URL (fetched here,
so no engine underneath fetches on its own), a ``file:`` URL or a path.

Callers that serve other people (the server) refuse files before this; the Python API and the CLI
may name local files.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from urllib.parse import unquote, unquote_to_bytes, urlparse

from ..errors import InvalidInput
from ..requests import ImageBlock

__all__ = ["MAX_IMAGE_BYTES", "data_url", "media_type", "read_image"]

MAX_IMAGE_BYTES = 32 * 2**20


def read_image(block: ImageBlock, timeout_s: float) -> bytes:
    """The image's bytes (blocking: a URL is fetched); ``InvalidInput`` saying what is wrong."""
    if block.data is not None:
        return _b64(block.data)
    url = block.url or ""
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep:
            raise InvalidInput("a data: URL needs a ',' before its payload")
        if header.endswith(";base64"):
            return _b64(payload)
        return _checked(unquote_to_bytes(payload), "the data: URL")  # percent-encoded bytes
    try:
        scheme = urlparse(url).scheme.lower()
    except ValueError as exc:  # "Invalid IPv6 URL"
        raise InvalidInput(f"the image URL is malformed: {exc}") from None
    if scheme in ("http", "https"):
        return _fetch(url, timeout_s)
    path = Path(unquote(urlparse(url).path) if scheme == "file" else url).expanduser()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read the image {path}: {exc.strerror or exc}") from None
    return _checked(data, str(path))


def data_url(block: ImageBlock, timeout_s: float) -> str:
    """The image as a base64 data: URL (a data: URL given stays as it is)."""
    if block.url and block.url.startswith("data:"):
        return block.url
    data = read_image(block, timeout_s)
    kind = block.media_type if block.data is not None and block.media_type else media_type(data)
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def _b64(text: str) -> bytes:
    try:
        return _checked(base64.b64decode(text, validate=True), "the base64 image")
    except (binascii.Error, ValueError):
        raise InvalidInput("the image's `data` is not valid base64") from None


def _checked(data: bytes, what: str) -> bytes:
    if not data:
        raise InvalidInput(f"{what} is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidInput(f"{what} is larger than {MAX_IMAGE_BYTES // 2**20} MB")
    return data


def _fetch(url: str, timeout_s: float) -> bytes:
    import httpx

    try:
        with (
            httpx.Client(timeout=timeout_s, follow_redirects=True) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code >= 400:
                raise InvalidInput(f"fetching the image {url} answered HTTP {response.status_code}")
            data = bytearray()
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > MAX_IMAGE_BYTES:
                    raise InvalidInput(f"the image at {url} is larger than {MAX_IMAGE_BYTES // 2**20} MB")
    except InvalidInput:
        raise
    except Exception as exc:  # httpx's errors (InvalidURL is no HTTPError), a refused connection
        raise InvalidInput(f"cannot fetch the image {url}: {exc}") from None
    return _checked(bytes(data), url)


_SIGNATURES = (
    (b"\x89PNG", "image/png"),
    (b"\xff\xd8", "image/jpeg"),
    (b"GIF8", "image/gif"),
    (b"BM", "image/bmp"),
)


def media_type(data: bytes) -> str:
    """The image type its first bytes say (PNG when they say nothing we know)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((mt for sig, mt in _SIGNATURES if data.startswith(sig)), "image/png")
