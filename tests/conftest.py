"""Test-wide setup: no network beyond loopback, no user state, no stray API keys.

The default run needs no key and no network: a guard refuses connections to anything but
loopback, Hugging Face libraries run offline, and each test gets its own empty ``$CAR_HOME``.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import pytest

from fakes.keyring import MemoryKeyring
from fakes.live_keys import LIVE_KEYS, REAL_CONNECT, REAL_CONNECT_EX

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["CAR_NO_SPINNER"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if TYPE_CHECKING:
    import _socket  # socket.socket's base, where typeshed declares connect and connect_ex

    from _typeshed import ReadableBuffer

    from car_inference.engine import InferenceEngine

    _Address: TypeAlias = tuple[Any, ...] | str | ReadableBuffer  # what socket.connect takes

_real_connect = REAL_CONNECT
_real_connect_ex = REAL_CONNECT_EX


def _allowed(address: object) -> bool:
    if not isinstance(address, tuple):  # AF_UNIX paths and the like stay on this machine
        return True
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost would need DNS, i.e. the network


class NetworkBlocked(RuntimeError):
    pass


def _guarded_connect(self: _socket.socket, address: _Address) -> None:
    if not _allowed(address):
        raise NetworkBlocked(f"tests may only connect to loopback, not {address!r}")
    return _real_connect(self, address)


def _guarded_connect_ex(self: _socket.socket, address: _Address) -> int:
    if not _allowed(address):
        raise NetworkBlocked(f"tests may only connect to loopback, not {address!r}")
    return _real_connect_ex(self, address)


socket.socket.connect = _guarded_connect  # type: ignore[method-assign]
socket.socket.connect_ex = _guarded_connect_ex  # type: ignore[method-assign]

# Provider keys and CAR_* settings from the developer's shell would change what is "available"
# and where requests go. They are taken out for the whole run; live tests read LIVE_KEYS.
LIVE_KEYS.update(
    {
        name: os.environ.pop(name)
        for name in list(os.environ)
        if name.endswith(("_API_KEY", "_API_KEYS")) or (name.startswith("CAR_") and name != "CAR_NO_SPINNER")
    }
)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test: an empty $CAR_HOME."""
    home = tmp_path / "car-home"
    home.mkdir()
    monkeypatch.setenv("CAR_HOME", str(home))
    yield home


@pytest.fixture(scope="session")
def session_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("session-car-home")


@pytest.fixture(scope="session")
def local_engine(session_home: Path) -> InferenceEngine:
    """One engine over the embedded models for the whole session (loading them costs seconds)."""
    from car_inference.engine import InferenceEngine

    return InferenceEngine(home=session_home)


@pytest.fixture
def memory_keyring() -> Iterator[MemoryKeyring]:
    """The OS keyring replaced by an in-memory one for this test."""
    import keyring

    previous = keyring.get_keyring()
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    yield backend
    keyring.set_keyring(previous)
