from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from car_inference.config import DEFAULT_GENERATE_MODEL, CarConfig, car_home, load_config
from car_inference.errors import ConfigError


def test_defaults_without_a_file(isolated_home: Path) -> None:
    config = load_config(isolated_home, env={})
    assert config.home == isolated_home
    assert config.defaults.generate == DEFAULT_GENERATE_MODEL
    assert config.server.host == "127.0.0.1"
    assert config.paths.state_db == isolated_home / "state.db"


def test_car_home_comes_from_the_environment(tmp_path: Path) -> None:
    assert car_home({"CAR_HOME": str(tmp_path)}) == tmp_path
    assert car_home({}).name == ".car"


def test_file_values_and_partial_defaults_table(isolated_home: Path) -> None:
    (isolated_home / "config.toml").write_text(
        '[defaults]\nembed = "qwen3-embedding"\n\n[preferred]\ngenerate = "qwen3-8b"\n\n'
        "[routing]\nprefer_local = true\ncost_weight = 0.5\n\n[spend.providers.openai]\ndaily_usd = 2.5\n"
    )
    config = load_config(isolated_home, env={})
    assert config.defaults.embed == "qwen3-embedding"
    assert config.defaults.generate == DEFAULT_GENERATE_MODEL  # untouched keys keep defaults
    assert config.preferred.generate == "qwen3-8b"
    assert config.routing.prefer_local and config.routing.cost_weight == 0.5
    assert config.spend.providers["openai"].daily_usd == 2.5


def test_environment_overrides_the_file(isolated_home: Path) -> None:
    (isolated_home / "config.toml").write_text("[local]\ncache_mb = 100\n")
    env = {
        "CAR_BACKEND_CACHE_MB": "2048",
        "CAR_ROUTING__PREFER_LOCAL": "true",
        "CAR_SERVER_API_KEYS": "k1, k2",
        "CAR_PREFERRED__GENERATE": "qwen3-4b",
    }
    config = load_config(isolated_home, env=env)
    assert config.local.cache_mb == 2048
    assert config.routing.prefer_local is True
    assert config.server.api_keys == ["k1", "k2"]
    assert config.preferred.generate == "qwen3-4b"


def test_server_api_keys_from_the_file_lose_their_surrounding_spaces(isolated_home: Path) -> None:
    """`" k3 "` matched no bearer token (a client's is stripped), and still allowed 0.0.0.0."""
    (isolated_home / "config.toml").write_text('[server]\napi_keys = [" k3 ", "k4 x", "  "]\n')
    assert load_config(isolated_home, env={}).server.api_keys == ["k3", "k4 x"]


