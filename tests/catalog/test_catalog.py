from __future__ import annotations

from pathlib import Path

import pytest

from car_inference.catalog import load_builtin, load_catalog
from car_inference.errors import ConfigError
from car_inference.registry import UnifiedRegistry
from car_inference.schema import ModelCapability


def test_builtin_catalog_has_the_embedded_defaults_and_the_qwen3_family() -> None:
    catalog = load_builtin()
    ids = {m.id for m in catalog.models}
    assert {
        "huggingface/smollm2-135m-instruct:q4_1",
        "sentence-transformers/all-minilm-l6-v2",
        "piper/en_us-joe-medium",
        "systran/faster-whisper-base",
        "qwen/qwen3-0.6b:q8_0",
        "qwen/qwen3-8b:q4_k_m",
        "qwen/qwen3-embedding-0.6b",
        "qwen/qwen3-reranker-0.6b:q8_0",
        "qwen/qwen2.5-vl-3b:q4_k_m",
    } <= ids
    assert len(ids) == len(catalog.models), "ids are unique"


def test_builtin_remote_models_resolve_their_hosts() -> None:
    catalog = load_builtin()
    remote = [m for m in catalog.models if m.is_remote and m.kind != "delegated"]
    providers = {m.provider for m in remote}
    assert {"openai", "anthropic", "google", "openrouter", "groq", "elevenlabs"} <= providers
    for m in remote:
        assert getattr(m.source, "base_url", None), m.id
        assert getattr(m.source, "api_key_env", None), m.id
    chat = [m for m in remote if ModelCapability.GENERATE in m.capabilities]
    assert all(m.context_length > 0 and m.cost.output_per_mtok > 0 for m in chat)
    assert {"ollama", "lmstudio", "llamacpp", "vllm"} <= set(catalog.hosts)


def test_user_catalog_adds_models_overrides_fields_and_hosts(isolated_home: Path) -> None:
    path = isolated_home / "models.toml"
    path.write_text(
        """
[hosts.openai]
base_url = "http://proxy.local/v1"

[[models]]
id = "huggingface/smollm2-135m-instruct:q4_1"
quality = 0.3
[models.cost]
input_per_mtok = 0.01

[[models]]
id = "me/tiny"
name = "Tiny"
provider = "me"
capabilities = ["generate"]
[models.source]
kind = "gguf"
path = "/models/tiny.gguf"

[[endpoints]]
name = "gpubox"
kind = "vllm"
base_url = "http://gpubox:8000/v1"
models = ["meta-llama/Llama-3.1-8B-Instruct"]
context_length = 32768
"""
    )
    catalog = load_catalog(path)
    by_id = {m.id: m for m in catalog.models}
    smol = by_id["huggingface/smollm2-135m-instruct:q4_1"]
    assert smol.quality == 0.3 and smol.cost.input_per_mtok == 0.01
    assert smol.cost.size_mb == 94, "fields the user did not set keep the built-in value"
    assert smol.source.kind == "gguf"
    assert by_id["me/tiny"].source.path == "/models/tiny.gguf"  # type: ignore[union-attr]
    vllm = by_id["gpubox/meta-llama/Llama-3.1-8B-Instruct"]
    assert vllm.kind == "vllm" and vllm.source.endpoint == "http://gpubox:8000"  # type: ignore[union-attr]
    openai_models = [m for m in catalog.models if getattr(m.source, "host", None) == "openai"]
    assert openai_models and all(m.source.base_url == "http://proxy.local/v1" for m in openai_models)  # type: ignore[union-attr]
    assert catalog.hosts["openai"].api_key_env == "OPENAI_API_KEY", (
        "unset host fields keep the built-in value"
    )


ENDPOINT = """
[[endpoints]]
name = "gpubox"
kind = "vllm"
base_url = "http://gpubox:8000/v1"
models = ["Qwen/Qwen3-8B", "small"]
context_length = 32768
"""


