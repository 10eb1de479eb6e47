"""Images a request brings, as bytes and as data: URLs: base64, data: URLs, files and http(s)."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from car_inference.backends.image_input import data_url, media_type, read_image
from car_inference.errors import InvalidInput
from car_inference.requests import ImageBlock
from fakes.images import png

IMAGE = png(5, 4, (10, 200, 30))
B64 = base64.b64encode(IMAGE).decode()


class _Images(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        found = self.path == "/a.png"
        body = IMAGE if found else b"missing"
        self.send_response(200 if found else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def site() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_every_form_reads_the_same_bytes(tmp_path: Path, site: str) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(IMAGE)
    for block in (
        ImageBlock(data=B64),
        ImageBlock(url=f"data:image/png;base64,{B64}"),
        ImageBlock(url=str(path)),
        ImageBlock(url=path.as_uri()),
        ImageBlock(url=f"{site}/a.png"),
    ):
        assert read_image(block, 5) == IMAGE, block


def test_data_urls(tmp_path: Path, site: str) -> None:
    expected = f"data:image/png;base64,{B64}"
    assert data_url(ImageBlock(url=f"{site}/a.png"), 5) == expected
    assert data_url(ImageBlock(data=B64), 5) == expected
    assert data_url(ImageBlock(data=B64, media_type="image/x-test"), 5) == f"data:image/x-test;base64,{B64}"
    # Without ;base64 the payload is percent-encoded bytes; other characters are their UTF-8.
    assert read_image(ImageBlock(url="data:image/png,%89PNG€"), 5) == b"\x89PNG\xe2\x82\xac"
    given = "data:image/jpeg;base64,AAAA"
    assert data_url(ImageBlock(url=given), 5) == given  # passed on untouched


def test_media_type_sniffing() -> None:
    assert media_type(IMAGE) == "image/png"
    assert media_type(b"\xff\xd8\xff\xe0") == "image/jpeg"
    assert media_type(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert media_type(b"GIF89a") == "image/gif"


def test_what_cannot_be_read_is_invalid_input(tmp_path: Path, site: str) -> None:
    cases = [
        (ImageBlock(url=str(tmp_path / "none.png")), "cannot read the image"),
        (ImageBlock(data="***"), "not valid base64"),
        (ImageBlock(url="data:image/png;base64,"), "empty"),
        (ImageBlock(url="data:image/png;base64"), "needs a ','"),
        (ImageBlock(url=f"{site}/gone.png"), "HTTP 404"),
        (ImageBlock(url="http://"), "cannot fetch"),
        (ImageBlock(url="http://[::1"), "malformed"),  # urlparse raises ValueError
    ]
    for block, message in cases:
        with pytest.raises(InvalidInput, match=message):
            read_image(block, 5)
