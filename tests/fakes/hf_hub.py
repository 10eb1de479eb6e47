"""A loopback HTTP server that speaks enough of the Hugging Face Hub for `car models pull`.

What it serves, in the Hub's own shapes (checked against huggingface_hub's ``file_download.py`` and
``hf_api.py``, which ``test_hf_hub.py`` points at this server):

* ``HEAD``/``GET /{repo}/resolve/{revision}/{path}``: a small (git) file answers ``200`` with
  ``ETag`` (its git blob id), ``Content-Length`` and ``X-Repo-Commit``; an LFS file (weights) answers
  ``302`` to ``/cdn/{sha256}`` on another host name (``localhost``) with ``X-Linked-Etag`` (its
  sha256), ``X-Linked-Size`` and
  ``X-Repo-Commit``, as the Hub redirects to its CDN. Unknown repos, revisions and files answer
  ``404`` with the Hub's ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``).
* ``GET /cdn/{sha256}``: the bytes, with ``Range`` (``206`` and ``Content-Range``).
* ``GET /api/models/{repo}/revision/{revision}``: ``{"id", "sha", "siblings": [{"rfilename"}]}``.

Faults a test can script: ``cut(path, after=n, times=k)`` makes the next ``k`` downloads of ``path``
send the full ``Content-Length`` but close the connection after ``n`` body bytes (an interrupted
download); ``slow[path] = s`` sends ``path`` in 64 kB pieces ``s`` seconds apart; ``corrupt``
serves a path's bytes with one byte flipped; ``gated[repo] = token`` answers ``401``
(``X-Error-Code: GatedRepo``) unless the request carries ``Authorization: Bearer <token>``; ``auth``
records the Authorization header of each request, by path. ``requests`` records
``(method, path, range header)``.
Stdlib only: ``ThreadingHTTPServer`` in a daemon thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

__all__ = ["FakeHub", "git_blob_id", "serving_hub"]

_LFS_SUFFIXES = (".gguf", ".safetensors", ".bin", ".onnx", ".pt")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_REVISION_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>[^/]+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob: what the Hub sends as the ETag of a non-LFS file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class _Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> files
    refs: dict[str, str] = field(default_factory=dict)  # branch -> sha


class FakeHub:
    """``with FakeHub() as hub: hub.publish("org/name", {"f.gguf": b"..."})``; ``hub.url`` is the
    endpoint to put in ``HF_ENDPOINT``."""

    def __init__(self) -> None:
        self.repos: dict[str, _Repo] = {}
        self.blobs: dict[str, bytes] = {}  # sha256 -> bytes (the CDN)
        self.cut_after: dict[str, list[int]] = {}
        self.corrupt: set[str] = set()
        self.slow: dict[str, float] = {}
        self.gated: dict[str, str] = {}
        self.auth: list[tuple[str, str | None]] = []
        self.requests: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        """The same server under another host name: the Hub's CDN is another host, and clients
        follow a redirect within the Hub but stop at one that leaves it."""
        return f"http://localhost:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def publish(self, repo: str, files: dict[str, bytes], branch: str = "main", *, keep: bool = True) -> str:
        """A new commit on ``branch``: the branch's files (when ``keep``) updated with ``files``."""
        with self._lock:
            state = self.repos.setdefault(repo, _Repo())
            base = dict(state.commits.get(state.refs.get(branch, ""), {})) if keep else {}
            base.update(files)
            sha = hashlib.sha1(json.dumps([repo, len(state.commits), sorted(base)]).encode()).hexdigest()
            state.commits[sha] = base
            state.refs[branch] = sha
            for data in base.values():
                self.blobs[hashlib.sha256(data).hexdigest()] = data
            return sha

    def cut(self, path: str, after: int, times: int = 1) -> None:
        self.cut_after[path] = [after] * times

    def _next_cut(self, path: str) -> int | None:
        with self._lock:
            cuts = self.cut_after.get(path)
            return cuts.pop(0) if cuts else None

    @staticmethod
    def is_lfs(path: str) -> bool:
        return path.endswith(_LFS_SUFFIXES)

    def gets(self, path_part: str) -> list[tuple[str, str, str | None]]:
        """The GET requests whose path contains ``path_part``."""
        return [r for r in self.requests if r[0] == "GET" and path_part in r[1]]

    # --- lookups the handler uses ---------------------------------------------------------------

    def commit_of(self, repo: str, rev: str) -> tuple[str | None, dict[str, bytes] | None]:
        with self._lock:
            state = self.repos.get(repo)
            if state is None:
                return None, None
            sha = state.refs.get(rev, rev)
            return sha, state.commits.get(sha)