def test_a_sourceless_entry_refines_an_endpoint_model(isolated_home: Path) -> None:
    """A paid OpenAI-compatible endpoint was priced $0 (spend limits never saw it) unless the
    user rewrote the whole model, source included, as a [[models]] entry."""
    path = isolated_home / "models.toml"
    path.write_text(
        ENDPOINT
        + """
[[models]]
id = "gpubox/Qwen/Qwen3-8B"
quality = 0.7
fallbacks = ["gpubox/small"]
[models.cost]
input_per_mtok = 0.5
output_per_mtok = 1.5
"""
    )
    catalog = load_catalog(path)
    by_id = {m.id: m for m in catalog.models}
    qwen = by_id["gpubox/Qwen/Qwen3-8B"]
    assert qwen.cost.input_per_mtok == 0.5 and qwen.cost.output_per_mtok == 1.5
    assert qwen.quality == 0.7 and qwen.fallbacks == ["gpubox/small"]
    assert qwen.kind == "vllm" and qwen.context_length == 32768 and qwen.tags == ["endpoint"]
    assert by_id["gpubox/small"].cost.output_per_mtok == 0, "only the entry named is refined"
    (endpoint,) = catalog.endpoints
    assert endpoint.to_schemas(["Qwen/Qwen3-8B"])[0].cost.input_per_mtok == 0.5, (
        "a discovery's list of the same model is refined too"
    )


def test_a_refinement_of_a_discovered_model_waits_for_its_discovery(isolated_home: Path) -> None:
    path = isolated_home / "models.toml"
    path.write_text(
        ENDPOINT.replace('models = ["Qwen/Qwen3-8B", "small"]', "discover = true")
        + '\n[[models]]\nid = "gpubox/later"\n[models.cost]\noutput_per_mtok = 2.0\n'
    )
    catalog = load_catalog(path)
    assert not any(m.id.startswith("gpubox/") for m in catalog.models), "nothing listed yet"
    later, other = catalog.endpoints[0].to_schemas(["later", "other"])
    assert later.cost.output_per_mtok == 2.0 and other.cost.output_per_mtok == 0


def test_the_readmes_models_toml_example_loads(isolated_home: Path) -> None:
    """The README's models.toml example (an override, a GGUF, an endpoint and its refinement)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    example = readme.split("`models.toml` adds or overrides")[1].split("```toml\n")[1].split("```")[0]
    path = isolated_home / "models.toml"
    path.write_text(example)
    by_id = {m.id: m for m in load_catalog(path).models}
    qwen = by_id["gpubox/Qwen/Qwen3-8B"]
    assert qwen.kind == "vllm" and qwen.cost.output_per_mtok == 0.30 and qwen.quality == 0.6
    assert qwen.fallbacks == ["qwen/qwen3-0.6b:q8_0"] and "qwen/qwen3-0.6b:q8_0" in by_id
    assert by_id["me/mistral-7b:q4"].name == "my-mistral"


@pytest.mark.parametrize(
    ("entry", "line", "field", "says"),
    [
        ('id = "gpubox/typo"\nquality = 0.5\n', 9, "models.0.id", "neither lists 'typo'"),
        (
            'id = "gpubox/small"\n[models.cost]\ninput_per_mtok = "cheap"\n',
            12,
            "models.0.cost.input_per_mtok",
            "",
        ),
        ('id = "gpubox/small"\nquality = 2\n', 11, "models.0.quality", ""),
        # meant as an override or a refinement: "name: Field required (and 3 more problems)" said not
        ('id = "nobox/small"\nquality = 0.5\n', 9, "models.0.id", "has no source and is no built-in model"),
        (
            'id = "huggingface/smollm2-135m-instrct:q4_1"\nquality = 0.3\n',
            9,
            "models.0.id",
            "(did you mean huggingface/smollm2-135m-instruct:q4_1",
        ),
    ],
)
def test_a_bad_refinement_is_an_error_at_load(
    isolated_home: Path, entry: str, line: int, field: str, says: str
) -> None:
    """Checked when the file is read: a discovered model's bad price would otherwise surface only
    when the endpoint was first asked, on some request's path."""
    path = isolated_home / "models.toml"
    path.write_text(ENDPOINT + "\n[[models]]\n" + entry)
    with pytest.raises(ConfigError) as info:
        load_catalog(path)
    assert (info.value.line, info.value.field) == (line, field)
    assert says in str(info.value)


