"""`car models pull`: fetch a model's files from the Hugging Face Hub into the HF cache.

This is the only place that downloads weights, and it runs only when the user asks for a pull (or
an upgrade). Files land where huggingface_hub keeps them (``HF_HUB_CACHE``/``HF_HOME``), which is
where ``locate`` looks, so a pulled model becomes available without any other step. Transfers are
resumable and verified (``hub.HubClient``); ``progress`` hears about every file and every chunk.

A pull asks the Hub which commit the model's revision (default ``main``) names now: files already
in the cache at that commit are not fetched again, and when the revision moved the new commit's
files are fetched (a blob that did not change is shared, not downloaded twice).
"""

from __future__ import annotations

import fnmatch
import logging
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..errors import DownloadFailed, ModelUnavailable, UnsupportedMode
from ..schema import DiffusersSource, GgufSource, ModelSchema, PiperSource, SentenceSource, WhisperSource
from .hub import (
    HubClient,
    HubUnreachable,
    RemoteFile,
    hub_endpoint,
    hub_offline,
    link_snapshot,
    read_ref,
    repo_dir,
    write_ref,
)
from .locate import hf_cache_dir, local_path, split_parts

log = logging.getLogger("car_inference.pull")

__all__ = [
    "PullPlan",
    "PullProgress",
    "PullReport",
    "PulledFile",
    "hub_endpoint",
    "pull",
    "pull_model",
    "pull_plan",
    "remote_files",
]


class PullProgress(Protocol):
    """What a progress display hears; ``car models pull`` draws rich bars from it."""

    def file_started(self, path: str, total: int | None, done: int) -> None: ...

    def advance(self, path: str, n: int) -> None: ...

    def file_finished(self, path: str, downloaded: int) -> None: ...


@dataclass
class PulledFile:
    path: str
    size: int | None
    digest: str | None  # what it was verified against: sha256:<hex> or git-sha1:<hex>
    downloaded: int = 0  # bytes fetched by this pull
    resumed_from: int = 0  # bytes an interrupted pull had left, continued from


@dataclass
class PullReport:
    model_id: str
    repo: str
    revision: str
    commit: str
    path: Path
    files: list[PulledFile] = field(default_factory=list)
    previous_commit: str | None = None  # the revision's commit before this pull, if it was pulled

    @property
    def downloaded_bytes(self) -> int:
        return sum(f.downloaded for f in self.files)


# Copies of a snapshot model's weights for other runtimes (ONNX, OpenVINO, TensorFlow, Flax,
# Rust, Core ML): a sentence-transformers repo such as all-MiniLM-L6-v2 holds about ten times the
# model in them, and nothing here loads them.
OTHER_RUNTIMES = (
    "onnx/", "openvino/", "coreml/", "*.onnx", "*.h5", "*.msgpack", "*.ot", "*.tflite", "*.mlmodel",
)  # fmt: skip


@dataclass(frozen=True)
class PullPlan:
    """Which files of which repo a model needs: named files, or a snapshot filtered by patterns."""

    repo: str
    revision: str
    files: tuple[str, ...] = ()  # empty: the whole snapshot (after the patterns)
    allow: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    # A snapshot's ``*.bin`` beside ``*.safetensors`` in the same folder is the same weights in
    # PyTorch's older format: skipped (sentence-transformers loads the safetensors).
    prefer_safetensors: bool = False

    def wants(self, path: str) -> bool:
        if self.files:
            return path in self.files
        allowed = not self.allow or any(fnmatch.fnmatch(path, _pattern(p)) for p in self.allow)
        return allowed and not any(fnmatch.fnmatch(path, _pattern(p)) for p in self.ignore)


def _pattern(pattern: str) -> str:
    return pattern + "*" if pattern.endswith("/") else pattern  # huggingface_hub's folder shorthand


