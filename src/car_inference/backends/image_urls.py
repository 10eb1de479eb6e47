"""Image URLs a server's client sends to a model behind an OpenAI-style upstream.

A hosted provider fetches an image URL from the internet, so the URL goes to it as it is. An
upstream on this machine's network (a managed vLLM or Ollama, an ``[[endpoints]]`` server on the
LAN, anything on a loopback or private address) would fetch it from *inside* that network: the
same SSRF the server refuses for the images it fetches itself (``image_input``). So when the
engine does not fetch private URLs for its clients (``BackendContext.private_urls_ok`` off, as
``car serve`` sets it), a request for such an upstream has its http(s) image URLs fetched here,
with private addresses refused, and sent inline as data: URLs.
"""

from __future__ import annotations

import functools
from typing import TypeGuard
from urllib.parse import urlparse

from ..errors import InvalidInput
from ..requests import ContentBlock, GenerateRequest, ImageBlock, Message
from .image_input import data_url, public_addresses

__all__ = ["has_image_urls", "inline_image_urls", "on_private_network"]


def has_image_urls(request: GenerateRequest) -> bool:
    return any(_is_url(b) for m in request.chat_messages() for b in m.media())


@functools.lru_cache(maxsize=256)
def on_private_network(base_url: str) -> bool:
    """Whether the upstream at ``base_url`` is on this machine's network: its host resolves to a
    loopback, private, link-local or reserved address, or does not resolve here (then assumed so).
    Blocking (a DNS lookup); remembered per URL."""
    host = urlparse(base_url).hostname
    if not host:
        return True
    try:
        public_addresses(host, None, base_url)  # the fetcher's own check of a host
    except InvalidInput:
        return True
    return False


def inline_image_urls(request: GenerateRequest, timeout_s: float) -> GenerateRequest:
    """``request`` with each http(s) image URL replaced by its image as a data: URL, fetched with
    private addresses refused (``InvalidInput`` naming the setting otherwise). Blocking."""

    def blocks(content: list[ContentBlock]) -> list[ContentBlock]:
        return [
            b.model_copy(update={"url": data_url(b, timeout_s, private_ok=False)}) if _is_url(b) else b
            for b in content
        ]

    messages = [
        m if isinstance(m.content, str) else m.model_copy(update={"content": blocks(m.content)})
        for m in request.messages or []
    ]
    update: dict[str, list[Message] | list[ContentBlock] | None] = {
        "messages": messages if request.messages is not None else None,
        "images": blocks(request.images) if request.images else request.images,
    }
    return request.model_copy(update=update)


def _is_url(block: object) -> TypeGuard[ImageBlock]:
    return isinstance(block, ImageBlock) and (block.url or "").lower().startswith(("http://", "https://"))
