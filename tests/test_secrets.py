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
from car_inference.secrets import (
    SERVICE,
    ResolvedKey,
    SecretStore,
    SecretStoreUnavailable,
    no_usable_key,
    resolve_keys,
)
from fakes.keyring import FileKeyring, MemoryKeyring

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
    names = _put_at_once(tmp_path, 32)
    assert SecretStore(tmp_path).names() == sorted(names)


def _put_at_once(home: Path, count: int) -> list[str]:
    """``count`` puts (KEY_i = sk-key_i-value) from threads released together; the names."""
    import threading

    names = [f"KEY_{i}" for i in range(count)]
    start = threading.Barrier(len(names))

    def put(name: str) -> None:
        start.wait()
        SecretStore(home).put(name, f"sk-{name.lower()}-value")

    threads = [threading.Thread(target=put, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return names


def test_an_unreadable_index_is_refused_not_replaced(tmp_path: Path, memory_keyring: MemoryKeyring) -> None:
    """It was overwritten with the one name being stored: the others' keys were never used again."""
    store = SecretStore(tmp_path)
    store.put("KEY_A", "sk-a-value-1234")
    (tmp_path / "secrets.json").write_text('{"names": ["KEY_A", ')  # cut short
    with pytest.raises(ConfigError, match=r"secrets\.json: cannot be read"):
        store.put("KEY_B", "sk-b-value-1234")
    with pytest.raises(ConfigError, match="delete it and put the keys again"):
        store.delete("KEY_A")
    assert (tmp_path / "secrets.json").read_text() == '{"names": ["KEY_A", '


def test_puts_at_once_keep_every_value_in_a_file_keyring(tmp_path: Path) -> None:
    """keyrings.alt's file backend (the README's headless suggestion) rewrites its file whole: puts
    at once kept every name in the index but lost values, older ones included."""
    previous = keyring.get_keyring()
    keyring.set_keyring(FileKeyring(tmp_path / "keyring.json"))
    try:
        SecretStore(tmp_path).put("OLDER", "sk-older-value")
        names = _put_at_once(tmp_path, 12)
        store = SecretStore(tmp_path)
        assert {n: store.get(n) for n in [*names, "OLDER"]} == {
            **{n: f"sk-{n.lower()}-value" for n in names},
            "OLDER": "sk-older-value",
        }
    finally:
        keyring.set_keyring(previous)


@pytest.mark.parametrize("index", ["[1, 2]", '{"names": "OPENAI_API_KEY"}'])
def test_an_index_of_the_wrong_shape_is_refused_and_nothing_is_stored(
    tmp_path: Path, memory_keyring: MemoryKeyring, index: str
) -> None:
    """`[1, 2]` was replaced by the one new name; a string of names was read letter by letter; and
    a refused put had stored its value already, unlisted."""
    (tmp_path / "secrets.json").write_text(index)
    with pytest.raises(ConfigError, match=r'not \{"names": \[\.\.\.\]\}'):
        SecretStore(tmp_path).put("NEWONE", "sk-new-value-1234")
    assert (tmp_path / "secrets.json").read_text() == index and not memory_keyring.data


def test_a_key_a_header_cannot_carry_is_skipped_and_refused(
    tmp_path: Path, memory_keyring: MemoryKeyring
) -> None:
    """A pasted zero-width space failed every request it was picked for ("malformed response")."""
    env = {"OPENAI_API_KEYS": "sk-good-key-1,sk-bad-key-2\u200b,sk-line\nbreak"}
    assert [k.value for k in resolve_keys("OPENAI_API_KEY", env=env)] == ["sk-good-key-1"]
    with pytest.raises(ConfigError, match="a character an HTTP header cannot carry"):
        SecretStore(tmp_path).put("OPENAI_API_KEY", "sk-bad\u200b")
    assert [k.value for k in resolve_keys("OPENAI_API_KEY", env={"OPENAI_API_KEY": "sk a\tb"})] == ["sk a\tb"]


def test_a_variable_whose_every_key_is_unsendable_is_said_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its only key skipped for a zero-width space, the model said "set OPENAI_API_KEY", though it was."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEYS", "sk-test-key-bb\u200bbbbbbb0002")
    why = no_usable_key("OPENAI_API_KEY", refused=False)
    assert "holds a character an HTTP header cannot carry" in why and "set it again without it" in why
    monkeypatch.delenv("OPENAI_API_KEYS")
    assert no_usable_key("OPENAI_API_KEY", refused=False).startswith("set OPENAI_API_KEY")
