"""The one table of kinds: everything kind-dependent derives from it, and a plugin adds a kind
through a real entry point (a distribution's metadata on sys.path, read by importlib.metadata)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any

import pytest

from car_inference import _tomlfile, schema
from car_inference.backends import BACKENDS, backend_tasks
from car_inference.catalog import ENDPOINT_KINDS, EndpointConfig, load_catalog
from car_inference.errors import ConfigError
from car_inference.kinds import BUILTIN_KINDS, KindSpec, Locality
from car_inference.registry import UnifiedRegistry
from car_inference.runtimes.specs import RUNTIME_FOR_KIND
from car_inference.schema import KINDS, ModelCapability, ModelSchema
from car_inference.sources import SourceBase


def test_every_kind_in_the_table_is_in_the_source_union_and_the_error_tags() -> None:
    union = typing.get_args(typing.get_args(schema.ModelSource)[0])
    assert {cls for cls in union} == {spec.source for spec in KINDS.values()}
    assert set(_tomlfile._UNION_TAGS) == set(KINDS) >= set(BUILTIN_KINDS)
    for kind, spec in KINDS.items():
        assert spec.kind == kind and spec.source.model_fields["kind"].default == kind


def test_the_type_checkers_union_names_the_built_in_source_classes() -> None:
    """schema.py spells the union out for mypy; it must list exactly the table's built-in classes."""
    tree = ast.parse(Path(schema.__file__).read_text())
    guarded = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    names = {n.id for n in ast.walk(guarded.body[0]) if isinstance(n, ast.Name)} - {"ModelSource"}
    assert names == {spec.source.__name__ for spec in BUILTIN_KINDS.values()}


def test_kind_sets_backends_hints_and_runtimes_derive_from_the_table() -> None:
    by_locality = {loc: {k for k, s in KINDS.items() if s.locality is loc} for loc in Locality}
    assert schema.IN_PROCESS_KINDS == by_locality[Locality.IN_PROCESS] >= {"gguf", "rapidocr", "whisper"}
    assert schema.SERVER_KINDS == by_locality[Locality.SERVER] == {"ollama", "vllm"}
    assert schema.REMOTE_KINDS == by_locality[Locality.REMOTE] >= {"openai", "anthropic", "elevenlabs"}
    assert {"delegated"} == schema.RUNNER_KINDS
    assert set(BACKENDS) == set(KINDS)
    assert all(BACKENDS[k].target == s.backend and BACKENDS[k].extra == s.extra for k, s in KINDS.items())
    assert KINDS["rapidocr"].install_hint() == "pip install 'car-inference[ocr]'"
    assert KINDS["delegated"].install_hint() == "see README" and KINDS["delegated"].installed()
    # The runtimes' own table (runtimes/specs.py) agrees with the kinds' runtime column.
    assert {k: s.runtime for k, s in KINDS.items() if s.runtime} == RUNTIME_FOR_KIND
    assert {"openai", "ollama", "vllm"} == ENDPOINT_KINDS
    assert {c for c in backend_tasks("delegated")} >= {ModelCapability.GENERATE, ModelCapability.EMBED}


def test_locality_decides_local_in_process_and_what_makes_a_model_available() -> None:
    def model(source: dict[str, object]) -> ModelSchema:
        return ModelSchema.model_validate(
            {"id": "a/b", "name": "b", "provider": "a", "capabilities": ["generate"], "source": source}
        )

    registry = UnifiedRegistry(key_check=lambda env: env == "SET_KEY")
    cases = {
        "in_process, files missing": (model({"kind": "gguf", "path": "/nowhere/x.gguf"}), False),
        "server, configured": (model({"kind": "vllm", "model_name": "m"}), True),
        "remote, key set": (model({"kind": "anthropic", "api_key_env": "SET_KEY"}), True),
        "remote, key unset": (model({"kind": "anthropic", "api_key_env": "UNSET_KEY"}), False),
        "runner, none registered": (model({"kind": "delegated"}), False),
    }
    for what, (m, available) in cases.items():
        assert registry.register(m).available is available, what
    reasons = [registry.unavailable_reason(m) for m, ok in cases.values() if not ok]
    assert "/nowhere/x.gguf" in reasons[0]
    assert reasons[1] == "set UNSET_KEY (or store it with `car secrets put UNSET_KEY`)"
    assert "no inference runner is registered" in reasons[2]
    assert model({"kind": "vllm", "model_name": "m"}).is_local
    assert not model({"kind": "delegated"}).is_local and not model({"kind": "delegated"}).in_process