@pytest.mark.parametrize(
    ("text", "line", "field"),
    [
        (
            '[[models]]\nid = "me/x"\nname = "x"\nprovider = "me"\ncapabilities = ["fly"]\n'
            '[models.source]\nkind = "gguf"\npath = "/x"\n',
            5,
            "models.0.capabilities.0",
        ),
        (
            '[[models]]\nid = "me/x"\nname = "x"\nprovider = "me"\ncapabilities = ["generate"]\n'
            '[models.source]\nkind = "gguf"\n',
            6,
            "models.0.source",
        ),
        (
            '[[models]]\nid = "me/x"\nname = "x"\nprovider = "me"\ncapabilities = ["generate"]\n'
            '[models.source]\nkind = "gguf"\npath = "/x"\n[models.cost]\nsize_mb = "big"\n',
            10,
            "models.0.cost.size_mb",
        ),
        ('[[models]]\nname = "x"\n', 1, "models.0.id"),
        ('[[endpoints]]\nname = "bad name!"\nbase_url = "http://x"\n', 2, "endpoints.0.name"),
        ("[[models]\nid = 1\n", 1, None),
    ],
)
def test_bad_user_catalog_names_file_line_and_field(
    isolated_home: Path, text: str, line: int, field: str | None
) -> None:
    path = isolated_home / "models.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_catalog(path)
    err = info.value
    assert err.path == str(path)
    assert err.line == line
    assert err.field == field
    assert str(path) in str(err)


def test_unknown_host_reference_is_reported(isolated_home: Path) -> None:
    path = isolated_home / "models.toml"
    path.write_text(
        '[[models]]\nid = "me/x"\nname = "x"\nprovider = "me"\ncapabilities = ["generate"]\n'
        '[models.source]\nkind = "openai"\nhost = "nowhere"\n'
    )
    with pytest.raises(ConfigError, match="unknown host 'nowhere'"):
        load_catalog(path)


MINE = '[[models]]\nid = "me/mine"\nname = "{name}"\nprovider = "me"\ncapabilities = ["generate"]\n'
MINE += 'context_length = 4096\n[models.source]\nkind = "openai"\nbase_url = "http://127.0.0.1:9/v1"\n'


def test_a_user_model_taking_a_built_in_name_is_an_error(isolated_home: Path) -> None:
    """The built-in kept the name, and the user's model could never be reached by it."""
    path = isolated_home / "models.toml"
    path.write_text(MINE.format(name="smollm2"))
    with pytest.raises(ConfigError, match=r"me/mine: the name 'smollm2' is already huggingface/smollm2"):
        load_catalog(path)
    path.write_text(MINE.format(name="mine"))
    assert any(m.id == "me/mine" for m in load_catalog(path).models)
    # Names made from a built-in's id count too: "faster-whisper-base" kept reaching Whisper.
    path.write_text(MINE.format(name="faster-whisper-base"))
    with pytest.raises(ConfigError, match=r"'faster-whisper-base' is already systran/faster-whisper-base's"):
        load_catalog(path)
    ocr = 'aliases = ["pp-ocrv4-mobile"]\ncontext_length'
    path.write_text(MINE.format(name="mine").replace("context_length", ocr))
    with pytest.raises(ConfigError, match=r"'pp-ocrv4-mobile' is already rapidai/pp-ocrv4-mobile's"):
        load_catalog(path)
    # An override of one variant keeps the name its variants share.
    path.write_text('[[models]]\nid = "qwen/qwen3-8b:q4_k_m"\nname = "qwen3-8b"\nquality = 0.7\n')
    assert any(m.id == "qwen/qwen3-8b:q4_k_m" and m.quality == 0.7 for m in load_catalog(path).models)
    # A refinement of an endpoint's model is held to it too: its alias "gpt-4o-mini" was dead.
    box = '[[endpoints]]\nname = "box"\nbase_url = "http://127.0.0.1:9/v1"\nmodels = ["fake-a"]\n'
    path.write_text(box + '[[models]]\nid = "box/fake-a"\naliases = ["mybox", "gpt-4o-mini"]\n')
    with pytest.raises(ConfigError, match=r"box/fake-a: the name 'gpt-4o-mini' is already openai/gpt-4o"):
        load_catalog(path)
    path.write_text(box + '[[models]]\nid = "box/fake-a"\naliases = ["mybox"]\n')
    assert any(m.id == "box/fake-a" and m.aliases == ["mybox"] for m in load_catalog(path).models)


