"""The fake provider's Gemini Interactions API, for video (Gemini Omni Flash).

Routed from ``provider_media.route``. Wire shapes follow google-genai's ``Interaction`` type:

* ``POST /{version}/interactions`` (``x-goog-api-key``; JSON model, input, response_modalities,
  generation_config, background) takes a queued ``Reply``/``Fault`` like any generation and
  answers the interaction ``in_progress`` (``completed`` at once without ``background``). An input
  with no text, or ``response_modalities`` without ``video``, is Gemini's 400 INVALID_ARGUMENT.
* ``GET /{version}/interactions/{id}`` advances it: after ``MediaState.video_polls`` reads it is
  ``completed`` with a ``model_output`` step holding ``MediaState.video_content`` (base64
  ``data``, or a ``uri`` this server serves under ``/files/`` when ``MediaState.video_as_uri``),
  or ``failed`` with ``errors`` when ``MediaState.video_failure`` is set. An interaction read with
  another key than the one that made it is a 404, as another account's would be.
"""

from __future__ import annotations

import base64
import re
import uuid
from typing import Any

__all__ = ["route"]

_CREATE = re.compile(r"^/(?:v1beta|v1alpha|v1)/interactions$")
_GET = re.compile(r"^/(?:v1beta|v1alpha|v1)/interactions/([A-Za-z0-9_\-]+)$")


def route(handler: Any, method: str, path: str) -> tuple[Any, bool, bool] | None:
    if method == "POST" and _CREATE.match(path):
        return (lambda reply, stream: _create(handler)), True, False
    if method == "GET" and (match := _GET.match(path)):
        return (lambda reply, stream: _get(handler, match.group(1))), False, False
    return None


def _invalid(handler: Any, message: str) -> None:
    handler._send_json(400, {"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}})


def _create(handler: Any) -> None:
    body = handler._body
    steps = body.get("input") or []
    texts = [
        c.get("text")
        for step in steps
        if isinstance(step, dict)
        for c in step.get("content") or []
        if isinstance(c, dict) and c.get("type") == "text"
    ]
    if not any(isinstance(t, str) and t.strip() for t in texts):
        _invalid(handler, "* CreateInteractionRequest.input: a text prompt is required")
        return
    if "video" not in (body.get("response_modalities") or []):
        _invalid(handler, "* gemini-omni models answer video: response_modalities must include video")
        return
    interaction = {
        "id": f"v1_{uuid.uuid4().hex[:24]}",
        "status": "in_progress",
        "model": body.get("model"),
        "created": "2026-12-02T10:00:00Z",
        "_key": handler.headers.get("x-goog-api-key"),
        "_polls": 0,
        "_input": steps,
    }
    handler.fake.media.interactions[interaction["id"]] = interaction
    if not body.get("background"):
        _advance(handler, interaction, done=True)
    handler._send_json(200, _public(interaction))


def _get(handler: Any, interaction_id: str) -> None:
    interaction = handler.fake.media.interactions.get(interaction_id)
    if interaction is None or interaction["_key"] != handler.headers.get("x-goog-api-key"):
        message = f"Interaction {interaction_id} was not found."
        handler._send_json(404, {"error": {"code": 404, "message": message, "status": "NOT_FOUND"}})
        return
    if interaction["status"] == "in_progress":
        interaction["_polls"] += 1
        _advance(handler, interaction, done=interaction["_polls"] >= handler.fake.media.video_polls)
    handler._send_json(200, _public(interaction))


def _advance(handler: Any, interaction: dict[str, Any], done: bool) -> None:
    state = handler.fake.media
    if not done:
        return
    if state.video_failure:
        interaction["status"] = "failed"
        interaction["errors"] = [{"code": "SAFETY", "message": state.video_failure}]
        return
    video: dict[str, Any] = {"type": "video", "mime_type": "video/mp4"}
    if state.video_as_uri:
        name = f"{interaction['id']}.mp4"
        state.files[name] = state.video_content
        video["uri"] = f"http://{handler.headers.get('Host')}/files/{name}"
    else:
        video["data"] = base64.b64encode(state.video_content).decode()
    interaction["status"] = "completed"
    interaction["steps"] = [
        *({"type": "user_input", "content": step.get("content")} for step in interaction["_input"]),
        {"type": "model_output", "content": [video]},
    ]


def _public(interaction: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in interaction.items() if not k.startswith("_")}
