"""The HTTP server (`car serve`): an OpenAI-compatible API, JSON-RPC 2.0 over WebSocket, and
Prometheus metrics, all in front of one shared ``InferenceEngine``. Needs the ``server`` extra
(``pip install 'car-inference[server]'``). The wire protocol is documented in docs/protocol.md."""

from .app import create_app
from .run import BindRefused, PortInUse, ServerThread, bind, check_bind, is_loopback, serve

__all__ = [
    "BindRefused",
    "PortInUse",
    "ServerThread",
    "bind",
    "check_bind",
    "create_app",
    "is_loopback",
    "serve",
]
