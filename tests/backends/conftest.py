"""Shared by the hosted-provider backend tests: one fake provider server per module, reset per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fakes import FakeProviderServer


@pytest.fixture(scope="module")
def server() -> Iterator[FakeProviderServer]:
    with FakeProviderServer() as fake:
        yield fake


@pytest.fixture
def fake(server: FakeProviderServer) -> Iterator[FakeProviderServer]:
    server.reset()
    yield server
    server.reset()
