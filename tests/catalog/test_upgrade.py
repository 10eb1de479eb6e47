"""`car models upgrade` against the fake Hub: a moved revision is found, pulled and the old files
freed; a better quant that fits is pulled beside the old one; checking fetches nothing."""

from __future__ import annotations

import os
import subprocess

import pytest

from car_inference.catalog.hub import repo_dir
from car_inference.catalog.locate import local_path
from car_inference.catalog.pull import pull
from car_inference.catalog.upgrade import (
    apply_each,
    apply_upgrade,
    check_upgrades,
    pulled_models,
    quant_rank,
)
from car_inference.hardware import CpuInfo, HardwareReport, MemoryInfo
from car_inference.schema import ModelSchema
from fakes.hf_hub import FakeHub

REPO = "tiny/tiny-GGUF"
V1, V2 = os.urandom(200_000), os.urandom(210_000)
MACHINE = HardwareReport(os="linux", cpu=CpuInfo(model="test", arch="x86_64", cores=2, features=[]),
                         memory=MemoryInfo(total_mb=2000, available_mb=1000))  # fmt: skip


def quant(name: str, quality: float, size_mb: int, **source: object) -> ModelSchema:
    return ModelSchema.model_validate({
        "id": f"tiny/tiny:{name}", "name": "tiny", "provider": "tiny", "capabilities": ["generate"],
        "quality": quality, "cost": {"size_mb": size_mb},
        "source": {"kind": "gguf", "hf_repo": REPO, "filename": f"tiny-{name}.gguf"} | source,
    })  # fmt: skip


Q4, Q8, F16 = quant("q4_k_m", 0.3, 1), quant("q8_0", 0.4, 2), quant("f16", 0.5, 5000)


def test_quant_rank() -> None:
    assert [quant_rank(m) for m in ("a:q4_k_m", "a:iq3_xs", "a:q8_0", "a:f16", "a:bf16", "a:fp32", "a")] == [
        4, 3, 8, 16, 16, 32, 0,
    ]  # fmt: skip


def test_a_moved_revision_is_found_pulled_and_the_old_one_freed(hub: FakeHub) -> None:
    old = hub.publish(REPO, {"tiny-q4_k_m.gguf": V1, "README.md": b"v1"})
    pull(Q4)
    assert pulled_models([Q4, Q8]) == [Q4]
    [current] = check_upgrades([Q4], [Q4], MACHINE)
    assert current.kind == "current" and current.commit == old

    new = hub.publish(REPO, {"tiny-q4_k_m.gguf": V2})
    hub.requests.clear()
    [found] = check_upgrades([Q4], [Q4], MACHINE)
    assert (found.kind, found.commit, found.latest) == ("revision", old, new)
    assert found.changed == ["tiny-q4_k_m.gguf"] and found.download_bytes == len(V2)
    assert not hub.gets("/cdn/") and local_path(Q4).read_bytes() == V1, "checking downloads nothing"

    done = apply_upgrade(found, {Q4.id: Q4})
    assert done.applied and done.download_bytes == len(V2) and done.freed_bytes == len(V1)
    assert local_path(Q4).read_bytes() == V2
    assert not (repo_dir(REPO) / "snapshots" / old).exists()
    assert sorted(p.name for p in (repo_dir(REPO) / "blobs").iterdir()) == [local_path(Q4).resolve().name]
    assert check_upgrades([Q4], [Q4], MACHINE)[0].kind == "current"


def test_an_old_revision_that_will_not_go_leaves_the_upgrade_applied(
    hub: FakeHub, caplog: pytest.LogCaptureFixture
) -> None:
    """The old files of a folder not ours to write (an immutable blob stands in): the upgrade
    was a traceback after the new revision had been pulled."""
    hub.publish(REPO, {"tiny-q4_k_m.gguf": V1})
    pull(Q4)
    old_blob = local_path(Q4).resolve()
    if subprocess.run(["chattr", "+i", str(old_blob)], capture_output=True, check=False).returncode:
        pytest.skip("chattr +i is not available here")
    try:
        hub.publish(REPO, {"tiny-q4_k_m.gguf": V2})
        [found] = check_upgrades([Q4], [Q4], MACHINE)
        done = apply_upgrade(found, {Q4.id: Q4})
        assert done.applied and local_path(Q4).read_bytes() == V2 and done.freed_bytes == 0
        assert "the old revision's files could not all be removed" in caplog.text
    finally:
        subprocess.run(["chattr", "-i", str(old_blob)], check=False)


