"""The fake provider server for the tests of its own modules (``server_fixtures``)."""

from .server_fixtures import fake, server

__all__ = ["fake", "server"]
