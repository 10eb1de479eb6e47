"""Every `car` command the README shows runs: a documented flag cannot go missing.

The README is parsed, not copied: each fenced ``bash`` block's `car` lines (also inside `&&`
chains, after `VAR=value`, or fed by `echo ... |` or `printf ... |`), with the block's
`export`s, and each transcript block (``$ car ...`` followed by what it prints). The commands of
a block run in order, in-process through typer's runner, in a fresh ``$CAR_HOME`` and working
folder. A command must exit 0 without a traceback, unless this file lists it as failing on
purpose; what the README says it prints (``# -> text`` after a command, the lines of a
transcript) must be what it prints.

Hosted models run against the fake provider server (the real SDKs over loopback): the blocks under
"Hosted models" get keys for every provider and a models.toml that points the hosts at it. What
the test changes in a command is listed in ``SUBSTITUTIONS`` and ``_cap_tokens``, each with why.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from car_inference.cli import app
from fakes import FakeProviderServer
from fakes.keyring import MemoryKeyring

README = Path(__file__).resolve().parents[2] / "README.md"
runner = CliRunner()

# The README's trace id is an example; the block's own `generate --json` provides a real one.
EXAMPLE_TRACE = "3f3137b609534ab9ad11cc870b8c7ea9"
# Commands that cannot succeed in an offline test, with the exit status and the one-line error
# they must give instead.
EXPECTED_FAILURES = {
    "car models pull qwen3-8b": (1, "could not pull"),  # downloads weights; tests have no network
    "car models rm qwen3-8b": (1, "nothing to remove"),  # ... so there is nothing pulled to remove
    # `runtimes start` is only parsed (it serves until Ctrl-C), so the server has written no log.
    "car runtimes logs smollm2-served -n 50": (1, "has no log yet"),
    # Image and video generation: the pipelines are pulled weights and gpt-image-2 needs a key.
    "car models pull sd-turbo": (1, "could not pull"),
    'car image "a lighthouse at dusk, oil painting" -o lighthouse.png --seed 7': (1, "model can run here"),
    'car image "make it winter" --edit lighthouse.png -o winter.png -m sd-turbo': (1, "car models pull"),
    'car image "a red fox" -m gpt-image-2 -s 1536x1024 -n 2 -o fox.png': (1, "OPENAI_API_KEY"),
    'car video "waves on a beach at sunset" -m ltx-video -d 4 -o waves.mp4': (1, "car models pull"),
    'car video "a lighthouse beam sweeping the sea" -m omni-flash -o beam.mp4': (1, "GEMINI_API_KEY"),
    # The block's [state] url is an example host; tests/cli/test_state_cli.py migrates for real.
    "car state migrate": (2, "no PostgreSQL to migrate to"),
}
# Long-running (they serve until Ctrl-C): parsed, so every flag must exist, but not run; their own
# tests run them (tests/cli/test_serve_cli.py, tests/cli/test_runtimes_cli.py).
PARSE_ONLY = (("serve",), ("runtimes", "start"))
HOSTED_SECTIONS = ("Hosted models and OpenAI-compatible servers", "Hosted speech and the speech policy")
CHAT_INPUT = "Hello\n/exit\n"
MAX_TOKENS = "12"


@dataclass
class Command:
    line: str  # as written in the README
    args: list[str]  # after `car`
    env: dict[str, str] = field(default_factory=dict)
    stdin: str | None = None
    prints: list[str] = field(default_factory=list)  # what the README says it prints


@dataclass
class Block:
    section: str
    commands: list[Command]
    files: dict[str, str] = field(default_factory=dict)  # the section's `# models.toml` blocks

    @property
    def id(self) -> str:
        return f"{self.section[:30]}: {self.commands[0].line[:50]}"


def _fences(text: str) -> Iterator[tuple[str, str, list[str]]]:
    """(section heading, fence language, lines) of each fenced block."""
    section, lang = "", None
    body: list[str] = []
    for line in text.splitlines():
        if lang is None and line.startswith("## "):
            section = line[3:].strip()
        if line.startswith("```"):
            if lang is None:
                lang, body = line[3:].strip(), []
            else:
                yield section, lang, body
                lang = None
        elif lang is not None:
            body.append(line)


def _comment(line: str) -> str:
    """The text after a ``# ->`` comment: what the README says the command prints."""
    match = re.search(r"\s#\s*->\s*(.+)$", line)
    return match.group(1).strip() if match else ""