def test_an_endpoints_context_length_is_one_a_client_can_hold(isolated_home: Path) -> None:
    """2**31 failed later without a file, line or endpoint (the model's own bound)."""
    path = isolated_home / "models.toml"
    path.write_text(ENDPOINT.replace("32768", str(2**31)))
    with pytest.raises(ConfigError) as info:
        load_catalog(path)
    assert info.value.field == "endpoints.0.context_length" and info.value.line == 7


@pytest.mark.parametrize(
    ("extra", "meant"),
    [
        ("qualty = 0.5\n[models.source]\n", "quality"),
        ("[models.source]\npth = '/x'\n", "path"),  # inside the source's kind
        ("[models.source]\n[models.cost]\ninput_per_mtk = 1\n", "input_per_mtok"),
    ],
)
def test_an_unknown_key_says_what_it_may_have_been_meant_as(
    isolated_home: Path, extra: str, meant: str
) -> None:
    """ "[models.0.qualty]: Extra inputs are not permitted" named no key it could have been."""
    path = isolated_home / "models.toml"
    entry = '[[models]]\nid = "me/x"\nname = "x"\nprovider = "me"\ncapabilities = ["generate"]\n'
    source = 'kind = "gguf"\npath = "/x"\n'
    path.write_text(entry + extra.replace("[models.source]\n", "[models.source]\n" + source, 1))
    with pytest.raises(ConfigError, match=rf"unknown setting \(did you mean {meant}"):
        load_catalog(path)


