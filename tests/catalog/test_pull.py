"""`car models pull` against a Hugging Face Hub on loopback (tests/fakes/hf_hub.py): files land in the
HF cache where `locate` finds them, interrupted downloads continue, hashes are checked, and every
failure is one line."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from car_inference.catalog import load_builtin
from car_inference.catalog.hub import HubClient, repo_dir
from car_inference.catalog.locate import local_path
from car_inference.catalog.pull import pull, pull_model
from car_inference.errors import DownloadFailed, ModelUnavailable, UnsupportedMode
from car_inference.schema import ModelSchema
from fakes.hf_hub import FakeHub
from fakes.http_answer import answering

REPO = "tiny/tiny-GGUF"
WEIGHTS = os.urandom(3_000_000)


def gguf_model(
    model_id: str = "tiny/tiny:q4", filename: str = "tiny-q4.gguf", **extra: object
) -> ModelSchema:
    source = {"kind": "gguf", "hf_repo": REPO, "filename": filename} | extra
    return ModelSchema.model_validate({"id": model_id, "name": "tiny", "provider": "tiny",
                                       "capabilities": ["generate"], "source": source})  # fmt: skip


class Bars:
    """A PullProgress that remembers what it was told."""

    def __init__(self) -> None:
        self.started: dict[str, tuple[int | None, int]] = {}
        self.advanced: dict[str, int] = {}
        self.finished: dict[str, int] = {}

    def file_started(self, path: str, total: int | None, done: int) -> None:
        self.started[path] = (total, done)

    def advance(self, path: str, n: int) -> None:
        self.advanced[path] = self.advanced.get(path, 0) + n

    def file_finished(self, path: str, downloaded: int) -> None:
        self.finished[path] = downloaded


def _builtin(model_id: str) -> ModelSchema:
    return next(m for m in load_builtin().models if m.id == model_id)


def test_packaged_model_needs_no_download() -> None:
    assert pull_model(_builtin("huggingface/smollm2-135m-instruct:q4_1")).is_file()


def test_remote_model_has_nothing_to_pull() -> None:
    with pytest.raises(UnsupportedMode, match="served by its provider or server; nothing to download"):
        pull_model(_builtin("openai/gpt-6-luna"))
    ollama = ModelSchema.model_validate({
        "id": "ollama/tiny", "name": "tiny", "provider": "ollama", "capabilities": ["generate"],
        "source": {"kind": "ollama", "model_tag": "tiny:1b"},
    })  # fmt: skip
    with pytest.raises(UnsupportedMode, match=r"Ollama keeps its models: .*`ollama pull tiny:1b`"):
        pull_model(ollama)  # it said "served remotely", of a model on this machine's Ollama


def test_offline_is_one_line_naming_the_repo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The test run is offline (HF_HUB_OFFLINE=1): nothing is attempted, the error says why and what.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(DownloadFailed) as caught:
        pull_model(_builtin("qwen/qwen3-0.6b:q8_0"))
    message = str(caught.value)
    assert "Qwen/Qwen3-0.6B-GGUF" in message and "HF_HUB_OFFLINE" in message and "\n" not in message


def test_pull_fetches_verifies_and_makes_the_model_available(hub: FakeHub) -> None:
    model = gguf_model(mmproj="mmproj.gguf")
    commit = hub.publish(
        REPO, {"tiny-q4.gguf": WEIGHTS, "mmproj.gguf": b"projector" * 1000, "README.md": b"hi"}
    )
    with pytest.raises(ModelUnavailable, match="car models pull tiny/tiny:q4"):
        local_path(model)
    bars = Bars()
    report = pull(model, bars)
    assert report.commit == commit and report.previous_commit is None
    assert report.path == local_path(model) and report.path.read_bytes() == WEIGHTS
    assert report.downloaded_bytes == len(WEIGHTS) + 9000
    sha = hashlib.sha256(WEIGHTS).hexdigest()
    assert [f.digest for f in report.files] == [
        f"sha256:{sha}",
        f"sha256:{hashlib.sha256(b'projector' * 1000).hexdigest()}",
    ]
    assert (repo_dir(REPO) / "blobs" / sha).is_file() and report.path.is_symlink(), "huggingface_hub's layout"
    assert (repo_dir(REPO) / "refs" / "main").read_text() == commit
    assert bars.started["tiny-q4.gguf"] == (len(WEIGHTS), 0) and bars.advanced["tiny-q4.gguf"] == len(WEIGHTS)
    assert bars.finished == {"tiny-q4.gguf": len(WEIGHTS), "mmproj.gguf": 9000}

    hub.requests.clear()
    again = pull(model, Bars())
    assert again.downloaded_bytes == 0 and again.previous_commit == commit
    assert [r[0] for r in hub.requests] == ["HEAD", "HEAD"], "up to date: asked, nothing fetched"


def test_an_interrupted_pull_continues_where_it_stopped(hub: FakeHub) -> None:
    model = gguf_model()
    hub.publish(REPO, {"tiny-q4.gguf": WEIGHTS})
    hub.cut("tiny-q4.gguf", after=300_000, times=5)  # every try of this pull breaks off
    with pytest.raises(
        DownloadFailed, match=r"broke off at 1,500,000 of 3,000,000 bytes.*pull again to continue"
    ):
        pull(model)
    sha = hashlib.sha256(WEIGHTS).hexdigest()
    partial = repo_dir(REPO) / "blobs" / f"{sha}.incomplete"
    assert partial.stat().st_size == 1_500_000, "five tries of 300 kB each, kept on disk"
    ranges = [r[2] for r in hub.gets("/cdn/")]
    assert ranges == [None, "bytes=300000-", "bytes=600000-", "bytes=900000-", "bytes=1200000-"]

    hub.requests.clear()
    bars = Bars()
    report = pull(model, bars)
    assert [r[2] for r in hub.gets("/cdn/")] == ["bytes=1500000-"], "the next pull asks only for the rest"
    assert report.files[0].resumed_from == 1_500_000 and report.downloaded_bytes == 1_500_000
    assert bars.started["tiny-q4.gguf"] == (3_000_000, 1_500_000), "the bar starts where it stopped"
    assert report.path.read_bytes() == WEIGHTS and not partial.exists()


def test_a_server_with_fewer_bytes_than_the_hub_lists_is_said_and_not_asked_again(hub: FakeHub) -> None:
    """It answered a resume past its end with 416, shown as "answered HTTP 416", and the partial
    file stayed: every later pull asked past the end again and failed the same way."""
    model = gguf_model()
    hub.publish(REPO, {"tiny-q4.gguf": WEIGHTS})
    sha = hashlib.sha256(WEIGHTS).hexdigest()
    hub.blobs[sha] = WEIGHTS[:-1000]  # the CDN's copy is short
    with pytest.raises(DownloadFailed, match=r"has only 2,999,000 of the 3,000,000 bytes the Hub lists"):
        pull(model)
    assert not (repo_dir(REPO) / "blobs" / f"{sha}.incomplete").exists()
    hub.blobs[sha] = WEIGHTS  # mended: the next pull starts over and succeeds
    assert pull(model).path.read_bytes() == WEIGHTS


def test_a_corrupt_download_is_refused_and_deleted(hub: FakeHub) -> None:
    model = gguf_model()
    hub.publish(REPO, {"tiny-q4.gguf": WEIGHTS})
    hub.corrupt.add("tiny-q4.gguf")
    with pytest.raises(DownloadFailed, match=r"does not match its sha256 on the Hub.*deleted, pull again"):
        pull(model)
    assert not [p for p in (repo_dir(REPO) / "blobs").iterdir()], "neither a blob nor a partial file"
    with pytest.raises(ModelUnavailable):
        local_path(model)
    hub.corrupt.clear()
    assert pull(model).path.read_bytes() == WEIGHTS


def test_small_files_are_checked_against_their_git_blob_id(hub: FakeHub) -> None:
    model = ModelSchema.model_validate({
        "id": "tiny/embed", "name": "embed", "provider": "tiny", "capabilities": ["embed"],
        "source": {"kind": "sentence", "hf_repo": "tiny/embed"},
    })  # fmt: skip
    hub.publish(
        "tiny/embed", {"config.json": b"{}", "modules.json": b"[]", "model.safetensors": WEIGHTS[:1000]}
    )
    report = pull(model)
    digests = {f.path: f.digest for f in report.files}
    assert digests["config.json"] == "git-sha1:" + hashlib.sha1(b"blob 2\0{}").hexdigest()
    assert str(digests["model.safetensors"]).startswith("sha256:")
    assert report.path == local_path(model) and (report.path / "config.json").read_bytes() == b"{}"
    hub.corrupt.add("config.json")
    hub.publish("tiny/embed", {"config.json": b'{"a": 1}'})
    with pytest.raises(DownloadFailed, match="does not match its git-sha1"):
        pull(model)


def test_an_empty_file_of_a_repo_is_pulled(hub: FakeHub) -> None:
    """A 0-byte file (a .gitkeep, an empty __init__.py) needs no transfer, so nothing created its
    partial file and its rename failed: such a repo could never be pulled."""
    model = ModelSchema.model_validate({
        "id": "tiny/embed", "name": "embed", "provider": "tiny", "capabilities": ["embed"],
        "source": {"kind": "sentence", "hf_repo": "tiny/embed"},
    })  # fmt: skip
    hub.publish("tiny/embed", {"config.json": b"{}", "empty.txt": b"", "model.safetensors": WEIGHTS[:1000]})
    report = pull(model)
    assert (report.path / "empty.txt").read_bytes() == b"" and local_path(model) == report.path


def test_a_sentence_model_skips_the_copies_for_other_runtimes(hub: FakeHub) -> None:
    """The whole repo came: ONNX, OpenVINO and TensorFlow copies and PyTorch's .bin beside the
    safetensors (about ten times the model for all-MiniLM-L6-v2)."""
    model = ModelSchema.model_validate({
        "id": "tiny/embed", "name": "embed", "provider": "tiny", "capabilities": ["embed"],
        "source": {"kind": "sentence", "hf_repo": "tiny/embed"},
    })  # fmt: skip
    hub.publish("tiny/embed", {
        "config.json": b"{}", "modules.json": b"[]", "model.safetensors": WEIGHTS[:1000],
        "pytorch_model.bin": b"b" * 500, "onnx/model.onnx": b"o" * 500, "onnx/model_qint8.onnx": b"q",
        "openvino/openvino_model.xml": b"x", "tf_model.h5": b"h", "1_Pooling/config.json": b"{}",
    })  # fmt: skip
    report = pull(model)
    assert sorted(f.path for f in report.files) == [
        "1_Pooling/config.json", "config.json", "model.safetensors", "modules.json",
    ]  # fmt: skip


def test_a_split_gguf_is_pulled_whole_and_available_only_whole(hub: FakeHub) -> None:
    """Only part 1 of `name-00001-of-00003.gguf` came, and the model read "available"."""
    model = gguf_model(filename="big-00001-of-00003.gguf")
    parts = {f"big-0000{i}-of-00003.gguf": WEIGHTS[i * 1000 : (i + 1) * 1000] for i in range(1, 4)}
    hub.publish(REPO, parts)
    report = pull(model)
    assert sorted(f.path for f in report.files) == sorted(parts)
    assert local_path(model).name == "big-00001-of-00003.gguf"
    third = local_path(model).parent / "big-00003-of-00003.gguf"
    third.unlink()  # a part gone: not available
    with pytest.raises(ModelUnavailable):
        local_path(model)


def test_patterns_choose_the_snapshot_files(hub: FakeHub) -> None:
    model = ModelSchema.model_validate({
        "id": "tiny/pipe", "name": "pipe", "provider": "tiny", "capabilities": ["image_generation"],
        "source": {"kind": "diffusers", "hf_repo": "tiny/pipe", "allow_patterns": ["*.json", "unet/"],
                   "ignore_patterns": ["*.bin"]},
    })  # fmt: skip
    files = {"model_index.json": b"{}", "unet/config.json": b"{}", "unet/w.safetensors": b"w",
             "unet/w.bin": b"spare", "vae/w.safetensors": b"v", "logo.png": b"png"}  # fmt: skip
    hub.publish("tiny/pipe", files)
    report = pull(model)
    assert sorted(f.path for f in report.files) == [
        "model_index.json",
        "unet/config.json",
        "unet/w.safetensors",
    ]
    assert report.path == local_path(model)


def test_a_moved_revision_fetches_only_what_changed(hub: FakeHub) -> None:
    model = gguf_model(mmproj="mmproj.gguf")
    first = hub.publish(REPO, {"tiny-q4.gguf": WEIGHTS, "mmproj.gguf": b"p" * 100})
    pull(model)
    second = hub.publish(REPO, {"tiny-q4.gguf": WEIGHTS[::-1]})
    hub.requests.clear()
    report = pull(model)
    assert report.previous_commit == first and report.commit == second
    assert [f.downloaded for f in report.files] == [len(WEIGHTS), 0], "the projector's blob is shared"
    assert local_path(model).read_bytes() == WEIGHTS[::-1]


@pytest.mark.parametrize(
    ("publish", "model", "message"),
    [
        (False, gguf_model(), r"tiny/tiny-GGUF@main: tiny-q4\.gguf: no such repo on http://127"),
        (True, gguf_model(filename="nope.gguf"), r"no such file on"),
        (True, gguf_model(revision="v9"), r"tiny/tiny-GGUF@v9: tiny-q4\.gguf: no such revision"),
    ],
)
def test_what_the_hub_lacks_is_named(hub: FakeHub, publish: bool, model: ModelSchema, message: str) -> None:
    if publish:
        hub.publish(REPO, {"tiny-q4.gguf": b"x"})
    with pytest.raises(DownloadFailed, match=message):
        pull(model)


def test_a_gated_repo_needs_hf_token_which_never_goes_to_the_cdn(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.publish(REPO, {"tiny-q4.gguf": WEIGHTS})
    hub.gated[REPO] = "hf_secret"
    with pytest.raises(
        DownloadFailed, match=r"refused access \(HTTP 401\); a gated or private repo needs .* HF_TOKEN"
    ):
        pull(gguf_model())
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert pull(gguf_model()).path.read_bytes() == WEIGHTS
    sent = {path.split("/")[1]: auth for path, auth in hub.auth[-2:]}
    assert sent == {"tiny": "Bearer hf_secret", "cdn": None}, "the token stays on the Hub"


def test_an_unreachable_endpoint_fails_at_once_in_one_line(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens once closed
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(DownloadFailed) as caught:
        pull(gguf_model())
    assert time.monotonic() - started < 2, "no retries before saying so"
    # ... naming the model and repo it was pulling ("cannot reach ..." named neither)
    prefix = f"could not pull tiny/tiny:q4 from {REPO}: cannot reach http://127.0.0.1:{port} ("
    assert str(caught.value).startswith(prefix), str(caught.value)
    assert "\n" not in str(caught.value) and caught.value.__cause__ is None


def test_two_pulls_at_once_download_the_file_once(hub: FakeHub) -> None:
    import threading

    hub.publish(REPO, {"tiny-q4.gguf": WEIGHTS})
    hub.slow["tiny-q4.gguf"] = 0.005
    reports, errors = [], []

    def one() -> None:
        try:
            reports.append(pull(gguf_model()))
        except Exception as exc:  # the assertion below shows it
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(reports) == 2 and sorted(r.downloaded_bytes for r in reports) == [0, len(WEIGHTS)]
    assert len(hub.gets("/cdn/")) == 1, "the second waited on huggingface_hub's lock file and found the blob"
    assert reports[0].path.read_bytes() == WEIGHTS


def test_a_cache_that_cannot_be_written_is_one_line(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.publish(REPO, {"tiny-q4.gguf": WEIGHTS})
    (tmp_path / "not-a-folder").write_text("a file where the cache should be")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "not-a-folder"))
    with pytest.raises(
        DownloadFailed, match=r"^could not pull tiny/tiny:q4 into .*not-a-folder: \[Errno"
    ) as caught:
        pull(gguf_model())
    assert "\n" not in str(caught.value)


def test_an_endpoint_that_takes_the_request_and_never_answers_is_said_so() -> None:
    """It said "cannot reach ... (timed out)" of a server it had reached, after a silent minute."""

    def silent(path: str) -> tuple[int, dict[str, str], bytes]:
        time.sleep(1.5)
        return 200, {}, b"{}"

    waited = pytest.raises(DownloadFailed, match=r"took the request but did not answer within 0\.3 s")
    with answering(silent) as server, HubClient(server.url, read_s=0.3) as hub, waited:
        hub.revision(REPO, "main")


def test_an_endpoint_that_is_not_a_hub_is_named(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    from fakes import FakeProviderServer

    snapshot = ModelSchema.model_validate({
        "id": "t/e", "name": "e", "provider": "t", "capabilities": ["embed"],
        "source": {"kind": "sentence", "hf_repo": "t/e"},
    })  # fmt: skip
    with FakeProviderServer() as other:  # an OpenAI-compatible server, not a Hub
        monkeypatch.setenv("HF_ENDPOINT", other.base_url)
        for model in (gguf_model(), snapshot):
            with pytest.raises(DownloadFailed) as caught:
                pull(model)
            assert "\n" not in str(caught.value) and other.base_url in str(caught.value)


def test_a_disk_without_room_says_how_much_is_needed_in_units_that_show_it(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 3 MB file on a disk with 200 KB free; and a 300 KB one with 1 KB free read "needs 0 MB
    more, but ... has 0 MB free". The disk's free space is the one thing faked."""
    free = {"bytes": 200_000}
    real = shutil.disk_usage
    monkeypatch.setattr(
        "car_inference.catalog.hub.shutil.disk_usage", lambda p: real(p)._replace(free=free["bytes"])
    )
    hub.publish(REPO, {"tiny-q4.gguf": WEIGHTS})
    with pytest.raises(DownloadFailed, match=r"needs 3\.0 MB more, but .* has 200,000 bytes free"):
        pull(gguf_model())
    free["bytes"] = 1_000
    hub.publish(REPO, {"tiny-q4.gguf": WEIGHTS[:300_000]})
    with pytest.raises(DownloadFailed, match=r"needs 300,000 bytes more, but .* has 1,000 bytes free"):
        pull(gguf_model())