@contextlib.contextmanager
def serving_hub(cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A fake Hub in ``HF_ENDPOINT``, online (the test run is offline otherwise), with the HF cache
    at ``cache`` and no token."""
    with FakeHub() as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        yield fake


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            return

        def do_HEAD(self) -> None:
            self._route(body=False)

        def do_GET(self) -> None:
            self._route(body=True)

        def _route(self, *, body: bool) -> None:
            path = urlsplit(self.path).path
            hub.requests.append((self.command, path, self.headers.get("Range")))
            hub.auth.append((path, self.headers.get("Authorization")))
            if m := _RESOLVE.match(path):
                self._resolve(m["repo"], unquote(m["rev"]), unquote(m["path"]), body)
            elif m := _REVISION_API.match(path):
                self._revision(m["repo"], unquote(m["rev"]))
            elif path.startswith("/cdn/"):
                self._cdn(path.removeprefix("/cdn/"), body)
            else:
                self._error(404, "RepoNotFound", "Repository not found")

        def _refused(self, repo: str) -> bool:
            token = hub.gated.get(repo)
            if token is None or self.headers.get("Authorization") == f"Bearer {token}":
                return False
            self._error(401, "GatedRepo", f"Access to model {repo} is restricted.")
            return True

        def _resolve(self, repo: str, rev: str, name: str, body: bool) -> None:
            if self._refused(repo):
                return None
            sha, files = hub.commit_of(repo, rev)
            if sha is None:
                return self._error(404, "RepoNotFound", "Repository not found")
            if files is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            if name not in files:
                return self._error(404, "EntryNotFound", f"{name} does not exist", commit=sha)
            data = files[name]
            if hub.is_lfs(name):
                digest = hashlib.sha256(data).hexdigest()
                self.send_response(302)
                self.send_header("Location", f"{hub.cdn_url}/cdn/{digest}?name={name}")
                self.send_header("X-Linked-Etag", f'"{digest}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("ETag", f'"{git_blob_id(b"pointer " + digest.encode())}"')
                self.send_header("X-Repo-Commit", sha)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            return self._bytes(name, data, body, etag=git_blob_id(data), commit=sha)

        def _cdn(self, digest: str, body: bool) -> None:
            data = hub.blobs.get(digest)
            if data is None:
                return self._error(404, "EntryNotFound", "no such object")
            query = urlsplit(self.path).query
            name = query.removeprefix("name=") if query.startswith("name=") else digest
            return self._bytes(name, data, body, etag=digest)

        def _bytes(self, name: str, data: bytes, body: bool, *, etag: str, commit: str | None = None) -> None:
            if name in hub.corrupt:
                data = data[:-1] + bytes([data[-1] ^ 0xFF]) if data else data
            start, end = 0, len(data) - 1
            status = 200
            if (header := self.headers.get("Range")) and (m := _RANGE.match(header)):
                start = int(m[1])
                end = int(m[2]) if m[2] else len(data) - 1
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            chunk = data[start : end + 1]
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(chunk)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{etag}"')
            if commit:
                self.send_header("X-Repo-Commit", commit)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.end_headers()
            if not body:
                return
            cut = hub._next_cut(name)
            if cut is not None and cut < len(chunk):
                self.wfile.write(chunk[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            pause = hub.slow.get(name)
            if pause is None:
                self.wfile.write(chunk)
                return
            try:
                for at in range(0, len(chunk), 65536):
                    self.wfile.write(chunk[at : at + 65536])
                    self.wfile.flush()
                    time.sleep(pause)
            except (BrokenPipeError, ConnectionResetError):  # the client went away (a killed pull)
                self.close_connection = True

        def _revision(self, repo: str, rev: str) -> None:
            if self._refused(repo):
                return None
            sha, files = hub.commit_of(repo, rev)
            if sha is None:
                return self._error(404, "RepoNotFound", "Repository not found")
            if files is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            siblings = [{"rfilename": name} for name in sorted(files)]
            return self._json(200, {"id": repo, "modelId": repo, "sha": sha, "siblings": siblings})

        def _error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
            self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message}
                       | ({"X-Repo-Commit": commit} if commit else {}))  # fmt: skip

        def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
            raw = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(raw)

    return Handler