def test_a_kind_spec_needs_a_source_with_a_literal_kind() -> None:
    class NoKind(SourceBase):
        pass

    with pytest.raises(TypeError, match="kind: Literal"):
        _ = KindSpec(NoKind, "x:Y", Locality.REMOTE).kind


# --- [hosts] protocol and [[endpoints]] kind --------------------------------------------------------


def test_a_host_protocol_must_be_the_one_the_model_kind_speaks(tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text(
        '[hosts.lab]\nprotocol = "anthropic_messages"\nbase_url = "http://127.0.0.1:9/"\n'
        'api_key_env = "LAB_KEY"\n\n'
        '[[models]]\nid = "lab/claude"\nname = "claude"\nprovider = "lab"\ncapabilities = ["generate"]\n'
        '[models.source]\nkind = "anthropic"\nhost = "lab"\n\n'
        '[[models]]\nid = "lab/chat"\nname = "chat"\nprovider = "lab"\ncapabilities = ["generate"]\n'
        '[models.source]\nkind = "openai"\nhost = "lab"\n'
    )
    speaks = r"lab/chat is a 'openai' model .* host 'lab' speaks anthropic_messages"
    with pytest.raises(ConfigError, match=speaks):
        load_catalog(models)
    models.write_text(models.read_text().split('\n\n[[models]]\nid = "lab/chat"')[0])
    claude = next(m for m in load_catalog(models).models if m.id == "lab/claude")
    assert claude.source.base_url == "http://127.0.0.1:9/"  # type: ignore[union-attr]


def test_an_unknown_host_protocol_is_a_config_error_with_its_line(tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text('[hosts.lab]\nbase_url = "http://x/"\nprotocol = "carrier_pigeon"\n')
    with pytest.raises(ConfigError, match="unknown protocol 'carrier_pigeon'") as caught:
        load_catalog(models)
    assert caught.value.line == 3


def test_endpoint_kinds_are_those_whose_source_describes_a_served_model() -> None:
    def source(kind: str) -> Any:
        endpoint = EndpointConfig(name="lan", kind=kind, base_url="http://h:8000/v1", models=["m"])
        return endpoint.to_schemas()[0].source

    ollama, vllm, openai = source("ollama"), source("vllm"), source("openai")
    assert ollama.host == "http://h:8000" and vllm.endpoint == "http://h:8000"
    assert openai.base_url == "http://h:8000/v1" and not openai.needs_key
    with pytest.raises(ValueError, match="kind is one of ollama, openai, vllm, not 'anthropic'"):
        EndpointConfig(name="lan", kind="anthropic", base_url="http://h/")


# --- a plugin, through a real entry point -----------------------------------------------------------

PLUGIN = """
from typing import Literal

from car_inference.kinds import KindSpec, Locality
from car_inference.sources import SourceBase


class EchoSource(SourceBase):
    kind: Literal["echo"] = "echo"
    greeting: str = "echo"


SPEC = KindSpec(EchoSource, "car_echo_kind.backend:EchoBackend", Locality.SERVER, requires=("json",))
NOT_A_SPEC = 42
"""

BACKEND = """
from car_inference.backends.base import GenerationOutput
from car_inference.stream import Done, TextDelta


class EchoBackend:
    def __init__(self, ctx):
        self.ctx = ctx

    async def generate(self, model, request):
        return GenerationOutput(text=f"{model.source.greeting}: {request.last_user_text()}")

    async def stream(self, model, request):
        out = await self.generate(model, request)
        yield TextDelta(text=out.text)
        yield Done(text=out.text)
"""

ENTRY_POINTS = """
[car_inference.backends]
echo = car_echo_kind:SPEC
gguf = car_echo_kind:SPEC
broken = car_no_such_module:SPEC
notspec = car_echo_kind:NOT_A_SPEC
echo2 = car_echo_kind:SPEC
"""

SCRIPT = """
import asyncio, json, logging, sys
logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
from car_inference.engine import InferenceEngine
from car_inference.errors import ConfigError
from car_inference.requests import GenerateRequest
from car_inference.schema import KINDS
from car_inference._tomlfile import _UNION_TAGS

engine = InferenceEngine()
model = engine.resolve("plug/echo")
result = asyncio.run(engine.generate(GenerateRequest(prompt="hi there", model="plug/echo")))
routed = asyncio.run(engine.generate(GenerateRequest(prompt="hi again")))
health = engine.model_health()
engine.close()
print(json.dumps({
    "kinds": sorted(KINDS), "origin": KINDS["echo"].origin, "tagged": "echo" in _UNION_TAGS,
    "available": model.available, "local": model.is_local, "text": result.text, "routed": routed.model_used,
    "gguf_backend": KINDS["gguf"].backend,
    "health": [k.model_dump(mode="json") for k in health.kinds if k.kind == "echo"],
}))
"""


@pytest.fixture
def plugin_path(tmp_path: Path) -> Path:
    """A tiny installed distribution: its package and its .dist-info with entry_points.txt."""
    site = tmp_path / "site"
    package = site / "car_echo_kind"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(PLUGIN)
    (package / "backend.py").write_text(BACKEND)
    dist = site / "car_echo_kind-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: car-echo-kind\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(ENTRY_POINTS)
    return site


def _run(site: Path, home: Path, code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "CAR_HOME": str(home)}  # fmt: skip
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=False
    )


def test_a_plugin_adds_a_kind_through_the_entry_point_group(plugin_path: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "models.toml").write_text(
        '[[models]]\nid = "plug/echo"\nname = "echo"\nprovider = "plug"\ncapabilities = ["generate"]\n'
        "quality = 1.0\ncontext_length = 100000\n"
        '[models.source]\nkind = "echo"\ngreeting = "hello"\n'
    )
    (home / "config.toml").write_text("[routing]\nprefer_local = false\nexploration_rate = 0.0\n")
    done = _run(plugin_path, home, SCRIPT)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert "echo" in out["kinds"] and out["tagged"] and out["origin"] == "plugin car-echo-kind 0.1"
    assert out["available"] and out["local"] and out["text"] == "hello: hi there"
    assert out["routed"] == "plug/echo", "the router takes the plugin's model like any other"
    assert out["health"][0]["models"] == 1 and out["health"][0]["available_models"] == 1
    # A built-in kind is not replaced; broken entries are skipped, each with a warning.
    assert out["gguf_backend"] == "car_inference.backends.llamacpp:LlamaCppBackend"
    assert not {"broken", "notspec", "echo2"} & set(out["kinds"])
    warned = (
        "'gguf' (car_echo_kind:SPEC): a built-in kind",
        "'broken'",
        "NOT_A_SPEC is not a car_inference.kinds.KindSpec",
        "named 'echo2' but its source's kind is 'echo'",
    )
    for words in warned:
        assert words in done.stderr, (words, done.stderr)


def test_a_plugin_sources_mistakes_are_reported_with_file_line_and_field(
    plugin_path: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "models.toml").write_text(
        '[[models]]\nid = "plug/echo"\nname = "echo"\nprovider = "plug"\ncapabilities = ["generate"]\n'
        '[models.source]\nkind = "echo"\ngretting = "hello"\n'
    )
    code = textwrap.dedent("""
        from car_inference.errors import ConfigError
        from car_inference.engine import InferenceEngine
        try:
            InferenceEngine()
        except ConfigError as exc:
            print(exc.field, exc.line)
    """)
    done = _run(plugin_path, home, code)
    assert done.stdout.split() == ["models.0.source.gretting", "8"], done.stderr