def _commands_of_line(line: str, exports: dict[str, str]) -> list[Command]:
    # `[--flag]` marks an optional flag: the test runs the command with it.
    tokens = [re.sub(r"^\[(-.*)\]$", r"\1", t) for t in shlex.split(line, comments=True)]
    if tokens[:1] == ["export"]:
        for t in tokens[1:]:
            name, value = t.split("=", 1)
            exports[name] = value
        return []
    found = []
    for segment in _split(tokens, "&&"):
        piped = _split(segment, "|")
        stdin = None
        if len(piped) == 2 and piped[0][:1] == ["echo"]:
            stdin = " ".join(piped[0][1:]) + "\n"
        elif len(piped) == 2 and piped[0][:1] == ["printf"]:  # its format's escapes, as printf(1)
            stdin = piped[0][1].encode().decode("unicode_escape")
        env = dict(exports)
        words = piped[-1]
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
            name, value = words.pop(0).split("=", 1)
            env[name] = value
        if words and (words[0] == "car" or words[0].endswith("/car")):
            prints = [_comment(line)] if _comment(line) else []
            found.append(Command(line.split("#", maxsplit=1)[0].strip(), words[1:], env, stdin, prints))
    return found


def _split(tokens: list[str], sep: str) -> list[list[str]]:
    parts: list[list[str]] = [[]]
    for token in tokens:
        if token == sep:
            parts.append([])
        else:
            parts[-1].append(token)
    return parts


def readme_blocks() -> list[Block]:
    blocks: list[Block] = []
    files: dict[str, dict[str, str]] = {}  # per section: the TOML files it tells the reader to write
    for section, lang, lines in _fences(README.read_text(encoding="utf-8")):
        if lang == "toml" and lines and lines[0].strip() in ("# models.toml", "# config.toml"):
            shown = files.setdefault(section, {})
            name = lines[0].strip()[2:]
            shown[name] = shown.get(name, "") + "\n".join(lines) + "\n"
            continue
        commands: list[Command] = []
        if lang == "bash":
            exports: dict[str, str] = {}
            for line in lines:
                if line.strip():
                    commands += _commands_of_line(line, exports)
        elif lang == "" and any(line.startswith("$ car ") for line in lines):
            for line in lines:  # a transcript: `$ command`, then what it prints
                if line.startswith("$ "):
                    commands += _commands_of_line(line[2:], {})
                elif commands and line.strip():
                    commands[-1].prints.append(line)
        if commands:
            blocks.append(Block(section, commands, files.get(section, {})))
    return blocks


BLOCKS = readme_blocks()


def test_the_readme_has_the_commands_this_test_expects() -> None:
    lines = [c.line for b in BLOCKS for c in b.commands]
    assert len(lines) >= 40, lines  # a parser that finds nothing must not pass
    for expected in (*EXPECTED_FAILURES, "car generate --base-url", "car speak", "car health"):
        assert any(line.startswith(expected) for line in lines), expected


# --- running -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProviderServer]:
    with FakeProviderServer() as server:
        yield server


def _substitutions(fake: FakeProviderServer) -> dict[str, str]:
    # Example servers of the README become the fake provider's OpenAI-compatible address.
    return {"http://127.0.0.1:8000/v1": fake.openai_base_url, "https://my-proxy/v1": fake.openai_base_url}


def _prepare_home(home: Path, fake: FakeProviderServer, block: Block) -> None:
    """A port nobody serves (so `car health` never finds another test's server); where a block
    runs `car models discover`, the `[[endpoints]]` server it asks; for hosted models, the
    providers' hosts pointed at the fake."""
    (home / "config.toml").write_text(
        f"[server]\nport = {_free_port()}\n" + block.files.get("config.toml", "")
    )
    toml = ""
    if any(c.args[:2] == ["models", "discover"] for c in block.commands):
        toml += (
            f'[[endpoints]]\nname = "gpubox"\nbase_url = "{fake.openai_base_url}"\n'
            # Embeddings only: routed generation stays on the embedded model, as on a fresh install.
            'models = ["text-embedding-3-small"]\ncapabilities = ["embed"]\n'
        )
    if block.section in HOSTED_SECTIONS:
        toml += (
            f'[hosts.openai]\nbase_url = "{fake.openai_base_url}"\n'
            f'[hosts.anthropic]\nbase_url = "{fake.anthropic_base_url}"\n'
            f'[hosts.gemini]\nbase_url = "{fake.gemini_base_url}"\n'
            f'[hosts.elevenlabs]\nbase_url = "{fake.base_url}"\n'
        )
    (home / "models.toml").write_text(toml + block.files.get("models.toml", ""))  # + what the section shows