def test_bad_toml_names_file_and_line(isolated_home: Path) -> None:
    path = isolated_home / "config.toml"
    path.write_text("[routing]\nprefer_local = true\ncost_weight = = 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(isolated_home, env={})
    assert info.value.path == str(path) and info.value.line == 3
    assert str(path) in str(info.value)


def test_bad_value_names_file_line_and_field(isolated_home: Path) -> None:
    path = isolated_home / "config.toml"
    path.write_text('[server]\nhost = "127.0.0.1"\n\n[routing]\nprefer_local = true\ncost_weight = -1\n')
    with pytest.raises(ConfigError) as info:
        load_config(isolated_home, env={})
    err = info.value
    assert (err.path, err.line, err.field) == (str(path), 6, "routing.cost_weight")
    assert "greater than or equal to 0" in str(err)


def test_unknown_key_is_an_error_with_its_line(isolated_home: Path) -> None:
    (isolated_home / "config.toml").write_text("[local]\nn_ctx = 4096\ncach_mb = 10\n")
    with pytest.raises(ConfigError) as info:
        load_config(isolated_home, env={})
    assert info.value.line == 3 and info.value.field == "local.cach_mb"
    # What it may have been meant as ("Extra inputs are not permitted" said nothing of it), in
    # nested tables and under names too.
    assert "unknown setting (did you mean cache_mb?)" in str(info.value)
    for text, meant in (
        ("[routnig]\nprefer_local = true\n", "routing"),
        ("[spend.providers.openai]\ndaily_usdd = 1\n", "daily_usd"),
        ("[coordination]\nredis_ur = 'redis://x/0'\n", "redis_url"),
    ):
        (isolated_home / "config.toml").write_text(text)
        with pytest.raises(ConfigError, match=rf"unknown setting \(did you mean {meant}"):
            load_config(isolated_home, env={})


def test_bad_environment_value_names_the_variable(isolated_home: Path) -> None:
    with pytest.raises(ConfigError, match=r"\$CAR_BACKEND_CACHE_MB"):
        load_config(isolated_home, env={"CAR_BACKEND_CACHE_MB": "lots"})
    with pytest.raises(ConfigError, match="unknown setting section"):
        load_config(isolated_home, env={"CAR_NOPE__X": "1"})


@pytest.mark.parametrize(
    ("name", "url", "says"),
    [
        # libpq split at the first "@" and named "ss@127.0.0.1" as the host in its error
        ("CAR_STATE__URL", "postgresql://car:p@ss@127.0.0.1/car", "holds a bare '@': write it %40"),
        # the driver quoted the bad escape back: the password, whole
        ("CAR_STATE__URL", "postgresql://car:s3cr%t@127.0.0.1/car", "holds a bare '%': write it %25"),
        ("CAR_COORDINATION__REDIS_URL", "redis://:p@ss@127.0.0.1:6379/0", "holds a bare '@'"),
        ("CAR_COORDINATION__REDIS_URL", "http://:s3cretpw@127.0.0.1:6379/0", "must start with redis://"),
        # a traceback from every command (redis-py's parse_url), or db 0 shared without a word
        ("CAR_COORDINATION__REDIS_URL", "redis://:s3cretpw@127.0.0.1:99999/0", "Port out of range"),
        ("CAR_COORDINATION__REDIS_URL", "redis://:s3cretpw@127.0.0.1:abc/0", "Port could not be cast"),
        ("CAR_COORDINATION__REDIS_URL", "redis://:s3cretpw@127.0.0.1/cache", "'cache' is not a number"),
        ("CAR_COORDINATION__REDIS_URL", "redis://:s3cretpw@127.0.0.1/0?db=x", "'x' is not a number"),
        # found only when the store opened, without the variable it came from
        ("CAR_STATE__URL", "mysql://car:s3cretpw@db/car", "url must be postgresql://"),
    ],
)
def test_a_url_a_driver_would_misread_is_refused_without_its_password(
    isolated_home: Path, name: str, url: str, says: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(isolated_home, env={name: url})
    message = str(info.value)
    assert says in message and "***" in message and "Value error" not in message
    assert "ss@" not in message and "s3cr" not in message


@pytest.mark.parametrize("line", ["[runtimes]\ntick_s = inf", "[server]\nrequest_timeout_s = nan"])
def test_no_setting_takes_infinity_or_nan(isolated_home: Path, line: str) -> None:
    (isolated_home / "config.toml").write_text(line + "\n")
    with pytest.raises(ConfigError, match="finite number"):
        load_config(isolated_home, env={})


@pytest.mark.parametrize(
    ("line", "env"),
    [
        ("[runtimes]\ntick_s = 1e10", {}),
        ("", {"CAR_RUNTIMES__BACKOFF_S": "1e12"}),
        ("[server]\nrequest_timeout_s = 2e8", {}),
    ],
)
def test_no_duration_is_past_a_waits_reach(isolated_home: Path, line: str, env: dict[str, str]) -> None:
    """`tick_s = 1e10` was accepted and crashed the runtime monitor (OverflowError: a wait past
    threading's TIMEOUT_MAX); every `*_s` setting is at most 1e8 seconds (about three years)."""
    (isolated_home / "config.toml").write_text(line + "\n")
    with pytest.raises(ConfigError, match="at most 100,000,000 seconds"):
        load_config(isolated_home, env=env)


def test_voice_aliases_from_the_environment_keep_their_case(isolated_home: Path) -> None:
    """CAR_SPEECH__VOICES__MyVoice was stored as myvoice (aliases match as written: never), and
    a JSON table for CAR_SPEECH__VOICES was "Input should be a valid dictionary"."""
    config = load_config(isolated_home, env={"CAR_SPEECH__VOICES__MyVoice": "en_US-joe-medium"})
    assert config.speech.voices == {"MyVoice": "en_US-joe-medium"}
    config = load_config(isolated_home, env={"CAR_SPEECH__VOICES": '{"Alloy": "en_US-joe-medium"}'})
    assert config.speech.voices == {"Alloy": "en_US-joe-medium"}
    assert load_config(isolated_home, env={"CAR_SPEECH__PREFER_LOCAL": "false"}).speech.prefer_local is False


def test_environment_names_under_keys_keep_their_case_and_conflicts_are_said(isolated_home: Path) -> None:
    config = load_config(isolated_home, env={"CAR_KEYS__OPENAI_API_KEY": "sk-a,sk-b"})
    assert config.keys == {"OPENAI_API_KEY": ["sk-a", "sk-b"]}  # was openai_api_key: never read
    with pytest.raises(ConfigError, match=r"\$CAR_KEYS__A__B: keys.A is a value"):  # a TypeError
        load_config(isolated_home, env={"CAR_KEYS__A": "x", "CAR_KEYS__A__B": "y"})
    (isolated_home / "config.toml").write_text("[routing]\nprefer_local = true\n")
    with pytest.raises(ConfigError, match=r"\$CAR_ROUTING__PREFER_LOCAL__X: routing.prefer_local is a value"):
        load_config(isolated_home, env={"CAR_ROUTING__PREFER_LOCAL__X": "1"})
    (isolated_home / "config.toml").unlink()
    with pytest.raises(ConfigError, match=r"\$CAR_ROUTING__PREFER_LOCAL__X") as info:  # not config.toml
        load_config(isolated_home, env={"CAR_ROUTING__PREFER_LOCAL__X": "1"})
    assert "config.toml" not in str(info.value)


def test_a_byte_order_mark_is_not_a_toml_error(isolated_home: Path) -> None:
    (isolated_home / "config.toml").write_text("\ufeff[routing]\nprefer_local = false\n", encoding="utf-8")
    assert load_config(isolated_home, env={}).routing.prefer_local is False


def test_a_car_home_that_cannot_be_read_is_a_config_error(tmp_path: Path) -> None:
    """A PermissionError traceback from the CLI and the Python API (not an InferenceError)."""
    home = tmp_path / "locked"
    home.mkdir()
    home.chmod(0)
    code = (
        "from car_inference.config import load_config\n"
        "from car_inference.errors import ConfigError\n"
        "from pathlib import Path\n"
        f"try:\n    load_config(Path({str(home)!r}))\n"
        "except ConfigError as exc:\n    print('ConfigError:', exc)\n"
    )
    # root reads any folder: drop the capabilities that let it (as setpriv(1) does for a user).
    caps = "-dac_override,-dac_read_search"
    drop = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"] if os.geteuid() == 0 else []
    try:
        done = subprocess.run(
            [*drop, sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60
        )
    finally:
        home.chmod(0o700)
    assert done.returncode == 0 and "ConfigError:" in done.stdout and "Permission denied" in done.stdout, done


def test_redacted_masks_secrets(isolated_home: Path) -> None:
    config = CarConfig(home=isolated_home, keys={"OPENAI_API_KEY": ["sk-abcdefghijklmnop"]})
    config.server.api_keys = ["server-secret-123456"]
    shown = str(config.redacted())
    assert "sk-abcdefghijklmnop" not in shown and "server-secret-123456" not in shown


def test_old_routing_keys_load_with_a_warning(isolated_home: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Keys of earlier routers still load (a config must not break on upgrade) and say they do nothing."""
    (isolated_home / "config.toml").write_text(
        "[routing]\nexploration_rate = 0\nprior_strength = 10\nmin_observations = 3\n"
    )
    with caplog.at_level("WARNING"):
        routing = load_config(isolated_home).routing
    assert routing.exploration == 0.0 and not hasattr(routing, "prior_strength")
    assert "min_observations, prior_strength: unused by this router" in caplog.text


def test_routing_weights_all_zero_are_refused(isolated_home: Path) -> None:
    """Every candidate scored 0 and the catalog's order chose (a 0.15-quality model over 0.97)."""
    weights = "[routing]\nquality_weight = 0\nlatency_weight = 0\ncost_weight = 0\n"
    (isolated_home / "config.toml").write_text(weights)
    with pytest.raises(ConfigError, match="are all 0: nothing would tell models apart"):
        load_config(isolated_home, env={})
    (isolated_home / "config.toml").write_text(weights.replace("cost_weight = 0", "cost_weight = 1"))
    assert load_config(isolated_home, env={}).routing.cost_weight == 1  # cost alone is a choice


def test_a_key_of_the_wrong_type_stays_out_of_the_errors_context(isolated_home: Path) -> None:
    """pydantic's error, with the value it saw, was the ConfigError's __context__: error reporters
    that ship exception chains shipped the key."""
    (isolated_home / "config.toml").write_text('[keys]\nOPENAI_API_KEY = "sk-single-UUUUUUUUsng1"\n')
    with pytest.raises(ConfigError) as info:
        load_config(isolated_home, env={})
    chain: list[BaseException] = []
    exc: BaseException | None = info.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    assert not any("UUUUUUUU" in str(e) for e in chain), chain
    with pytest.raises(ConfigError) as info:
        load_config(isolated_home.parent, env={"CAR_KEYS__OPENAI_API_KEY": '[["sk-env-VVVVVVVVenv1"]]'})
    assert info.value.__context__ is None


def test_printing_the_config_shows_no_key_or_password(isolated_home: Path) -> None:
    """print(engine.config) showed every key and URL password in clear (a notebook, a log line)."""
    (isolated_home / "config.toml").write_text(
        '[keys]\nOPENAI_API_KEY = ["sk-SECRET1"]\n[server]\napi_keys = ["car-SECRET2"]\n'
        '[state]\nurl = "postgresql://car:SECRET3@db/car"\n[coordination]\nredis_url = "redis://:SECRET4@cache/0"\n'
    )
    config = load_config(isolated_home, env={})
    shown = f"{config!r} {config} {config.server!r} {config.state!r} {config.coordination!r}"
    assert "SECRET" not in shown and config.keys["OPENAI_API_KEY"] == ["sk-SECRET1"]
