"""Shared by the hosted-provider backend tests: one fake provider server per module, reset per test
(``fakes.server_fixtures``)."""

from fakes.server_fixtures import fake, server

__all__ = ["fake", "server"]
