"""`car models upgrade`: for each pulled model, a newer revision on the Hub or a better quant in
the catalog, and pulling it.

- **Revision**: the commit the model's revision (``main`` unless pinned) names on the Hub now,
  against the one in the cache's ``refs/``. When it moved, the files that changed (their ETag, i.e.
  their hash, differs) are pulled, and the old revision's copies are deleted when nothing else links
  them (the report says how much that freed). A revision pinned to a commit never moves.
- **Quant**: another catalog model with the same id before the ``:`` (``qwen/qwen3-4b:q4_k_m`` and
  ``qwen/qwen3-4b:q8_0``), of the same kind, with a higher quality (then more bits), that fits this
  machine (``hardware.recommend``) and is not pulled yet. Upgrading pulls it and keeps the old one,
  which configs may name; the report says which ``car models rm`` frees it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import DownloadFailed, InferenceError, ModelUnavailable
from ..hardware import HardwareReport, recommend
from ..schema import ModelSchema
from .hub import HubClient, HubUnreachable, hub_offline, read_ref, repo_dir
from .locate import local_path
from .pull import PullPlan, PullProgress, pull, pull_plan, remote_files

__all__ = [
    "Upgrade",
    "apply_each",
    "apply_upgrade",
    "cached_commit",
    "check_upgrades",
    "pulled_models",
    "quant_rank",
]

log = logging.getLogger(__name__)

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_BITS = re.compile(r"(?:^|[^a-z])i?q(\d+)|(?:^|[^a-z])b?fp?(16|32)")

UpgradeKind = Literal["revision", "quant", "current", "pinned", "unchecked", "failed"]


@dataclass
class Upgrade:
    """What upgrading one pulled model means (or did)."""

    model_id: str
    kind: UpgradeKind
    commit: str | None = None  # the cached commit
    latest: str | None = None  # the Hub's commit for the revision now
    changed: list[str] = field(default_factory=list)  # files whose content differs
    download_bytes: int = 0  # what the upgrade fetches (or fetched)
    target: str | None = None  # the better quant's model id
    detail: str = ""
    applied: bool = False
    freed_bytes: int = 0
    source: Literal["hub", "ollama"] = "hub"
    error: str | None = None  # why checking or applying it failed (kind "failed", or not applied)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def quant_rank(model_id: str) -> int:
    """Bits of the quant named after the ``:`` (``q4_k_m`` 4, ``q8_0`` 8, ``f16`` 16); 0 if none."""
    quant = model_id.rpartition(":")[2].lower() if ":" in model_id else ""
    found = _BITS.search(quant)
    if found is None:
        return 0
    return int(found.group(1) or found.group(2))


def _on_disk(model: ModelSchema) -> bool:
    try:
        local_path(model)
    except ModelUnavailable:
        return False
    return True


def pulled_models(models: list[ModelSchema]) -> list[ModelSchema]:
    """Catalog models pulled from the Hub whose files are in the cache now."""
    found = []
    for model in models:
        if not model.in_process or not getattr(model.source, "hf_repo", None):
            continue
        if _on_disk(model):
            found.append(model)
    return found


def cached_commit(plan: PullPlan, model: ModelSchema) -> str | None:
    """The commit of the snapshot the model's files are in (the one ``local_path`` finds), else
    the revision's ref. Not the ref first: a repo's ref moves when another model of it (another
    quant) is pulled, and this one, still in the old snapshot, read "up to date" for ever."""
    snapshots = repo_dir(plan.repo) / "snapshots"
    try:
        path = local_path(model)
    except ModelUnavailable:
        return read_ref(plan.repo, plan.revision)
    found = next((p.name for p in [path, *path.parents] if p.parent == snapshots), None)
    return found or read_ref(plan.repo, plan.revision)


def _local_etag(repo: str, commit: str | None, path: str) -> str | None:
    if commit is None:
        return None
    link = repo_dir(repo) / "snapshots" / commit / path
    return link.resolve().name if link.is_symlink() else None


def _revision_check(model: ModelSchema, hub: HubClient) -> Upgrade:
    plan = pull_plan(model)
    assert plan is not None  # pulled_models keeps only Hub models
    commit = cached_commit(plan, model)
    if _COMMIT.match(plan.revision):
        return Upgrade(
            model.id, "pinned", commit, plan.revision, detail=f"pinned to commit {plan.revision[:12]}"
        )
    remotes = remote_files(plan, hub)
    latest = remotes[0].commit
    if latest == commit:
        return Upgrade(model.id, "current", commit, latest)
    changed = [r for r in remotes if _local_etag(plan.repo, commit, r.path) != r.etag]
    detail = ", ".join(r.path for r in changed) + " changed" if changed else "its files are unchanged"
    return Upgrade(model.id, "revision", commit, latest, changed=[r.path for r in changed],
                   download_bytes=sum(r.size or 0 for r in changed), detail=detail)  # fmt: skip


def _quant_check(model: ModelSchema, catalog: list[ModelSchema], hardware: HardwareReport) -> Upgrade | None:
    if ":" not in model.id:
        return None
    base = model.id.rpartition(":")[0]
    mine = (model.quality or 0.0, quant_rank(model.id))
    siblings = [
        m for m in catalog if m.id != model.id and m.id.rpartition(":")[0] == base and m.kind == model.kind
    ]
    better = [m for m in siblings if (m.quality or 0.0, quant_rank(m.id)) > mine]
    fitting = {r.id for rec in recommend(better, hardware) for r in rec.models}
    candidates = [m for m in better if m.id in fitting and not _on_disk(m)]
    if not candidates:
        return None
    best = max(candidates, key=lambda m: (m.quality or 0.0, quant_rank(m.id)))
    detail = f"quality {model.quality or 0:g} → {best.quality or 0:g}, {best.size_mb or 0:,.0f} MB"
    return Upgrade(
        model.id, "quant", target=best.id, download_bytes=int((best.size_mb or 0) * 1e6), detail=detail
    )


def check_upgrades(
    models: list[ModelSchema],
    catalog: list[ModelSchema],
    hardware: HardwareReport,
    endpoint: str | None = None,
) -> list[Upgrade]:
    """For each pulled model: its revision check, and a better quant when there is one."""
    if not models:
        return []
    if hub_offline():
        raise DownloadFailed("cannot check for upgrades: the Hub is switched off (HF_HUB_OFFLINE is set)")
    found: list[Upgrade] = []
    with HubClient(endpoint) as hub:
        for model in models:
            try:  # one model's repo gated, gone or broken does not stop the others' checks
                found.append(_revision_check(model, hub))
            except HubUnreachable:
                raise
            except InferenceError as exc:
                found.append(Upgrade(model.id, "failed", error=str(exc)))
            quant = _quant_check(model, catalog, hardware)
            if quant is not None:
                found.append(quant)
    return found


def apply_each(
    upgrades: list[Upgrade], catalog: dict[str, ModelSchema], progress: PullProgress | None = None
) -> list[Upgrade]:
    """``apply_upgrade`` for each; one that fails (a bad hash, a gated repo) is reported with its
    error and the rest go on (the first failure stopped them all, and the upgrades already made,
    their old files deleted, were not reported)."""
    done = []
    for upgrade in upgrades:
        try:
            done.append(apply_upgrade(upgrade, catalog, progress))
        except HubUnreachable:
            raise
        except InferenceError as exc:
            upgrade.error = str(exc)
            done.append(upgrade)
    return done


def apply_upgrade(
    upgrade: Upgrade, catalog: dict[str, ModelSchema], progress: PullProgress | None = None,
    endpoint: str | None = None,
) -> Upgrade:  # fmt: skip
    """Pull what ``upgrade`` names; for a new revision, delete the old revision's unshared files."""
    if upgrade.kind == "quant" and upgrade.target:
        report = pull(catalog[upgrade.target], progress, endpoint)
        upgrade.download_bytes = report.downloaded_bytes
        upgrade.applied = True
        return upgrade
    if upgrade.kind != "revision":
        return upgrade
    model = catalog[upgrade.model_id]
    report = pull(model, progress, endpoint)
    upgrade.download_bytes, upgrade.latest, upgrade.applied = report.downloaded_bytes, report.commit, True
    plan = pull_plan(model)
    pinned = plan is not None and any(  # a catalog entry pinned to the old commit still uses it
        getattr(m.source, "hf_repo", None) == plan.repo
        and getattr(m.source, "revision", None) == upgrade.commit
        for m in catalog.values()
    )
    if plan is not None and upgrade.commit and upgrade.commit != report.commit and not pinned:
        try:
            upgrade.freed_bytes = _drop_revision(plan, upgrade.commit)
        except OSError as exc:  # the new revision is in place; the old one's files stay
            log.warning(
                "%s: upgraded, but the old revision's files could not all be removed: %s (%s)",
                upgrade.model_id, exc.strerror or exc, exc.filename,
            )  # fmt: skip
    return upgrade


def _drop_revision(plan: PullPlan, commit: str) -> int:
    """Delete the plan's files from snapshot ``commit`` and the blobs nothing links any more."""
    root = repo_dir(plan.repo)
    snapshot = root / "snapshots" / commit
    if not snapshot.is_dir():
        return 0
    gone: set[Path] = set()
    for link in sorted(snapshot.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        rel = link.relative_to(snapshot).as_posix()
        if (link.is_symlink() or link.is_file()) and plan.wants(rel):
            gone.add(link.resolve())
            link.unlink()
        elif link.is_dir() and not any(link.iterdir()):
            link.rmdir()
    if not any(snapshot.iterdir()):
        snapshot.rmdir()
    linked = {p.resolve() for p in (root / "snapshots").rglob("*") if p.is_symlink()}
    freed = 0
    for blob in gone - linked:
        if blob.is_file() and blob.parent == root / "blobs":
            freed += blob.stat().st_size
            blob.unlink()
    return freed
