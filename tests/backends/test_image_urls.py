"""image_urls: a client's image URLs never reach an upstream on this network as URLs while the
engine refuses private addresses; a hosted provider still gets them as they are."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest

from car_inference.backends.image_urls import has_image_urls, on_private_network
from car_inference.engine import InferenceEngine
from car_inference.errors import InvalidInput
from car_inference.requests import (
    ContentBlock,
    GenerateParams,
    GenerateRequest,
    ImageBlock,
    Message,
    TextBlock,
)
from fakes import FakeProviderServer
from fakes.images import png


def test_where_an_upstream_is() -> None:
    assert on_private_network("http://127.0.0.1:8000/v1")
    assert on_private_network("http://localhost:11434/v1")
    assert on_private_network("http://10.0.0.5/v1") and on_private_network("http://[::1]:8000/v1")
    assert on_private_network("http://nosuch.invalid/v1"), "not resolvable here: assumed inside"
    assert not on_private_network("https://93.184.216.34/v1")  # a public address


def _ask(model: str, image: ImageBlock) -> GenerateRequest:
    content: list[ContentBlock] = [image, TextBlock(text="What is this?")]
    return GenerateRequest(
        model=model, messages=[Message(role="user", content=content)], params=GenerateParams(max_tokens=4)
    )


@pytest.fixture
def upstream(isolated_home: Path) -> Iterator[tuple[InferenceEngine, FakeProviderServer, str]]:
    with FakeProviderServer() as fake:
        engine = InferenceEngine()
        model = engine.register_endpoint(fake.openai_base_url, "vision-model", name="lan").id
        try:
            yield engine, fake, model
        finally:
            engine.close()


async def test_an_upstream_on_this_network_never_gets_a_private_url(
    upstream: tuple[InferenceEngine, FakeProviderServer, str],
) -> None:
    """A managed vLLM or a LAN endpoint would fetch http://127.0.0.1:... from inside the
    server's network for a client: the server fetches it itself, and refuses it."""
    engine, fake, model = upstream
    url = "http://127.0.0.1:9/secret.png"
    assert has_image_urls(_ask(model, ImageBlock(url=url)))
    engine.private_urls_ok = False  # as `car serve` sets it
    with pytest.raises(InvalidInput, match="fetch_private_urls"):
        await engine.generate(_ask(model, ImageBlock(url=url)))
    assert fake.requests == [], "nothing went upstream"
    inline = f"data:image/png;base64,{base64.b64encode(png(8, 8)).decode()}"
    assert not has_image_urls(_ask(model, ImageBlock(url=inline)))
    await engine.generate(_ask(model, ImageBlock(url=inline)))
    [part] = [p for p in fake.requests[-1].json["messages"][-1]["content"] if p["type"] == "image_url"]
    assert part["image_url"]["url"] == inline, "an inline image goes as it is"
    engine.private_urls_ok = True  # the library: the caller's own network is its own business
    await engine.generate(_ask(model, ImageBlock(url=url)))
    [part] = [p for p in fake.requests[-1].json["messages"][-1]["content"] if p["type"] == "image_url"]
    assert part["image_url"]["url"] == url