def test_a_gguf_path_is_a_gguf_file_taken_from_the_folder_of_models_toml(
    isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder or a text file was "available", routed to, and failed at each load; a relative path
    was read from the current directory, so `car serve` started elsewhere saw another catalog."""
    path = isolated_home / "models.toml"
    entry = '[[models]]\nid = "me/mine:q4"\nname = "my-mine"\nprovider = "me"\ncapabilities = ["generate"]\n'
    (isolated_home / "weights").mkdir()
    (isolated_home / "notes.gguf").write_text("hi")
    (isolated_home / "real.gguf").write_bytes(b"GGUF" + bytes(60))
    monkeypatch.chdir(tmp_path)  # elsewhere
    for where, available, why in (
        ("weights", False, "is not a GGUF file"),
        ("notes.gguf", False, "is not a GGUF file"),
        ("real.gguf", True, ""),
    ):
        path.write_text(f'{entry}[models.source]\nkind = "gguf"\npath = "{where}"\n')
        registry = UnifiedRegistry(load_catalog(path).models)
        mine = registry.resolve("my-mine")
        assert mine.source.path == str(isolated_home / where)  # type: ignore[union-attr]
        assert mine.available is available and why in registry.unavailable_reason(mine)


def test_a_host_no_model_names_is_an_error_and_a_host_is_an_http_url(isolated_home: Path) -> None:
    """A misspelt [hosts.opneai] was ignored: prompts and key went to api.openai.com, not the proxy."""
    path = isolated_home / "models.toml"
    path.write_text('[hosts.opneai]\nbase_url = "http://127.0.0.1:9/v1"\n')
    with pytest.raises(ConfigError, match=r"\[hosts.opneai\] is no model's host \(did you mean \[hosts.o"):
        load_catalog(path)
    path.write_text('[hosts.openai]\nbase_url = "not a url"\n')
    with pytest.raises(ConfigError, match="a host's base_url is an http:// or https:// URL, not 'not a url'"):
        load_catalog(path)
    path.write_text('[hosts.openai]\nbase_url = "http://127.0.0.1:9/v1"\n')
    proxied = next(m for m in load_catalog(path).models if m.id == "openai/gpt-4o-mini")
    assert proxied.source.base_url == "http://127.0.0.1:9/v1"  # type: ignore[union-attr]
    path.write_text(
        '[hosts.mine]\nprotocol = "openai_chat"\nbase_url = "http://127.0.0.1:9/v1"\n'
        + MINE.format(name="mine").replace('base_url = "http://127.0.0.1:9/v1"', 'host = "mine"')
    )
    assert any(m.id == "me/mine" for m in load_catalog(path).models)  # a host a model names


def test_an_endpoint_named_like_a_provider_cannot_shadow_its_models(isolated_home: Path) -> None:
    """openai/gpt-4o-mini stayed the built-in: requests meant for the user's server went to OpenAI."""
    path = isolated_home / "models.toml"
    path.write_text(
        '[[endpoints]]\nname = "openai"\nbase_url = "http://127.0.0.1:9/v1"\nmodels = ["gpt-4o-mini"]\n'
    )
    with pytest.raises(ConfigError, match="endpoint 'openai' would serve openai/gpt-4o-mini, a built-in"):
        load_catalog(path)
    # Endpoint models are named as their server calls them: a built-in's name is fine there.
    path.write_text('[[endpoints]]\nname = "box"\nbase_url = "http://127.0.0.1:9/v1"\nmodels = ["smollm2"]\n')
    assert any(m.id == "box/smollm2" for m in load_catalog(path).models)


def test_an_id_or_an_endpoint_defined_twice_is_an_error(isolated_home: Path) -> None:
    path = isolated_home / "models.toml"
    path.write_text(MINE.format(name="a") + MINE.format(name="b"))
    with pytest.raises(ConfigError, match="model me/mine is defined twice") as info:
        load_catalog(path)
    assert "models.toml:10" in str(info.value)  # the second entry's line
    twice = '[[endpoints]]\nname = "box"\nbase_url = "http://127.0.0.1:9/v1"\nmodels = ["a"]\n'
    path.write_text(twice + twice.replace('"a"', '"b"'))
    with pytest.raises(ConfigError, match="endpoint 'box' is defined twice"):
        load_catalog(path)


def test_a_validators_message_comes_without_pydantics_prefix(isolated_home: Path) -> None:
    path = isolated_home / "models.toml"
    path.write_text(MINE.replace('"me/mine"', '"justname"').format(name="x"))
    with pytest.raises(ConfigError, match="id 'justname' must look like") as info:
        load_catalog(path)
    assert "Value error" not in str(info.value)


@pytest.mark.parametrize(
    ("source", "bad"),
    [
        ('kind = "vllm"\nmodel_name = "m"\nmanaged = true\nendpoint = "http://127.0.0.1:99999"\n', "99999"),
        ('kind = "vllm"\nmodel_name = "m"\nendpoint = "http://127.0.0.1:notaport"\n', "notaport"),
        ('kind = "vllm"\nmodel_name = "m"\nendpoint = "http://127.0.0.1:0"\n', ":0"),
        ('kind = "ollama"\nmodel_tag = "m"\nhost = "ftp://box"\n', "ftp://box"),
    ],
)
def test_a_servers_bad_address_is_an_error_at_load(isolated_home: Path, source: str, bad: str) -> None:
    """`endpoint = "http://127.0.0.1:99999"` loaded, was listed as available, and failed on first
    use with a ValueError traceback (a 500 through `car serve`, routed requests too); port 0
    became 8000."""
    path = isolated_home / "models.toml"
    entry = '[[models]]\nid = "me/served"\nname = "served"\nprovider = "me"\ncapabilities = ["generate"]\n'
    path.write_text(f"{entry}[models.source]\n{source}")
    with pytest.raises(ConfigError) as info:
        load_catalog(path)
    assert bad in str(info.value) and info.value.field is not None and "models.0.source" in info.value.field
