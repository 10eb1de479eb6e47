"""What `car models pull|upgrade|pulled|ps` do beyond parsing options: find the model (an
``ollama/<tag>`` the catalog lacks included), reach or start Ollama, and word the results."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..backends.cache import LoadedModel, read_records
from ..catalog.pull import PullReport
from ..catalog.upgrade import Upgrade
from ..errors import DownloadFailed, ModelNotFound
from ..runtimes.ollama import OllamaModel, ollama_answers, ollama_host, ollama_pull, ollama_tags
from ..schema import ModelSchema
from .progress import PullBars

__all__ = [
    "describe_pull",
    "describe_upgrade",
    "find_model",
    "loaded_dir",
    "loaded_rows",
    "pull_ollama",
    "upgrade_ollama",
]


def find_model(eng: Any, name: str) -> ModelSchema:
    """The catalog's model, or for ``ollama/<tag>`` that the catalog lacks, that tag on the Ollama
    at ``$OLLAMA_HOST`` (default ``127.0.0.1:11434``)."""
    try:
        return eng.resolve(name)
    except ModelNotFound:
        if not name.startswith("ollama/") or len(name) == len("ollama/"):
            raise
    tag = name.removeprefix("ollama/")
    return ModelSchema.model_validate({
        "id": name, "name": tag, "provider": "ollama", "capabilities": ["generate"],
        "source": {"kind": "ollama", "model_tag": tag, "host": ollama_host()},
    })  # fmt: skip


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def describe_pull(report: PullReport) -> str:
    if not report.repo:
        return f"{report.model_id}: nothing to download, its files are at {report.path}"
    moved = report.previous_commit and report.previous_commit != report.commit
    where = (
        f"{report.previous_commit[:12]} → {report.commit[:12]}"
        if moved and report.previous_commit
        else report.commit[:12]
    )
    if report.downloaded_bytes == 0:
        state = "updated to" if moved else "up to date at"
        return f"{report.model_id}: {state} {report.repo}@{where}; {report.path}"
    resumed = sum(f.resumed_from for f in report.files)
    more = f" (continued from {_mb(resumed)} left by an interrupted pull)" if resumed else ""
    return (f"{report.model_id}: pulled {report.repo}@{where}, {len(report.files)} file(s), "
            f"{_mb(report.downloaded_bytes)} downloaded{more} and verified; {report.path}")  # fmt: skip


def describe_upgrade(u: Upgrade, checking: bool) -> str:
    if u.kind == "failed":
        return f"{u.model_id}: could not check: {u.error}"
    if u.error is not None:
        return f"{u.model_id}: upgrade failed: {u.error}"
    if u.kind == "current":
        return f"{u.model_id}: up to date ({(u.commit or '?')[:12]})"
    if u.kind == "pinned":
        return f"{u.model_id}: {u.detail}; nothing to upgrade"
    if u.kind == "unchecked":
        return f"{u.model_id}: {u.detail}"
    if u.source == "ollama":
        return f"{u.model_id}: upgraded {(u.commit or '?')[:12]} → {(u.latest or '?')[:12]}: {u.detail}"
    if u.kind == "quant":
        if checking:
            return f"{u.model_id}: a better quant exists: {u.target} ({u.detail})"
        return (f"{u.model_id}: pulled the better quant {u.target} ({u.detail}); the old one stays, "
                f"`car models rm {u.model_id}` deletes it")  # fmt: skip
    moved = f"{(u.commit or '?')[:12]} → {(u.latest or '?')[:12]}"
    if checking:
        return f"{u.model_id}: newer revision {moved}: {u.detail}; {_mb(u.download_bytes)} to download"
    return (f"{u.model_id}: upgraded {moved}: {u.detail}; {_mb(u.download_bytes)} downloaded, "
            f"{_mb(u.freed_bytes)} of the old revision freed")  # fmt: skip


def _reach_ollama(eng: Any, model: ModelSchema) -> tuple[str, Any]:
    """The URL of an Ollama that answers: the model's host, else one we start (`ollama serve`) for
    the pull, with its runtime (None when it was running already)."""
    source: Any = model.source
    host = ollama_host(source.host)
    if ollama_answers(host):
        return host, None
    spec = eng.runtimes.specs["ollama"]
    if spec.command() is None:
        raise DownloadFailed(f"Ollama is not running at {host}, and `ollama` is not installed to start it: "
                             f"{spec.install_hint}")  # fmt: skip
    managed = model.model_copy(update={"source": source.model_copy(update={"host": host, "managed": True})})
    runtime = eng.runtimes.runtime_for(managed)
    return str(runtime.ensure()), runtime


def pull_ollama(eng: Any, model: ModelSchema, bars: PullBars) -> tuple[str, OllamaModel | None]:
    """Pull through Ollama's ``/api/pull`` (streamed into ``bars``); the host and the pulled entry.
    An ``ollama serve`` started for the pull is stopped after it (the models stay in Ollama's store)."""
    host, started = _reach_ollama(eng, model)
    tag = str(getattr(model.source, "model_tag", ""))
    try:
        with bars:
            ollama_pull(host, tag, bars.ollama)
        wanted = tag if ":" in tag else tag + ":latest"
        return host, next((m for m in ollama_tags(host) if m.name == wanted), None)
    finally:
        if started is not None:
            started.stop()


def upgrade_ollama(eng: Any, model: ModelSchema, bars: PullBars, checking: bool) -> Upgrade:
    """Ollama has no "is there a newer version" call: an upgrade pulls the tag again (Ollama fetches
    only the layers that changed) and compares the model's digest before and after."""
    if checking:
        return Upgrade(model.id, "unchecked", source="ollama", detail="Ollama cannot tell without pulling; "
                       f"`car models upgrade {model.id}` pulls its latest version")  # fmt: skip
    source: Any = model.source
    host = ollama_host(source.host)
    wanted = source.model_tag if ":" in source.model_tag else source.model_tag + ":latest"
    before = next((m for m in ollama_tags(host) if m.name == wanted), None) if ollama_answers(host) else None
    _, after = pull_ollama(eng, model, bars)
    old, new = before.digest if before else None, after.digest if after else None
    if old == new:
        return Upgrade(model.id, "current", commit=new, source="ollama")
    size = f"{(after.size if after else 0) / 1e6:,.1f} MB"
    return Upgrade(model.id, "revision", commit=old, latest=new, applied=True, source="ollama",
                   detail=f"Ollama pulled a new version ({size})")  # fmt: skip


def loaded_dir(home: Path) -> Path:
    """Where engines' loaded-model caches keep their records (``ModelCache(record_dir=...)``)."""
    return home / "loaded"


def loaded_rows(eng: Any) -> list[dict[str, Any]]:
    """In-process models: this engine's cache and those other processes (a `car serve`) recorded."""
    mine: list[LoadedModel] = eng.cache.loaded()
    seen = {(m.pid, m.key) for m in mine}
    others = [m for m in read_records(loaded_dir(eng.config.home)) if (m.pid, m.key) not in seen]
    rows = []
    for m in mine + others:
        kind, _, model_id = m.key.partition(":")
        rows.append({
            "model": model_id or m.key, "runtime": "in-process", "kind": kind, "pid": m.pid,
            "state": "busy" if m.busy else "idle", "measured_mb": m.measured_mb,
            "estimated_mb": m.estimated_mb,
            "idle_s": m.idle_s, "loaded_s": round(time.time() - m.loaded_at, 1),
        })  # fmt: skip
    return rows
