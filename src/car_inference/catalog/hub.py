"""The few Hugging Face Hub calls `car models pull` makes, with resumable, verified transfers.

Why not ``hf_hub_download``: huggingface_hub (2.x) downloads each file into a temporary file with a
per-process random name and deletes it when the download fails, so an interrupted pull of a 5 GB
GGUF starts again from zero. Here a file is fetched into ``blobs/<etag>.incomplete`` in the same
cache layout huggingface_hub uses (``locate`` and huggingface_hub both read it), continued with an
HTTP ``Range`` request by the next pull, and checked before it becomes a blob: its size against the
Hub's ``X-Linked-Size``/``Content-Length``, and its hash against the Hub's ETag (an LFS file's
ETag is its sha256, a small file's is its git blob id). The same lock file as huggingface_hub's
(``.locks/<repo>/<etag>.lock``) keeps two processes from writing one blob.

Errors are one line (``DownloadFailed``): offline mode, an unreachable endpoint, a missing repo,
revision or file, a gated repo without a token, a hash that does not match. A connection that
breaks mid-file is resumed quietly a few times before the pull gives up (what it has stays on disk).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit

import httpx

from ..errors import DownloadFailed
from .locate import hf_cache_dir

__all__ = [
    "HubClient",
    "RemoteFile",
    "hub_endpoint",
    "hub_offline",
    "link_snapshot",
    "read_ref",
    "repo_dir",
    "write_ref",
]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_GIT_ID = re.compile(r"^[0-9a-f]{40}$")
_CHUNK = 1 << 20
_RESUME_TRIES = 5  # a connection that breaks mid-file is continued this many times


def hub_endpoint() -> str:
    """``$HF_ENDPOINT`` (a mirror, or a test's fake Hub), read at each call."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_offline() -> bool:
    """huggingface_hub's offline switches, read at each call."""
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _token() -> str | None:
    if token := os.environ.get("HF_TOKEN"):
        return token
    try:
        from huggingface_hub import get_token
    except ImportError:
        return None
    return get_token()


def repo_dir(repo: str) -> Path:
    return hf_cache_dir() / ("models--" + repo.replace("/", "--"))


def read_ref(repo: str, revision: str) -> str | None:
    ref = repo_dir(repo) / "refs" / revision
    return ref.read_text().strip() if ref.is_file() else None


def write_ref(repo: str, revision: str, commit: str) -> None:
    if revision == commit:
        return
    ref = repo_dir(repo) / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    part = ref.with_name(f".{ref.name}.{os.getpid()}.{threading.get_ident()}")
    part.write_text(commit)
    os.replace(part, ref)  # a reader (another pull) never sees a half-written ref


def link_snapshot(repo: str, commit: str, path: str, etag: str) -> Path:
    """``snapshots/<commit>/<path>`` pointing at ``blobs/<etag>`` (relative, as huggingface_hub does)."""
    root = repo_dir(repo)
    link = root / "snapshots" / commit / path
    link.parent.mkdir(parents=True, exist_ok=True)
    blob = root / "blobs" / etag
    if (link.is_symlink() or link.exists()) and link.resolve() == blob.resolve():
        return link
    # Made beside it and renamed over it: two pulls linking the same file at once both succeed.
    part = link.with_name(f".{link.name}.{os.getpid()}.{threading.get_ident()}")
    try:
        part.symlink_to(os.path.relpath(blob, link.parent))
    except OSError:  # no symlinks on this file system: a copy
        shutil.copy2(blob, part)
    os.replace(part, link)
    return link


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repo at a commit, as the Hub's ``HEAD .../resolve/...`` describes it."""

    repo: str
    path: str
    commit: str
    etag: str  # an LFS file's sha256, else the git blob id
    size: int | None
    url: str  # where the bytes are (the CDN for LFS files)

    @property
    def digest(self) -> str | None:
        """``sha256:<hex>`` or ``git-sha1:<hex>``: what the downloaded bytes are checked against."""
        if _SHA256.match(self.etag):
            return f"sha256:{self.etag}"
        if _GIT_ID.match(self.etag) and self.size is not None:
            return f"git-sha1:{self.etag}"
        return None


def _new_hash(remote: RemoteFile) -> hashlib._Hash | None:
    digest = remote.digest
    if digest is None:
        return None
    if digest.startswith("sha256:"):
        return hashlib.sha256()
    h = hashlib.sha1(usedforsecurity=False)
    h.update(b"blob %d\0" % (remote.size or 0))
    return h


Progress = Callable[[int], None]


class HubUnreachable(DownloadFailed):
    """The endpoint itself cannot be reached: every model's pull or check would fail the same way."""


class HubClient:
    """``HEAD``/``GET`` against one Hub endpoint; ``with HubClient() as hub: ...``."""

    def __init__(self, endpoint: str | None = None, *, timeout_s: float = 10.0, read_s: float = 60.0) -> None:
        self.endpoint = endpoint or hub_endpoint()
        self._token = _token()
        self._read_s = read_s
        timeout = httpx.Timeout(timeout_s, read=read_s)
        self._http = httpx.Client(timeout=timeout, follow_redirects=False, trust_env=True)

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def _headers(self, url: str) -> dict[str, str]:
        headers = {"Accept-Encoding": "identity", "User-Agent": "car-inference"}
        if self._token and urlsplit(url).netloc == urlsplit(self.endpoint).netloc:
            headers["Authorization"] = f"Bearer {self._token}"  # never to a CDN
        return headers

    def _send(self, method: str, url: str, what: str, **kwargs: object) -> httpx.Response:
        try:
            response = self._http.request(method, url, headers=self._headers(url), **kwargs)  # type: ignore[arg-type]
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        if response.status_code >= 400:
            raise self._http_error(response, what)
        return response

    def _unreachable(self, exc: Exception) -> DownloadFailed:
        if isinstance(exc, httpx.ReadTimeout):  # it was reached: "cannot reach (timed out)" was false
            return HubUnreachable(f"{self.endpoint} took the request but did not answer within "
                                  f"{self._read_s:g} s; check the network or HF_ENDPOINT")  # fmt: skip
        reason = str(exc).strip() or type(exc).__name__
        return HubUnreachable(f"cannot reach {self.endpoint} ({reason}); check the network or HF_ENDPOINT")

    def _http_error(self, response: httpx.Response, what: str) -> DownloadFailed:
        code = response.headers.get("X-Error-Code", "")
        status = response.status_code
        if status in (401, 403) or code == "GatedRepo":
            return DownloadFailed(f"{what}: {self.endpoint} refused access (HTTP {status}); a gated or "
                                  "private repo needs a token with access: set HF_TOKEN")  # fmt: skip
        messages = {"RepoNotFound": "no such repo", "RevisionNotFound": "no such revision",
                    "EntryNotFound": "no such file"}  # fmt: skip
        if status == 404:
            return DownloadFailed(f"{what}: {messages.get(code, 'not found')} on {self.endpoint}")
        return DownloadFailed(f"{what}: {self.endpoint} answered HTTP {status}")

    def revision(self, repo: str, revision: str) -> tuple[str, list[str]]:
        """The commit ``revision`` names and the repo's files at it."""
        url = f"{self.endpoint}/api/models/{repo}/revision/{quote(revision, safe='')}"
        response = self._send("GET", url, f"{repo}@{revision}")
        try:
            data = response.json()
            return str(data["sha"]), [str(s["rfilename"]) for s in data.get("siblings", [])]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise DownloadFailed(f"{repo}@{revision}: {self.endpoint} does not answer like a Hugging Face "
                                 "Hub (no commit and file list); check HF_ENDPOINT") from None  # fmt: skip

    def file(self, repo: str, path: str, revision: str) -> RemoteFile:
        """What the Hub says about one file: commit, ETag, size and where its bytes are."""
        url = f"{self.endpoint}/{repo}/resolve/{quote(revision, safe='')}/{quote(path)}"
        what = f"{repo}@{revision}: {path}"
        response = self._send("HEAD", url, what)
        for _ in range(5):  # a renamed repo redirects within the Hub (a relative Location)
            location = response.headers.get("Location", "")
            if not (response.is_redirect and location.startswith("/")):
                break
            url = urljoin(url, location)
            response = self._send("HEAD", url, what)
        headers = response.headers
        commit = headers.get("X-Repo-Commit")
        etag = (headers.get("X-Linked-Etag") or headers.get("ETag") or "").removeprefix("W/").strip('"')
        if not commit or not etag:
            raise DownloadFailed(f"{what}: {self.endpoint} does not answer like a Hugging Face Hub "
                                 "(no X-Repo-Commit or ETag); check HF_ENDPOINT")  # fmt: skip
        size_header = headers.get("X-Linked-Size") or (
            None if response.is_redirect else headers.get("Content-Length")
        )
        location = (
            urljoin(url, headers["Location"]) if response.is_redirect and "Location" in headers else url
        )
        size = int(size_header) if size_header and size_header.isdigit() else None
        return RemoteFile(repo, path, commit, etag, size, location)

    def fetch(self, remote: RemoteFile, progress: Progress | None = None) -> tuple[Path, int, int]:
        """Make ``blobs/<etag>`` hold ``remote``'s verified bytes. Returns the blob, the bytes
        downloaded now and the bytes a previous, interrupted pull had left (resumed from)."""
        blobs = repo_dir(remote.repo) / "blobs"
        blob = blobs / remote.etag
        with _lock(remote):
            if blob.is_file():
                return blob, 0, 0
            blobs.mkdir(parents=True, exist_ok=True)
            partial = blobs / (remote.etag + ".incomplete")
            had = partial.stat().st_size if partial.is_file() else 0
            if remote.size is not None and had > remote.size:
                partial.unlink()
                had = 0
            self._check_space(remote, had, blobs)
            hasher = _new_hash(remote)
            if hasher is not None and had:
                with partial.open("rb") as f:
                    while chunk := f.read(_CHUNK):
                        hasher.update(chunk)
            partial.touch()  # a file of 0 bytes has no transfer to create it (its rename failed)
            got = self._transfer(remote, partial, had, hasher, progress)
            _verify(remote, partial, had + got, hasher)
            partial.replace(blob)
            return blob, got, had

    def _check_space(self, remote: RemoteFile, had: int, folder: Path) -> None:
        if remote.size is None:
            return
        free = shutil.disk_usage(folder).free
        if remote.size - had > free:
            raise DownloadFailed(f"{remote.repo}: {remote.path} needs {_amount(remote.size - had)} "
                                 f"more, but {folder} has {_amount(free)} free")  # fmt: skip

    def _transfer(
        self,
        remote: RemoteFile,
        partial: Path,
        had: int,
        hasher: hashlib._Hash | None,
        progress: Progress | None,
    ) -> int:
        have, got, tries = had, 0, 0
        while remote.size is None or have < remote.size:
            headers = self._headers(remote.url) | ({"Range": f"bytes={have}-"} if have else {})
            try:
                with self._http.stream("GET", remote.url, headers=headers, follow_redirects=True) as response:
                    if response.status_code == 416 and remote.size == have:
                        break
                    if response.status_code == 416 and have:  # it has fewer bytes than the Hub says
                        partial.unlink(missing_ok=True)  # or every later pull asks past its end
                        raise DownloadFailed(
                            f"{remote.repo}: {remote.path}: {response.url.host} has only {have:,} of "
                            f"the {remote.size or 0:,} bytes the Hub lists; the partial file was removed"
                        )
                    if response.status_code >= 400:
                        raise self._http_error(response, f"{remote.repo}: {remote.path}")
                    if have and response.status_code == 200:  # the server ignored Range: start over
                        partial.write_bytes(b"")
                        have, hasher = 0, _new_hash(remote)
                    with partial.open("ab") as out:
                        for chunk in response.iter_bytes():
                            out.write(chunk)
                            have, got = have + len(chunk), got + len(chunk)
                            if hasher is not None:
                                hasher.update(chunk)
                            if progress is not None:
                                progress(len(chunk))
                if remote.size is None:
                    break
                if have < remote.size:
                    raise httpx.RemoteProtocolError("the server ended the file early")
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if got == 0 and tries == 0:
                    raise self._unreachable(exc) from None
                tries = self._retry(remote, have, tries, exc)
            except httpx.TransportError as exc:  # broke off mid-file: continue from what arrived
                tries = self._retry(remote, have, tries, exc)
        return got

    def _retry(self, remote: RemoteFile, have: int, tries: int, exc: Exception) -> int:
        if tries + 1 >= _RESUME_TRIES:
            total = f" of {remote.size:,}" if remote.size is not None else ""
            raise DownloadFailed(f"{remote.repo}: the download of {remote.path} broke off at {have:,}{total} "
                                 f"bytes ({exc}); pull again to continue from there") from None  # fmt: skip
        return tries + 1


def _amount(n: int) -> str:
    """Bytes as a person reads them: ``1,234 bytes`` under a megabyte (a 300 KB file "needed
    0 MB more" of a disk with "0 MB free"), else ``12.3 MB``."""
    return f"{n:,} bytes" if n < 1_000_000 else f"{n / 1e6:,.1f} MB"


def _verify(remote: RemoteFile, partial: Path, size: int, hasher: hashlib._Hash | None) -> None:
    if remote.size is not None and size != remote.size:
        partial.unlink(missing_ok=True)
        raise DownloadFailed(f"{remote.repo}: {remote.path} arrived with {size:,} bytes, the Hub says "
                             f"{remote.size:,}; the file was deleted, pull again")  # fmt: skip
    if hasher is not None and hasher.hexdigest() != remote.etag:
        partial.unlink(missing_ok=True)
        kind = (remote.digest or "").split(":")[0]
        raise DownloadFailed(f"{remote.repo}: {remote.path} does not match its {kind} on the Hub "
                             f"({hasher.hexdigest()[:12]}… instead of {remote.etag[:12]}…); the file was "
                             "deleted, pull again")  # fmt: skip


@contextlib.contextmanager
def _lock(remote: RemoteFile) -> Iterator[None]:
    """huggingface_hub's own lock file for this blob (``filelock`` takes the same ``flock``)."""
    path = hf_cache_dir() / ".locks" / repo_dir(remote.repo).name / f"{remote.etag}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
