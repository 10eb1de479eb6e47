"""docs/deployment.md: its configuration examples are valid for our loaders, and its parts agree
with each other (the ports the replicas listen on are the ones the load balancers name)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from car_inference.catalog import load_catalog
from car_inference.config import load_config
from car_inference.registry import UnifiedRegistry

DOC = Path(__file__).resolve().parents[1] / "docs" / "deployment.md"
README = DOC.parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)


def _block(language: str, first_line: str) -> str:
    found = [b for b in _blocks(language) if b.startswith(first_line)]
    assert len(found) == 1, f"one ```{language} block starting {first_line!r}, found {len(found)}"
    return found[0]


def test_the_replica_config_loads_with_postgres_state_and_redis_coordination(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(_block("toml", "# config.toml on every replica"))
    config = load_config(tmp_path, env={})
    assert config.state.url == "postgresql://car:secret@db.internal:5432/car"
    assert config.coordination.redis_url == "redis://cache.internal:6379/0"
    assert config.coordination.key_prefix == "car:" and config.coordination.global_concurrency == 192
    assert config.spend.daily_usd == 50.0
    assert config.server.max_concurrency == 64 and config.server.request_timeout_s == 600
    assert config.server.max_body_mb == 32


def test_the_endpoints_example_gives_local_catalog_models(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(_block("toml", "# models.toml on every car serve replica"))
    catalog = load_catalog(path)
    assert [(e.name, e.kind) for e in catalog.endpoints] == [("gpubox", "vllm"), ("ray", "vllm")]
    by_id = {m.id: m for m in catalog.models}
    for model_id in ("gpubox/Qwen/Qwen3-8B", "ray/qwen3-32b", "ray/qwen3-8b"):
        model = by_id[model_id]
        assert model.is_local and model.context_length == 32768, model_id
    # The whole home loads too: the registry resolves the names the doc gives.
    registry = UnifiedRegistry.from_config(load_config(tmp_path, env={}))
    assert registry.resolve("ray/qwen3-32b").id == "ray/qwen3-32b"
    assert registry.resolve("gpubox/Qwen/Qwen3-8B").is_local


def test_the_ray_serve_script_is_python_and_names_the_listed_models() -> None:
    script = _block("python", "# serve_llm.py")
    ast.parse(script)
    served = set(re.findall(r'"model_id": "([^"]+)"', script))
    models = _block("toml", "# models.toml on every car serve replica")
    ray_table = models.split('name = "ray"')[1]
    assert served == set(re.findall(r'"([^"]+)"', ray_table.split("models = [")[1].split("]")[0]))


def test_the_load_balancers_name_the_ports_the_replicas_listen_on() -> None:
    text = DOC.read_text()
    started = set(re.findall(r"car serve --port (\d+) &", text))
    assert len(started) == 3
    nginx = _block("nginx", "upstream car {")
    haproxy = _block("haproxy", "defaults")
    assert set(re.findall(r"server 127\.0\.0\.1:(\d+)", nginx)) == started
    assert set(re.findall(r"server r\d 127\.0\.0\.1:(\d+)", haproxy)) == started
    assert "client_max_body_size 32m" in nginx and "proxy_read_timeout 600s" in nginx
    assert "maxconn 64" in haproxy


def test_the_readme_links_here_and_the_link_back_resolves() -> None:
    readme = README.read_text()
    assert "docs/deployment.md" in readme
    anchor = re.search(r"\(\.\./README\.md#([^)]+)\)", DOC.read_text())
    assert anchor is not None
    headings = [
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in readme.splitlines()
        if line.startswith("#")
    ]
    assert anchor.group(1) in headings
