"""The fake Hub speaks the real protocol: huggingface_hub itself downloads from it, into the cache
layout `car models pull` writes, and it serves byte ranges the way a resuming client needs."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fakes.hf_hub import FakeHub, git_blob_id


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as fake:
        yield fake


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    # The test run sets HF_HUB_OFFLINE=1 before huggingface_hub reads it (at import): undo it here.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_huggingface_hub_downloads_from_the_fake(hub: FakeHub, online: None, tmp_path: Path) -> None:
    import huggingface_hub

    weights, config = b"w" * 5000, b'{"model_type": "tiny"}'
    commit = hub.publish("org/tiny", {"w.safetensors": weights, "config.json": config})
    path = huggingface_hub.hf_hub_download("org/tiny", "w.safetensors", endpoint=hub.url, cache_dir=tmp_path)
    assert Path(path).read_bytes() == weights
    assert (
        Path(path).parent.name == commit and Path(path).resolve().name == hashlib.sha256(weights).hexdigest()
    )
    small = huggingface_hub.hf_hub_download("org/tiny", "config.json", endpoint=hub.url, cache_dir=tmp_path)
    assert Path(small).resolve().name == git_blob_id(config), "a git file's blob is named by its git id"
    snapshot = huggingface_hub.snapshot_download("org/tiny", endpoint=hub.url, cache_dir=tmp_path)
    assert sorted(p.name for p in Path(snapshot).iterdir()) == ["config.json", "w.safetensors"]


def test_huggingface_hub_names_a_missing_file(hub: FakeHub, online: None, tmp_path: Path) -> None:
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    hub.publish("org/tiny", {"config.json": b"{}"})
    with pytest.raises(EntryNotFoundError):
        huggingface_hub.hf_hub_download("org/tiny", "nope.bin", endpoint=hub.url, cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        huggingface_hub.hf_hub_download("org/none", "config.json", endpoint=hub.url, cache_dir=tmp_path)


def test_ranges_and_cuts(hub: FakeHub) -> None:
    data = bytes(range(256)) * 100
    hub.publish("org/tiny", {"w.gguf": data})
    head = httpx.head(f"{hub.url}/org/tiny/resolve/main/w.gguf")
    assert head.status_code == 302 and head.headers["X-Linked-Size"] == str(len(data))
    cdn = head.headers["Location"]
    assert cdn.startswith(hub.cdn_url + "/cdn/"), "the CDN is another host"
    part = httpx.get(cdn, headers={"Range": "bytes=25000-"})
    assert part.status_code == 206 and part.content == data[25000:]
    assert part.headers["Content-Range"] == f"bytes 25000-{len(data) - 1}/{len(data)}"
    assert httpx.get(cdn, headers={"Range": f"bytes={len(data)}-"}).status_code == 416
    hub.cut("w.gguf", after=100)
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(cdn)
    assert httpx.get(cdn).content == data, "one cut, then whole again"
