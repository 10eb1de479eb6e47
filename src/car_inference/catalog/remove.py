"""`car models rm`: delete what `car models pull` put in the Hugging Face cache, and say how much
that freed.

A model pulled as single files (a GGUF quant, its vision projector, a Piper voice and its config)
loses those files in every cached revision; a blob another file still links to is kept, and a
repo left with nothing is removed whole. A model pulled as a whole snapshot (sentence-transformers,
Whisper, diffusers) removes its repo folder. Packaged models and files the user pointed us at are
not ours to delete: the error says what removes them.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InferenceFailed, InvalidInput, ModelUnavailable
from ..schema import GgufSource, ModelSchema, PiperSource
from .locate import hf_cache_dir

__all__ = ["Removal", "remove_model"]


@dataclass
class Removal:
    model_id: str
    paths: list[Path] = field(default_factory=list)  # what was deleted (links, blobs, folders)
    freed_bytes: int = 0


def _pulled_files(source: object) -> list[str] | None:
    """The files a pull fetched one by one; None when it fetched the whole snapshot."""
    filename = getattr(source, "filename", None)
    if not filename:
        return None
    files = [filename]
    if isinstance(source, GgufSource) and source.mmproj:
        files.append(source.mmproj)
    if isinstance(source, PiperSource):
        files.append(filename + ".json")
    return files


def remove_model(model: ModelSchema, keep: frozenset[str] = frozenset()) -> Removal:
    """Delete ``model``'s pulled files from the HF cache. ``InvalidInput`` for a model whose files
    are not ours to delete; ``ModelUnavailable`` when nothing of it is on disk. ``keep``: commits
    of the repo other catalog entries are pinned to (a snapshot model's repo went whole, and
    such an entry lost its files)."""
    source = model.source
    package = getattr(source, "package", None) or ", ".join(getattr(source, "packages", None) or [])
    if package:
        dist = package.split(",")[0].strip().replace("_", "-")
        raise InvalidInput(f"{model.id} comes with the package {package}, not a pull: `pip uninstall {dist}`")
    repo = getattr(source, "hf_repo", None)
    if model.spec.runtime == "ollama":  # pulled through Ollama, which keeps it ("not on this disk" was false)
        tag = getattr(source, "model_tag", model.name)
        raise InvalidInput(f"{model.id} is kept by Ollama: `ollama rm {tag}` deletes it")
    if not repo:
        path = getattr(source, "path", None)
        what = f"your own file {path}" if path else "served elsewhere; nothing of it is on this disk"
        raise InvalidInput(f"{model.id} is {what}: car deletes only what it pulled")
    root = hf_cache_dir() / ("models--" + repo.replace("/", "--"))
    files = _pulled_files(source)
    removal = Removal(model.id)
    try:
        if root.is_dir():
            if files is None and not keep & _snapshots(root):
                removal.freed_bytes = _tree_bytes(root)
                shutil.rmtree(root)
                removal.paths.append(root)
            elif files is None:
                _remove_snapshots(root, keep, removal)
            else:
                _remove_files(root, files, removal)
    except OSError as exc:  # a folder of the cache not ours to write: it was a traceback
        where = exc.filename or root
        done = f"; {len(removal.paths)} file(s) were removed before it" if removal.paths else ""
        raise InferenceFailed(f"could not remove {model.id}: {exc.strerror or exc} ({where}){done}") from None
    if not removal.paths:
        raise ModelUnavailable(model.id, "its files are not in the Hugging Face cache: nothing to remove")
    return removal


def _snapshots(root: Path) -> set[str]:
    folder = root / "snapshots"
    return {d.name for d in folder.iterdir()} if folder.is_dir() else set()


def _remove_snapshots(root: Path, keep: frozenset[str], removal: Removal) -> None:
    """Every snapshot of the repo but those in ``keep``, the blobs only they linked, and the refs
    that named them."""
    snapshots = root / "snapshots"
    kept = {p.resolve() for c in keep for p in (snapshots / c).rglob("*") if p.is_symlink()}
    for snap in sorted(d for d in snapshots.iterdir() if d.name not in keep):
        gone = {p.resolve() for p in snap.rglob("*") if p.is_symlink()}
        shutil.rmtree(snap)
        removal.paths.append(snap)
        for blob in sorted(gone - kept):
            if blob.is_file():
                removal.freed_bytes += blob.stat().st_size
                blob.unlink()
                removal.paths.append(blob)
    for ref in (root / "refs").rglob("*") if (root / "refs").is_dir() else []:
        if ref.is_file() and ref.read_text().strip() not in keep:
            ref.unlink()


def _tree_bytes(root: Path) -> int:
    """Bytes of the regular files under ``root`` (links into blobs are not counted twice)."""
    return sum(p.lstat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def _remove_files(root: Path, files: list[str], removal: Removal) -> None:
    snapshots = root / "snapshots"
    targets: set[Path] = set()
    for snap in sorted(snapshots.iterdir()) if snapshots.is_dir() else []:
        for name in files:
            link = snap / name
            if link.is_symlink():
                targets.add(link.resolve())
                link.unlink()
                removal.paths.append(link)
            elif link.is_file():  # a cache without symlinks keeps the file itself
                removal.freed_bytes += link.stat().st_size
                link.unlink()
                removal.paths.append(link)
    still_linked = (
        {p.resolve() for p in snapshots.rglob("*") if p.is_symlink()} if snapshots.is_dir() else set()
    )
    for blob in sorted(targets - still_linked):
        if blob.is_file():
            removal.freed_bytes += blob.stat().st_size
            blob.unlink()
            removal.paths.append(blob)
    _prune(snapshots)
    if not snapshots.is_dir() or not any(snapshots.iterdir()):
        removal.freed_bytes += _tree_bytes(root)  # incomplete downloads and the like
        shutil.rmtree(root)
        removal.paths.append(root)


def _prune(folder: Path) -> None:
    """Remove empty folders under ``folder`` (a snapshot whose files are all gone)."""
    if not folder.is_dir():
        return
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()
