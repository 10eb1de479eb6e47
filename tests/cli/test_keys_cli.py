"""`car keys stats|reset` and `car secrets put|list|rm`, run in-process with typer's runner."""

from __future__ import annotations

import json
from pathlib import Path

import keyring
import pytest
import typer
from keyring.backends import fail
from typer.testing import CliRunner

from car_inference.cli.keys import register
from car_inference.config import load_config
from car_inference.keys import KeyPool
from car_inference.secrets import SERVICE
from fakes.keyring import MemoryKeyring

A = "sk-cli-test-key-aaaa0001"
B = "sk-cli-test-key-bbbb0002"

app = typer.Typer()
register(app)
runner = CliRunner()


def car(*args: str, input: str | None = None) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), input=input)
    return result.exit_code, result.stdout, result.stderr


def test_secrets_put_list_rm(memory_keyring: MemoryKeyring, isolated_home: Path) -> None:
    code, out, err = car("secrets", "put", "OPENAI_API_KEY", input=f"{A}\n")
    assert code == 0 and A not in out + err and "stored OPENAI_API_KEY" in err
    assert memory_keyring.data[(SERVICE, "OPENAI_API_KEY")] == A
    assert A not in (isolated_home / "secrets.json").read_text()
    car("secrets", "put", "GROQ_API_KEY", input=B)
    code, out, _ = car("secrets", "list")
    assert code == 0 and out.split() == ["GROQ_API_KEY", "OPENAI_API_KEY"]
    code, out, _ = car("secrets", "list", "--json")
    assert json.loads(out) == ["GROQ_API_KEY", "OPENAI_API_KEY"]
    code, out, _ = car("secrets", "rm", "GROQ_API_KEY")
    assert code == 0 and (SERVICE, "GROQ_API_KEY") not in memory_keyring.data
    code, _, err = car("secrets", "rm", "GROQ_API_KEY")
    assert code == 1 and "no stored secret named GROQ_API_KEY" in err


def test_secrets_put_errors(memory_keyring: MemoryKeyring) -> None:
    code, _, err = car("secrets", "put", "OPENAI_API_KEY", input="\n")
    assert code == 2 and "no value" in err
    code, _, err = car("secrets", "put", "not a name", input="")  # the name first, before any value
    assert code == 2 and "not a valid secret name" in err
    code, _, err = car("secrets", "put", "", input="x")  # said "no value given for " (the value)
    assert code == 2 and "the secret's name is empty" in err
    previous = keyring.get_keyring()
    keyring.set_keyring(fail.Keyring())
    try:
        code, _, err = car("secrets", "put", "OPENAI_API_KEY", input=A)
    finally:
        keyring.set_keyring(previous)
    assert code == 1 and "keyring backend" in err and len(err.strip().splitlines()) == 1 and A not in err


def test_keys_stats_table_and_json(isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEYS", f"{A},{B}")
    pool = KeyPool.for_config(load_config(), store=None)
    pool.report("OPENAI_API_KEY", A, status=429, retry_after=600)
    pool.report("OPENAI_API_KEY", B, status=200, retry_after=None)
    pool.flush()
    code, out, _ = car("keys", "stats", "--json")
    assert code == 0 and A not in out and B not in out
    rows = json.loads(out)["OPENAI_API_KEY"]
    assert [(r["masked"], r["source"], r["state"], r["rate_limits"]) for r in rows] == [
        ("sk-…0001", "env:OPENAI_API_KEYS", "cooling", 1),
        ("sk-…0002", "env:OPENAI_API_KEYS", "ok", 0),
    ]
    code, out, _ = car("keys", "stats")
    assert code == 0 and "sk-…0001" in out and "cooling until" in out and A not in out
    code, out, _ = car("keys", "reset", "OPENAI_API_KEY")
    assert code == 0 and "reset 1 key(s)" in out
    for command in ("reset", "stats"):  # "reset 0 key(s)" / "no API keys found", exit 0, hid the typo
        code, out, err = car("keys", command, "OPENAI_APIKEY")
        assert code == 2 and not out and "error: no key variable 'OPENAI_APIKEY'" in err
        assert "did you mean OPENAI_API_KEY" in err
    code, out, _ = car("keys", "stats", "OPENAI_API_KEY", "--json")
    assert {r["state"] for r in json.loads(out)["OPENAI_API_KEY"]} == {"ok"}


def test_keys_commands_on_an_unusable_state_database_are_one_line_with_status_2(isolated_home: Path) -> None:
    """They said "reset 0 key(s)" and exited 0 (with a warning) where every other command exits 2."""
    (isolated_home / "state.db").write_bytes(b"not a database at all" * 300)
    for args in (("keys", "reset"), ("keys", "stats")):
        code, _, err = car(*args)
        assert code == 2 and err.strip().splitlines() == [
            f"error: the key statistics cannot be used: {isolated_home / 'state.db'}: file is not a database"
        ]


def test_keys_stats_without_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = car("keys", "stats")
    assert code == 0 and "no API keys found" in out
    code, out, _ = car("keys", "stats", "--json")
    assert json.loads(out) == {}


def test_secrets_list_without_a_keyring_says_so() -> None:
    previous = keyring.get_keyring()
    keyring.set_keyring(fail.Keyring())
    try:
        code, out, err = car("secrets", "list")
    finally:
        keyring.set_keyring(previous)
    assert code == 1 and out == "" and "keyring backend" in err and len(err.strip().splitlines()) == 1


def test_secrets_list_of_an_unreadable_index_is_an_error(
    memory_keyring: MemoryKeyring, isolated_home: Path
) -> None:
    """It printed nothing and exited 0: "nothing stored", which was not so."""
    (isolated_home / "secrets.json").write_text('{"names": ["OPENAI_API_KEY", ')
    code, out, err = car("secrets", "list")
    assert code == 2 and "cannot be read" in err and not out
