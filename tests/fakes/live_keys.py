"""For the live tests: the provider keys and CAR_* settings the root conftest takes out of the
environment for the test run, and the socket methods from before its loopback-only guard."""

import socket

LIVE_KEYS: dict[str, str] = {}
# Captured at import, which the root conftest does before it installs its guard.
REAL_CONNECT = socket.socket.connect
REAL_CONNECT_EX = socket.socket.connect_ex
