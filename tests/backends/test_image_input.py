"""Images a request brings, as bytes and as data: URLs: base64, data: URLs, files and http(s); what
the server fetches for clients (nothing on loopback or private addresses)."""

from __future__ import annotations

import base64
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from car_inference.backends.image_input import (
    MAX_REDIRECTS,
    data_url,
    media_type,
    public_addresses,
    read_image,
)
from car_inference.errors import InvalidInput
from car_inference.requests import ImageBlock
from fakes.images import png

IMAGE = png(5, 4, (10, 200, 30))
B64 = base64.b64encode(IMAGE).decode()


@pytest.fixture
def site() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Site)  # the image at /a.png
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


# --- the server's fetches (private_ok=False): nothing on loopback, private or reserved addresses ---

PUBLIC_NAME, PUBLIC_IP = "images.test", "93.184.216.34"


class _Site(BaseHTTPRequestHandler):
    """The image, redirects (to a private address, to the same host, in a loop, to a file), and
    every request's path and Host header, kept to say what reached the server."""

    seen: ClassVar[list[tuple[str, str]]] = []

    def do_GET(self) -> None:
        self.seen.append((self.path, self.headers.get("Host", "")))
        port = int(self.server.server_address[1])  # type: ignore[index]
        location = {
            "/to-loopback": f"http://127.0.0.1:{port}/a.png",
            "/to-same-host": "/a.png",
            "/loop": "/loop",
            "/to-file": "file:///etc/passwd",
        }.get(self.path)
        body = IMAGE if self.path == "/a.png" else b""
        self.send_response(302 if location else 200 if body else 404)
        if location:
            self.send_header("Location", location)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def port() -> Iterator[int]:
    _Site.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Site)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


class _PublicName:
    """``images.test`` resolves to the next of ``answers`` (the last one stays), a public address
    by default, and a connection to that address reaches the loopback site; ``log`` says what was
    resolved and connected to, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.answers = [PUBLIC_IP]
        self.log: list[str] = []
        resolve, connect = socket.getaddrinfo, socket.create_connection

        def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
            if host != PUBLIC_NAME:
                return resolve(host, port, *args, **kwargs)
            self.log.append(f"resolve {host}")
            ip = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]

        def create_connection(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
            self.log.append(f"connect {address[0]}")
            host = "127.0.0.1" if address[0] == PUBLIC_IP else address[0]
            return connect((host, address[1]), *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        monkeypatch.setattr(socket, "create_connection", create_connection)


@pytest.fixture
def public_name(monkeypatch: pytest.MonkeyPatch) -> _PublicName:
    return _PublicName(monkeypatch)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/a.png",
        "http://localhost:{port}/a.png",
        "http://[::1]:{port}/a.png",
        "http://[::ffff:127.0.0.1]:{port}/a.png",  # IPv4-mapped IPv6
        "http://0.0.0.0:{port}/a.png",
        "http://2130706433:{port}/a.png",  # 127.0.0.1 as one number, which the resolver takes
        "http://10.1.2.3/a.png",
        "http://192.168.0.1/a.png",
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata
        "http://100.100.100.200/latest/meta-data/",  # shared address space (a cloud's metadata)
        "https://[fe80::1]/a.png",
        "http://224.0.0.1/a.png",
    ],
)
def test_private_addresses_are_refused_for_the_server(url: str, port: int) -> None:
    block = ImageBlock(url=url.format(port=port))
    with pytest.raises(InvalidInput, match=r"loopback, private.*fetch_private_urls = true"):
        read_image(block, 5, private_ok=False)
    with pytest.raises(InvalidInput, match="fetch_private_urls"):
        data_url(block, 5, private_ok=False)
    assert _Site.seen == []  # refused before any connection
    if url.startswith(("http://127.0.0.1", "http://localhost")):  # the library and the CLI still fetch them
        assert read_image(block, 5) == IMAGE


def test_a_public_host_is_fetched_at_the_address_checked(port: int, public_name: _PublicName) -> None:
    """The connection goes to the address checked, with the name in the Host header: httpx does
    not look the name up again, so a second answer (127.0.0.1: DNS rebinding) is never used."""
    public_name.answers = [PUBLIC_IP, "127.0.0.1"]
    url = f"http://{PUBLIC_NAME}:{port}/a.png"
    assert read_image(ImageBlock(url=url), 5, private_ok=False) == IMAGE
    assert public_name.log == [f"resolve {PUBLIC_NAME}", f"connect {PUBLIC_IP}"]
    assert _Site.seen == [("/a.png", f"{PUBLIC_NAME}:{port}")]


def test_redirects_to_public_hosts_are_followed(port: int, public_name: _PublicName) -> None:
    url = f"http://{PUBLIC_NAME}:{port}/to-same-host"
    assert data_url(ImageBlock(url=url), 5, private_ok=False) == f"data:image/png;base64,{B64}"
    assert [path for path, _ in _Site.seen] == ["/to-same-host", "/a.png"]
    assert public_name.log.count(f"resolve {PUBLIC_NAME}") == 2  # each hop checked
    public_name.answers = [PUBLIC_IP, "127.0.0.1"]  # a name that turns private between hops
    with pytest.raises(InvalidInput, match="fetch_private_urls"):
        read_image(ImageBlock(url=url), 5, private_ok=False)


def test_each_redirect_is_checked(port: int, public_name: _PublicName) -> None:
    base = f"http://{PUBLIC_NAME}:{port}"
    with pytest.raises(
        InvalidInput, match=r"redirected to http://127\.0\.0\.1.*loopback, private.*fetch_private_urls"
    ):
        read_image(ImageBlock(url=f"{base}/to-loopback"), 5, private_ok=False)
    assert [path for path, _ in _Site.seen] == ["/to-loopback"]  # the image was never asked for
    with pytest.raises(InvalidInput, match="redirected to a file URL"):
        read_image(ImageBlock(url=f"{base}/to-file"), 5, private_ok=False)
    _Site.seen = []
    with pytest.raises(InvalidInput, match=f"redirected more than {MAX_REDIRECTS} times"):
        read_image(ImageBlock(url=f"{base}/loop"), 5, private_ok=False)
    assert len(_Site.seen) == MAX_REDIRECTS + 1


def test_a_name_with_any_private_address_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = {
        "mixed.test": ["93.184.216.34", "10.0.0.7"],
        "public.test": ["93.184.216.34", "2606:2800:220:1::1"],
        "sixtofour.test": ["2002:7f00:1::1"],  # 6to4 around 127.0.0.1
        "nat64.test": ["64:ff9b::a9fe:a9fe"],  # NAT64 around 169.254.169.254
    }

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    assert public_addresses("public.test", 443, "u") == answers["public.test"]
    for name in ("mixed.test", "sixtofour.test", "nat64.test"):
        with pytest.raises(InvalidInput, match="fetch_private_urls"):
            public_addresses(name, 80, "u")
    with pytest.raises(InvalidInput, match=r"cannot resolve nowhere\.test"):
        public_addresses("nowhere.test", 80, "u")
