"""Secrets: the OS keyring store (an in-memory keyring backend here) and key resolution order."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import keyring
import pytest
from keyring.backends import fail

from car_inference.config import CarConfig
from car_inference.errors import ConfigError, InferenceError
from car_inference.secrets import SERVICE, ResolvedKey, SecretStore, SecretStoreUnavailable, resolve_keys
from fakes.keyring import MemoryKeyring

SECRET = "sk-secret-value-12345678"


@pytest.fixture
def no_keyring_backend() -> Iterator[None]:
    previous = keyring.get_keyring()
    keyring.set_keyring(fail.Keyring())
    yield
    keyring.set_keyring(previous)


def test_put_get_list_delete(tmp_path: Path, memory_keyring: MemoryKeyring) -> None:
    store = SecretStore(tmp_path)
    assert store.available() and store.names() == []
    store.put("OPENAI_API_KEY", f"  {SECRET}\n")
    store.put("ANTHROPIC_API_KEY", "sk-ant-other-1234")
    assert memory_keyring.data[(SERVICE, "OPENAI_API_KEY")] == SECRET
    assert store.get("OPENAI_API_KEY") == SECRET and store.get("MISSING") is None
    assert store.names() == ["ANTHROPIC_API_KEY", "OPENAI_API_KEY"]
    index = (tmp_path / "secrets.json").read_text()
    assert json.loads(index) == {"names": ["ANTHROPIC_API_KEY", "OPENAI_API_KEY"]} and SECRET not in index
    assert store.delete("OPENAI_API_KEY") is True
    assert store.delete("OPENAI_API_KEY") is False
    assert store.names() == ["ANTHROPIC_API_KEY"] and store.get("OPENAI_API_KEY") is None


def test_bad_names_and_empty_values(tmp_path: Path, memory_keyring: MemoryKeyring) -> None:
    store = SecretStore(tmp_path)
    for name in ("", "1ABC", "with space", "a-b"):
        with pytest.raises(ConfigError):
            store.put(name, "x")
    with pytest.raises(ConfigError, match="empty"):
        store.put("OPENAI_API_KEY", "   ")


def test_no_usable_keyring_backend(tmp_path: Path, no_keyring_backend: None) -> None:
    store = SecretStore(tmp_path)
    assert not store.available()
    with pytest.raises(SecretStoreUnavailable, match="keyring backend") as info:
        store.put("OPENAI_API_KEY", SECRET)
    assert isinstance(info.value, InferenceError) and "\n" not in str(info.value)
    assert store.get("OPENAI_API_KEY") is None  # resolution skips it
    assert resolve_keys("OPENAI_API_KEY", env={}, store=store) == []


def test_keyring_not_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "keyring", None)
    store = SecretStore(tmp_path)
    with pytest.raises(SecretStoreUnavailable, match=r"pip install 'car-inference\[keyring\]'"):
        store.put("OPENAI_API_KEY", SECRET)
    assert store.get("OPENAI_API_KEY") is None


def test_broken_backend_does_not_break_resolution(tmp_path: Path, memory_keyring: MemoryKeyring) -> None:
    def boom(service: str, username: str) -> str:
        raise RuntimeError("dbus is down")

    memory_keyring.get_password = boom  # type: ignore[method-assign]
    assert SecretStore(tmp_path).get("OPENAI_API_KEY") is None


def test_resolution_order(tmp_path: Path, memory_keyring: MemoryKeyring) -> None:
    store = SecretStore(tmp_path)
    store.put("OPENAI_API_KEY", "k-keyring,k-env")
    config = CarConfig(home=tmp_path, keys={"OPENAI_API_KEY": ["k-config", " ", "k-plural-1"]})
    env = {"OPENAI_API_KEY": "k-env", "OPENAI_API_KEYS": "k-plural-1, k-plural-2,,"}
    found = resolve_keys("OPENAI_API_KEY", config, env=env, store=store)
    assert [(k.value, k.source) for k in found] == [
        ("k-env", "env"),
        ("k-plural-1", "env:OPENAI_API_KEYS"),
        ("k-plural-2", "env:OPENAI_API_KEYS"),
        ("k-config", "config"),
        ("k-keyring", "keyring"),
    ]
    assert "k-env" not in repr(found[0])
    assert resolve_keys("OPENAI_API_KEY", env={}) == []
    assert resolve_keys("X_API_KEY", env={"X_API_KEY": "v"}) == [ResolvedKey("v", "env")]


def test_puts_at_once_keep_every_name(tmp_path: Path, memory_keyring: MemoryKeyring) -> None:
    """Eight concurrent `car secrets put` left six names in the index; a name not there is never
    looked up, so its stored key went unused (flock across processes, and threads, here)."""
    import threading

    names = [f"KEY_{i}" for i in range(32)]
    start = threading.Barrier(len(names))

    def put(name: str) -> None:
        start.wait()
        SecretStore(tmp_path).put(name, f"sk-{name.lower()}-value")

    threads = [threading.Thread(target=put, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert SecretStore(tmp_path).names() == sorted(names)


def test_an_unreadable_index_is_refused_not_replaced(tmp_path: Path, memory_keyring: MemoryKeyring) -> None:
    """It was overwritten with the one name being stored: the others' keys were never used again."""
    store = SecretStore(tmp_path)
    store.put("KEY_A", "sk-a-value-1234")
    (tmp_path / "secrets.json").write_text('{"names": ["KEY_A", ')  # cut short
    with pytest.raises(ConfigError, match=r"secrets\.json cannot be read"):
        store.put("KEY_B", "sk-b-value-1234")
    with pytest.raises(ConfigError, match="delete it and put the keys again"):
        store.delete("KEY_A")
    assert (tmp_path / "secrets.json").read_text() == '{"names": ["KEY_A", '
