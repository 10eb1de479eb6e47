"""An image a request brings, as bytes: inline base64, a data: URL, an http(s) URL (fetched here,
so no engine underneath fetches on its own), a ``file:`` URL or a path.

Callers that serve other people (the server) refuse files before this, and pass
``private_ok=False`` so that a client cannot make the server fetch from its own network (SSRF: a
URL, or a redirect, to a loopback, private, link-local or reserved address is refused). The
Python API and the CLI may name local files and fetch ``http://localhost/...``.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import socket
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, unquote_to_bytes, urlparse

from ..errors import InvalidInput
from ..requests import ImageBlock

if TYPE_CHECKING:
    import httpx

__all__ = [
    "MAX_IMAGE_BYTES",
    "MAX_REDIRECTS",
    "PRIVATE_SETTING",
    "data_url",
    "media_type",
    "public_addresses",
    "read_image",
]

MAX_IMAGE_BYTES = 32 * 2**20
MAX_REDIRECTS = 5
PRIVATE_SETTING = "[server] fetch_private_urls = true (env CAR_SERVER__FETCH_PRIVATE_URLS=true)"
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def read_image(block: ImageBlock, timeout_s: float, *, private_ok: bool = True) -> bytes:
    """The image's bytes (blocking: a URL is fetched); ``InvalidInput`` saying what is wrong.
    ``private_ok=False``: an http(s) URL whose host (or a redirect's) has a loopback, private,
    link-local or reserved address is refused, not fetched."""
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
        return _fetch(url, timeout_s, private_ok)
    path = Path(unquote(urlparse(url).path) if scheme == "file" else url).expanduser()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read the image {path}: {exc.strerror or exc}") from None
    return _checked(data, str(path))


def data_url(block: ImageBlock, timeout_s: float, *, private_ok: bool = True) -> str:
    """The image as a base64 data: URL (a data: URL given stays as it is); ``private_ok`` as for
    ``read_image``."""
    if block.url and block.url.startswith("data:"):
        return block.url
    data = read_image(block, timeout_s, private_ok=private_ok)
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


def _fetch(url: str, timeout_s: float, private_ok: bool) -> bytes:
    import httpx

    try:
        if private_ok:
            with httpx.Client(timeout=timeout_s, follow_redirects=True) as client:
                data = _get(client, httpx.URL(url), url)
        else:
            data = _fetch_public(httpx.URL(url), timeout_s, url)
    except InvalidInput:
        raise
    except Exception as exc:  # httpx's errors (InvalidURL is no HTTPError), a refused connection
        raise InvalidInput(f"cannot fetch the image {url}: {exc}") from None
    if isinstance(data, str):  # never: httpx follows every redirect that names a Location
        raise InvalidInput(f"fetching the image {url} answered a redirect that was not followed")
    return _checked(data, url)


def _get(
    client: httpx.Client,
    target: httpx.URL,
    shown: str,
    headers: dict[str, str] | None = None,
    extensions: dict[str, str] | None = None,
) -> bytes | str:
    """The body at ``target`` (at most ``MAX_IMAGE_BYTES``), or the Location a redirect names."""
    with client.stream("GET", target, headers=headers, extensions=extensions) as response:
        if response.status_code in _REDIRECTS and response.headers.get("location"):
            return str(response.headers["location"])
        if response.status_code >= 400:
            raise InvalidInput(f"fetching the image {shown} answered HTTP {response.status_code}")
        data = bytearray()
        for chunk in response.iter_bytes():
            data += chunk
            if len(data) > MAX_IMAGE_BYTES:
                raise InvalidInput(f"the image at {shown} is larger than {MAX_IMAGE_BYTES // 2**20} MB")
    return bytes(data)


def _fetch_public(url: httpx.URL, timeout_s: float, shown: str) -> bytes:
    """Follow redirects here, each hop's host checked (``public_addresses``) and connected to at
    the very address checked: the request goes to that IP with the name in the Host header and as
    TLS SNI (the certificate is verified against the name), so httpx never resolves the name again
    and a DNS answer that changes between check and connection (DNS rebinding) gains nothing.
    HTTP(S)_PROXY is not used here (``trust_env=False``): a proxy would resolve the name itself."""
    for _ in range(MAX_REDIRECTS + 1):
        if url.scheme not in ("http", "https"):
            raise InvalidInput(
                f"fetching the image {shown} was redirected to a {url.scheme or 'relative'} URL"
            )
        hop = shown if str(url) == shown else f"{shown} (redirected to {url})"
        addresses = public_addresses(url.raw_host.decode("ascii"), url.port, hop)
        answer = _get_pinned(url, addresses, timeout_s, shown)
        if isinstance(answer, bytes):
            return answer
        url = url.join(answer)
    raise InvalidInput(f"fetching the image {shown} was redirected more than {MAX_REDIRECTS} times")


def _get_pinned(url: httpx.URL, addresses: list[str], timeout_s: float, shown: str) -> bytes | str:
    """One hop, to the first of ``addresses`` that takes the connection. A new client per hop:
    a connection verified for one name is never reused for another on the same address."""
    import httpx

    name = url.raw_host.decode("ascii")
    headers = {"Host": url.netloc.decode("ascii")}
    extensions = {"sni_hostname": name} if url.scheme == "https" else None
    error: httpx.ConnectError | None = None
    for address in addresses:
        with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
            try:
                return _get(
                    client, url.copy_with(host=address), shown, headers=headers, extensions=extensions
                )
            except httpx.ConnectError as exc:  # the next address (IPv6 where only IPv4 routes)
                error = exc
    raise error or InvalidInput(f"cannot fetch the image {shown}: {name} has no address")


def public_addresses(host: str, port: int | None, shown: str) -> list[str]:
    """The addresses ``host`` resolves to, when every one of them is public; else ``InvalidInput``
    naming the setting that allows private ones. A literal IP, ``localhost``, ``0.0.0.0`` and the
    numeric forms the resolver takes (``2130706433``) are all resolved and checked the same way."""
    try:
        infos = socket.getaddrinfo(host, port or 0, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise InvalidInput(f"cannot fetch the image {shown}: cannot resolve {host}: {exc}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in addresses:
        if not _is_public(ipaddress.ip_address(address.partition("%")[0])):  # an IPv6 scope goes
            raise InvalidInput(
                f"the image URL {shown} points at a loopback, private, link-local or reserved "
                f"address ({host} is {address}); the server does not fetch those for clients "
                f"unless {PRIVATE_SETTING}"
            )
    if not addresses:
        raise InvalidInput(f"cannot fetch the image {shown}: {host} has no address")
    return addresses


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):  # an IPv4 address inside an IPv6 one counts as it
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and not _is_public(embedded):
            return False
    flags = (
        ip.is_loopback,
        ip.is_private,
        ip.is_link_local,
        ip.is_reserved,
        ip.is_multicast,
        ip.is_unspecified,
    )
    # not is_global also covers shared space (100.64/10: carrier NAT, some clouds' metadata services)
    return not any(flags) and ip.is_global


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
