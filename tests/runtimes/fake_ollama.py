"""A stand-in for the `ollama` executable: `serve` answers Ollama's native API (version and the
list of pulled models, in Ollama's own JSON shapes) on ``$OLLAMA_HOST``, like ``ollama serve``.
It lets the supervisor's many-model path run for real where Ollama is not installed."""

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


class _Handler(BaseHTTPRequestHandler):
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