def pull_plan(model: ModelSchema) -> PullPlan | None:
    """What pulling ``model`` fetches; None for a model that needs no download (a packaged one or
    a file the user points at). ``UnsupportedMode`` for a model served elsewhere."""
    source = model.source
    repo = getattr(source, "hf_repo", None)
    if not model.in_process:
        runtime = model.spec.runtime
        where = (
            f"Ollama keeps its models: `car models pull {model.id}` asks it (the CLI), as does "
            f"`ollama pull {getattr(source, 'model_tag', model.name)}`"
            if runtime == "ollama"
            else "it is served by its provider or server; nothing to download"
        )
        raise UnsupportedMode("pull", model.kind, f"{model.id}: {where}")
    if not repo:
        return None
    revision = getattr(source, "revision", None) or "main"
    if isinstance(source, GgufSource | PiperSource) and source.filename:
        files = split_parts(source.filename)  # a split GGUF's every part (part 1 alone was "available")
        if isinstance(source, GgufSource) and source.mmproj:
            files.append(source.mmproj)
        if isinstance(source, PiperSource):
            files.append(source.filename + ".json")
        return PullPlan(repo, revision, files=tuple(files))
    if isinstance(source, DiffusersSource):  # one folder per component; patterns skip spare copies
        return PullPlan(
            repo, revision, allow=tuple(source.allow_patterns), ignore=tuple(source.ignore_patterns)
        )
    if isinstance(source, SentenceSource):
        return PullPlan(repo, revision, ignore=OTHER_RUNTIMES, prefer_safetensors=True)
    if isinstance(source, WhisperSource):  # CTranslate2's weights are model.bin: no safetensors rule
        return PullPlan(repo, revision, ignore=OTHER_RUNTIMES)
    raise DownloadFailed(f"{model.id}: its source does not say which file of {repo} to fetch")


def remote_files(plan: PullPlan, hub: HubClient) -> list[RemoteFile]:
    """The plan's files as the Hub has them now, all at one commit."""
    if plan.files:
        first = hub.file(plan.repo, plan.files[0], plan.revision)
        return [first] + [hub.file(plan.repo, name, first.commit) for name in plan.files[1:]]
    commit, names = hub.revision(plan.repo, plan.revision)
    wanted = [name for name in names if plan.wants(name)]
    if plan.prefer_safetensors:
        safetensors = {posixpath.dirname(n) for n in wanted if n.endswith(".safetensors")}
        wanted = [n for n in wanted if not (n.endswith(".bin") and posixpath.dirname(n) in safetensors)]
    if not wanted:
        raise DownloadFailed(f"{plan.repo}@{plan.revision}: none of its files match the model's patterns")
    return [hub.file(plan.repo, name, commit) for name in wanted]


def pull(model: ModelSchema, progress: PullProgress | None = None, endpoint: str | None = None) -> PullReport:
    """Fetch ``model``'s files (only what is missing) and verify them; the report says what came."""
    plan = pull_plan(model)
    if plan is None:
        return PullReport(model.id, "", "", "", local_path(model))
    previous = read_ref(plan.repo, plan.revision)
    if hub_offline():
        if _on_disk(model):  # a script making sure a model is there failed offline although it was
            log.warning("HF_HUB_OFFLINE is set: %s is on disk, not checked for a newer revision", model.id)
            return PullReport(model.id, "", "", "", local_path(model))
        raise DownloadFailed(
            f"could not pull {model.id} from {plan.repo}: the Hub is switched off (HF_HUB_OFFLINE is set);"
            " unset HF_HUB_OFFLINE to download"
        )
    try:
        with HubClient(endpoint) as hub:
            remotes = remote_files(plan, hub)
            commit = remotes[0].commit
            report = PullReport(model.id, plan.repo, plan.revision, commit, Path(), previous_commit=previous)
            for remote in remotes:
                report.files.append(_fetch_one(hub, remote, progress))
        for remote in remotes:
            link_snapshot(plan.repo, commit, remote.path, remote.etag)
        write_ref(plan.repo, plan.revision, commit)
    except OSError as exc:  # a full or read-only disk while writing the cache
        raise DownloadFailed(f"could not pull {model.id} into {hf_cache_dir()}: {exc}") from None
    except HubUnreachable as exc:  # "cannot reach https://huggingface.co" named no model
        raise HubUnreachable(f"could not pull {model.id} from {plan.repo}: {exc}") from None
    report.path = local_path(model)
    return report


def _fetch_one(hub: HubClient, remote: RemoteFile, progress: PullProgress | None) -> PulledFile:
    blob = repo_dir(remote.repo) / "blobs" / remote.etag
    partial = blob.with_name(blob.name + ".incomplete")
    had = 0 if blob.is_file() or not partial.is_file() else partial.stat().st_size
    if progress is not None:
        progress.file_started(remote.path, remote.size, (remote.size or 0) if blob.is_file() else had)

    def advance(n: int) -> None:
        if progress is not None:
            progress.advance(remote.path, n)

    _, got, resumed = hub.fetch(remote, advance)
    if progress is not None:
        progress.file_finished(remote.path, got)
    return PulledFile(remote.path, remote.size, remote.digest, downloaded=got, resumed_from=resumed)


def _on_disk(model: ModelSchema) -> bool:
    try:
        local_path(model)
    except ModelUnavailable:
        return False
    return True


def pull_model(model: ModelSchema, progress: PullProgress | None = None) -> Path:
    """``pull`` for callers that want the local file or folder (``InferenceEngine.pull``)."""
    return pull(model, progress).path
