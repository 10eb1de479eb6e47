"""Secrets stay out of the server's log: the access log at info level and the WebSocket handshake
at debug level, from a real server with uvicorn's own logging."""

from __future__ import annotations

import logging

import httpx
from websockets.asyncio.client import connect

from car_inference.config import ServerSettings
from car_inference.engine import InferenceEngine
from car_inference.server import ServerThread, create_app
from car_inference.server.logs import MASK, REQUEST_LOGGERS, redact

KEY = "sk-car-server-key-0123456789"


def test_redact_masks_keys_tokens_and_key_like_query_values() -> None:
    assert redact(f"GET /v1/models?api_key={KEY}&x=1", []) == f"GET /v1/models?api_key={MASK}&x=1"
    assert redact("GET /ws?token=abc#f") == f"GET /ws?token={MASK}#f"
    assert redact("authorization: Bearer abc.def") == f"authorization: Bearer {MASK}"
    assert redact(f"x {KEY} y", [KEY]) == f"x {MASK} y"
    assert redact("GET /v1/models?limit=3") == "GET /v1/models?limit=3"
    # A short key is masked where it stands whole, not inside words ("St***rted server pro***ess").
    assert redact("Started server process; key a used", ["a"]) == f"Started server process; key {MASK} used"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def test_the_server_key_never_reaches_the_log(server_engine: InferenceEngine) -> None:
    app = create_app(server_engine, ServerSettings(api_keys=[KEY]))
    server = ServerThread(app, log_level="debug")
    # After uvicorn configured its loggers (which drops the handlers they had).
    records = _Records()
    loggers = [logging.getLogger(name) for name in REQUEST_LOGGERS]
    for logger in loggers:
        logger.addHandler(records)
    try:
        with server:
            auth = {"Authorization": f"Bearer {KEY}"}
            # A client that puts the key in the query (as some WebSocket clients must) and the header.
            assert httpx.get(f"{server.url}/v1/models?api_key={KEY}", headers=auth).status_code == 200
            async with connect(f"{server.ws_url}?api_key={KEY}", additional_headers=auth) as ws:
                await ws.send('{"jsonrpc": "2.0", "id": 1, "method": "health"}')
                await ws.recv()
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    text = "\n".join(records.lines)
    assert "GET /v1/models?api_key=***" in text  # the access log (info)
    assert "authorization: Bearer ***" in text  # the handshake's headers (debug)
    assert KEY not in text