def _cap_tokens(args: list[str]) -> list[str]:
    """Generation gets a small ``-n`` (speed; the flag itself is tested elsewhere)."""
    if args[:1] in (["generate"], ["chat"]) and not {"-n", "--max-tokens"} & set(args):
        return [*args, "-n", MAX_TOKENS]
    return args


def _parse_only(args: list[str]) -> None:
    """Every option of ``args`` exists and parses, without running the command."""
    group: Any = typer.main.get_command(app)
    command = group.get_command(group.make_context("car", [args[0]]), args[0])
    assert command is not None, args
    command.make_context(args[0], list(args[1:]))


def _check_prints(command: Command, stdout: str, stderr: str) -> None:
    """What the README says a command prints: a `# -> text` comment, or a transcript's lines
    when it shows an error. (Other transcripts are examples of routing output, which depends on
    the sampled exploration; their commands must still succeed.)"""
    shows_error = any(p.startswith("error:") for p in command.prints)
    for expected in command.prints if shows_error or len(command.prints) == 1 else ():
        if expected.startswith("..."):
            continue  # an elision of the README's, not output
        shown = stderr if expected.startswith(("error:", "did you mean")) else stdout
        for piece in (p for p in expected.split("...") if p.strip()):
            assert piece.strip() in shown, f"{command.line!r} should print {piece.strip()!r}:\n{shown}"


def _run(command: Command, subs: dict[str, str], trace: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    args = [subs.get(a, a) for a in command.args]
    args = [trace[-1] if a == EXAMPLE_TRACE and trace else a for a in args]
    if any(tuple(args[: len(p)]) == p for p in PARSE_ONLY):
        _parse_only(args)
        return
    for name, value in command.env.items():
        monkeypatch.setenv(name, value)
    stdin = command.stdin if command.stdin is not None else CHAT_INPUT if args[:1] == ["chat"] else None
    if args[:2] == ["secrets", "put"]:
        stdin = "sk-readme-test-key-0001\n"
    result = runner.invoke(app, _cap_tokens(args), input=stdin)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        details = "".join(traceback.format_exception(result.exception))
        pytest.fail(f"{command.line!r} raised:\n{details}")
    assert "Traceback" not in result.stdout + result.stderr, command.line
    expected_error = any(p.startswith("error:") for p in command.prints)
    failure = EXPECTED_FAILURES.get(command.line)
    if failure is not None:
        code, message = failure
        assert result.exit_code == code and message in result.stderr, (command.line, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    elif expected_error:
        assert result.exit_code == 2, (command.line, result.stderr)
    else:
        assert result.exit_code == 0, f"{command.line!r} exited {result.exit_code}:\n{result.stderr}"
    _check_prints(command, result.stdout, result.stderr)
    if "--json" in args and args[:1] == ["generate"]:
        trace.append(json.loads(result.stdout)["trace_id"])


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block_runs(
    block: Block,
    fake: FakeProviderServer,
    isolated_home: Path,
    tmp_path: Path,
    memory_keyring: MemoryKeyring,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _prepare_home(isolated_home, fake, block)
    if block.section in HOSTED_SECTIONS:
        for name in (
            "OPENAI_API_KEY",
            "ANTHROPIC_API_KEY",
            "GEMINI_API_KEY",
            "ELEVENLABS_API_KEY",
            "PROXY_KEY",
        ):
            monkeypatch.setenv(name, f"sk-readme-{name.lower()}-0001")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    fake.reset()
    trace: list[str] = []
    for command in block.commands:
        _run(command, _substitutions(fake), trace, monkeypatch)


# Commands that only act (or, like chat and serve, keep running): the README names them as the
# ones without --json. A new command that returns something must take --json or be listed here
# and in the README.
ACT_ONLY = {
    "chat", "serve", "feedback", "keys reset", "secrets put", "secrets rm", "profiles export",
    "profiles import", "profiles forget", "runtimes stop", "runtimes logs", "runtimes install",
}  # fmt: skip


def _leaf_commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
    subcommands = getattr(command, "commands", None)
    if not subcommands:
        yield " ".join(path), command
        return
    for name, sub in subcommands.items():
        yield from _leaf_commands(sub, (*path, name))


def test_every_command_that_returns_a_result_takes_json() -> None:
    readme = " ".join(README.read_text(encoding="utf-8").split())
    assert "Every command that returns a result takes `--json`" in readme
    for name, command in _leaf_commands(typer.main.get_command(app)):
        options = {opt for param in command.params for opt in getattr(param, "opts", [])}
        assert ("--json" in options) != (name in ACT_ONLY), name
        if name in ACT_ONLY:
            assert f"`{name}`" in readme, f"the README should name `{name}` among the commands without --json"
