"""A stand-in for the `ollama` executable: `serve` answers Ollama's native API (version, the list of
pulled models and pulling one, in Ollama's own JSON shapes) on ``$OLLAMA_HOST``, like ``ollama serve``.
It lets the supervisor's many-model path and `car models pull ollama/...` run for real where Ollama
is not installed.

``POST /api/pull`` streams NDJSON as Ollama does: ``pulling manifest``, then for each layer of the
tag's manifest lines ``{"status": "pulling <short digest>", "digest", "total", "completed"}`` as
the layer arrives, then ``verifying sha256 digest``, ``writing manifest``, ``success``; an unknown
tag gets ``{"error": "pull model manifest: file does not exist"}``. A pulled tag joins
``/api/tags``. ``POST /fake/library`` (tests only) puts a new version of a tag in the registry.
``broken:1b`` stops mid-layer (the connection closes), as a killed server would."""

from __future__ import annotations

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TAGS = {
    "models": [
        {
            "name": "qwen3:0.6b", "model": "qwen3:0.6b", "modified_at": "2026-11-30T10:00:00Z",
            "size": 522653767, "digest": "7df6b6e09427" + "0" * 52,
            "details": {"parent_model": "", "format": "gguf", "family": "qwen3", "families": ["qwen3"],
                        "parameter_size": "751.63M", "quantization_level": "Q4_K_M"},
        },
        {
            "name": "llama3.2:1b", "model": "llama3.2:1b", "modified_at": "2026-11-29T10:00:00Z",
            "size": 1321098329, "digest": "baf6a787fdff" + "0" * 52,
            "details": {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                        "parameter_size": "1.2B", "quantization_level": "Q8_0"},
        },
    ]
}  # fmt: skip


# What the fake registry can pull: tag -> its layers (digest, size).
LIBRARY = {
    "smollm2:135m": [("sha256:f535f83ec568" + "1" * 52, 270_898_304), ("sha256:fbacade46b4d" + "2" * 52, 68)],
    "qwen3:0.6b": [("sha256:7df6b6e09427" + "0" * 52, 522_653_767)],
    "broken:1b": [("sha256:0123456789ab" + "3" * 52, 1_000_000)],
}
_STEPS = 4  # progress lines per layer


def _pulled(tag: str, layers: list[tuple[str, int]]) -> dict[str, object]:
    family, _, size = tag.partition(":")
    return {
        "name": tag, "model": tag, "modified_at": "2026-12-02T10:00:00Z",
        "size": sum(size for _, size in layers), "digest": layers[0][0].removeprefix("sha256:"),
        "details": {"parent_model": "", "format": "gguf", "family": family, "families": None,
                    "parameter_size": size.upper(), "quantization_level": "Q4_K_M"},
    }  # fmt: skip


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        if self.path == "/fake/library":  # tests only: a new version of a tag in the registry
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            LIBRARY[body["tag"]] = [(str(d), int(n)) for d, n in body["layers"]]
            self._send(200, {"ok": True})
            return
        if self.path != "/api/pull":
            self._send(404, {"error": "not found"})
            return
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        tag = str(body.get("model") or body.get("name") or "")
        tag = tag if ":" in tag else tag + ":latest"
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.end_headers()
        self._line({"status": "pulling manifest"})
        layers = LIBRARY.get(tag)
        if layers is None:
            self._line({"error": "pull model manifest: file does not exist"})
            return
        for digest, size in layers:
            for step in range(1, _STEPS + 1):
                if tag == "broken:1b" and step == 2:
                    return
                self._line({"status": f"pulling {digest[7:19]}", "digest": digest, "total": size,
                            "completed": size * step // _STEPS})  # fmt: skip
        for status in ("verifying sha256 digest", "writing manifest", "success"):
            self._line({"status": status})
        models = TAGS["models"]
        models[:] = [m for m in models if m["name"] != tag] + [_pulled(tag, layers)]

    def _line(self, payload: object) -> None:
        self.wfile.write(json.dumps(payload).encode() + b"\n")
        self.wfile.flush()

    def do_GET(self) -> None:
        if self.path == "/api/version":
            self._send(200, {"version": "0.12.0"})
        elif self.path == "/api/tags":
            self._send(200, TAGS)
        elif self.path == "/":
            body = b"Ollama is running"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self._send(404, {"error": "not found"})

    def _send(self, status: int, payload: object) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write("[GIN] " + format % args + "\n")


def main() -> int:
    if sys.argv[1:] != ["serve"]:
        print("usage: ollama serve", file=sys.stderr)
        return 2
    host, _, port = os.environ.get("OLLAMA_HOST", "127.0.0.1:11434").rpartition(":")
    server = ThreadingHTTPServer((host or "127.0.0.1", int(port)), _Handler)
    print(f"Listening on {host}:{port} (version 0.12.0)", file=sys.stderr, flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