def test_an_old_revision_a_pinned_entry_uses_is_kept(hub: FakeHub) -> None:
    """Upgrading deleted the old revision's files though another catalog entry, pinned to that
    commit, still used them (the README says: files nothing else uses)."""
    old = hub.publish(REPO, {"tiny-q4_k_m.gguf": V1})
    pinned = quant("q4_k_m", 0.3, 1, revision=old).model_copy(update={"id": "tiny/tiny-pinned:q4_k_m"})
    pull(Q4)
    assert local_path(pinned).read_bytes() == V1
    hub.publish(REPO, {"tiny-q4_k_m.gguf": V2})
    [found] = check_upgrades([Q4], [Q4, pinned], MACHINE)
    done = apply_upgrade(found, {Q4.id: Q4, pinned.id: pinned})
    assert done.applied and done.freed_bytes == 0 and local_path(Q4).read_bytes() == V2
    assert local_path(pinned).read_bytes() == V1, "the pinned entry keeps its files"


def test_each_quant_of_a_repo_is_checked_against_its_own_snapshot(hub: FakeHub) -> None:
    """Pulling one quant moves the repo's ref: the other quant, still in the old snapshot, read
    "up to date" for ever (and `car models pulled` showed the new commit for it)."""
    old = hub.publish(REPO, {"tiny-q4_k_m.gguf": V1, "tiny-q8_0.gguf": V1[:5000]})
    pull(Q4)
    pull(Q8)
    new = hub.publish(REPO, {"tiny-q4_k_m.gguf": V2, "tiny-q8_0.gguf": V2[:5000]})
    [q4] = check_upgrades([Q4], [Q4], MACHINE)
    apply_upgrade(q4, {Q4.id: Q4})
    [q8] = check_upgrades([Q8], [Q4, Q8], MACHINE)
    assert (q8.kind, q8.commit, q8.latest) == ("revision", old, new)
    assert apply_upgrade(q8, {Q8.id: Q8}).applied and local_path(Q8).read_bytes() == V2[:5000]


def test_a_new_commit_with_the_same_files_downloads_nothing(hub: FakeHub) -> None:
    hub.publish(REPO, {"tiny-q4_k_m.gguf": V1})
    pull(Q4)
    new = hub.publish(REPO, {"README.md": b"docs only"})
    [found] = check_upgrades([Q4], [Q4], MACHINE)
    assert found.kind == "revision" and found.changed == [] and found.detail == "its files are unchanged"
    done = apply_upgrade(found, {Q4.id: Q4})
    assert done.download_bytes == 0 and done.freed_bytes == 0 and done.latest == new
    assert local_path(Q4).read_bytes() == V1 and (repo_dir(REPO) / "refs" / "main").read_text() == new


def test_a_better_quant_that_fits_is_pulled_beside_the_old_one(hub: FakeHub) -> None:
    hub.publish(REPO, {"tiny-q4_k_m.gguf": V1, "tiny-q8_0.gguf": V2, "tiny-f16.gguf": b"big"})
    pull(Q4)
    catalog = [Q4, Q8, F16]
    current, better = check_upgrades([Q4], catalog, MACHINE)
    assert current.kind == "current"
    assert better.kind == "quant" and better.target == Q8.id, "f16 is better but needs 6 GB: it does not fit"
    assert better.detail == "quality 0.3 → 0.4, 2 MB"
    done = apply_upgrade(better, {m.id: m for m in catalog})
    assert done.applied and done.download_bytes == len(V2)
    assert local_path(Q8).read_bytes() == V2 and local_path(Q4).read_bytes() == V1, "the old quant stays"
    assert [u.kind for u in check_upgrades([Q4], catalog, MACHINE)] == ["current"], "q8 is pulled now"


