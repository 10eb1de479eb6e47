"""pytest fixtures of the fake provider server: one per test module (``server``), reset around each
test (``fake``). A conftest imports them: ``from fakes.server_fixtures import fake, server``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .provider_server import FakeProviderServer

__all__ = ["fake", "server"]


@pytest.fixture(scope="module")
def server() -> Iterator[FakeProviderServer]:
    with FakeProviderServer() as fake:
        yield fake


@pytest.fixture
def fake(server: FakeProviderServer) -> Iterator[FakeProviderServer]:
    server.reset()
    yield server
    server.reset()