def test_a_pinned_revision_never_moves(hub: FakeHub) -> None:
    commit = hub.publish(REPO, {"tiny-q4_k_m.gguf": V1})
    pinned = quant("q4_k_m", 0.3, 1, revision=commit)
    pull(pinned)
    hub.publish(REPO, {"tiny-q4_k_m.gguf": V2})
    [found] = check_upgrades([pinned], [pinned], MACHINE)
    assert found.kind == "pinned" and found.detail == f"pinned to commit {commit[:12]}"
    assert apply_upgrade(found, {pinned.id: pinned}).applied is False


def test_one_models_failure_does_not_stop_the_others(hub: FakeHub) -> None:
    """A gated repo (or a bad hash) of one model stopped `car models upgrade` for every model,
    and what had been upgraded already, its old files deleted, was not reported."""
    other_repo = "tiny/other-GGUF"
    other = quant("q4_k_m", 0.3, 1, hf_repo=other_repo, filename="other.gguf")
    other = other.model_copy(update={"id": "tiny/other:q4_k_m"})
    catalog = {other.id: other, Q4.id: Q4}
    hub.publish(REPO, {"tiny-q4_k_m.gguf": V1})
    hub.publish(other_repo, {"other.gguf": V1[:1000]})
    pull(Q4)
    pull(other)
    hub.publish(REPO, {"tiny-q4_k_m.gguf": V2})
    hub.publish(other_repo, {"other.gguf": V2[:1000]})
    hub.gated[other_repo] = "hf_token_0001"
    found = check_upgrades([other, Q4], [other, Q4], MACHINE)
    assert [(u.model_id, u.kind) for u in found] == [(other.id, "failed"), (Q4.id, "revision")]
    assert found[0].error is not None and "refused access (HTTP 401)" in found[0].error
    del hub.gated[other_repo]
    found = check_upgrades([other, Q4], [other, Q4], MACHINE)
    hub.corrupt.add("other.gguf")  # the first one applied fails its hash
    done = apply_each(found, catalog)
    assert done[0].error is not None and "does not match" in done[0].error and not done[0].applied
    assert done[1].applied and done[1].error is None and local_path(Q4).read_bytes() == V2


def test_checking_offline_is_one_line(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.publish(REPO, {"tiny-q4_k_m.gguf": V1})
    pull(Q4)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from car_inference.errors import DownloadFailed

    with pytest.raises(DownloadFailed, match=r"^cannot check for upgrades: the Hub is switched off"):
        check_upgrades([Q4], [Q4], MACHINE)


def test_a_snapshot_model_upgrade_keeps_the_blobs_both_revisions_share(hub: FakeHub) -> None:
    model = ModelSchema.model_validate({
        "id": "tiny/embed", "name": "embed", "provider": "tiny", "capabilities": ["embed"],
        "source": {"kind": "sentence", "hf_repo": "tiny/embed"},
    })  # fmt: skip
    config, weights = b'{"dim": 8}', os.urandom(50_000)
    files = {"config.json": config, "modules.json": b"[]", "1_Pooling/config.json": b"{}",
             "model.safetensors": weights}  # fmt: skip
    old = hub.publish("tiny/embed", files)
    pull(model)
    new = hub.publish("tiny/embed", {"model.safetensors": weights[::-1]})
    [found] = check_upgrades([model], [model], MACHINE)
    assert found.kind == "revision" and found.changed == ["model.safetensors"]
    done = apply_upgrade(found, {model.id: model})
    assert done.freed_bytes == len(weights) and done.latest == new
    assert not (repo_dir("tiny/embed") / "snapshots" / old).exists()
    folder = local_path(model)
    assert folder.name == new and (folder / "config.json").read_bytes() == config
    assert (folder / "1_Pooling" / "config.json").read_bytes() == b"{}"
    assert (folder / "model.safetensors").read_bytes() == weights[::-1]
    assert len(list((repo_dir("tiny/embed") / "blobs").iterdir())) == 4
