"""The replies of the fake provider server (``provider_server``) in each wire format: OpenAI (chat,
legacy completions, embeddings, models), Anthropic (messages, token counts) and Gemini (generate,
embed, token counts, models). Mixins of the request handler, whose plumbing (``_send_json``,
``_start_stream``, ``_resolve``...) they call."""

from __future__ import annotations

import base64
import json
import struct
import time
from typing import TYPE_CHECKING, Any

from .provider_wire import (
    Reply,
    ToolCallSpec,
    _anthropic_thinking_problem,
    _collect_text,
    _embedding,
    _finish_reason,
    _hex_id,
    _pieces,
    _signature_for,
    _tokens,
)

if TYPE_CHECKING:
    from .provider_server import FakeProviderServer


class _Plumbing:
    """What the mixins use of the request handler (``provider_server._Handler``), declared for the
    type checker only: at run time the handler itself supplies all of it."""

    if TYPE_CHECKING:
        _body: dict[str, Any]
        _path: str
        _protocol: str
        _gemini_model: str
        _between: float

        @property
        def fake(self) -> FakeProviderServer: ...
        def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None: ...
        def _send_error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None: ...
        def _common_headers(self, protocol: str) -> dict[str, str]: ...
        def _start_stream(self, protocol: str) -> None: ...
        def _write_event(self, data: bytes) -> None: ...
        def _content_event(self, data: bytes) -> None: ...
        def _final_event(self, data: bytes) -> None: ...
        def _end_stream(self) -> None: ...
        @staticmethod
        def _sse(payload: Any, event: str | None = None) -> bytes: ...
        def _resolve(self, reply: Reply) -> tuple[str, list[ToolCallSpec], int, int, int]: ...
        def _model(self, default: str) -> str: ...
        def _gemini_list_models(self, reply: Reply, stream: bool) -> None: ...
        def _gemini_get_model(self, reply: Reply, stream: bool) -> None: ...


class _OpenAIReplies(_Plumbing):
    """OpenAI's chat, legacy completions, embeddings; model lists in every provider's shape."""

    def _openai_usage(self, prompt: int, completion: int, reasoning: int, cached: int) -> dict[str, Any]:
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": reasoning,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def _openai_chat(self, reply: Reply, stream: bool) -> None:
        text, tool_calls, prompt, completion, reasoning = self._resolve(reply)
        finish = _finish_reason(reply, "openai", bool(tool_calls))
        cid = f"chatcmpl-{_hex_id(29)}"
        created = int(time.time())
        model = self._model("gpt-4o-mini")
        call_ids = [tc.id or f"call_{_hex_id(24)}" for tc in tool_calls]
        usage = self._openai_usage(prompt, completion, reasoning, reply.cached_tokens)
        if not stream:
            message: dict[str, Any] = {
                "role": "assistant",
                "content": text or None,
                "refusal": None,
                "annotations": [],
            }
            if reply.thinking is not None:
                message["reasoning_content"] = reply.thinking
            if tool_calls:
                message["tool_calls"] = [
                    {
                        "id": cid_,
                        "type": "function",
                        "function": {"name": tc.name, "arguments": tc.arguments_json()},
                    }
                    for cid_, tc in zip(call_ids, tool_calls, strict=True)
                ]
            payload = {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": usage,
                "service_tier": "default",
                "system_fingerprint": "fp_fake",
            }
            self._send_json(200, payload, self._common_headers("openai"))
            return

        include_usage = bool((self._body.get("stream_options") or {}).get("include_usage"))
        self._between = reply.delay_between_chunks_s

        fields = {  # every chunk's, the usage chunk's too
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
        }

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            payload: dict[str, Any] = {
                **fields,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            }
            if include_usage:
                payload["usage"] = None
            return self._sse(payload)

        self._start_stream("openai")
        self._write_event(chunk({"role": "assistant", "content": "", "refusal": None}))
        for piece in _pieces(reply.thinking or "", reply.chunk_chars):
            self._content_event(chunk({"reasoning_content": piece}))
        for piece in _pieces(text, reply.chunk_chars):
            self._content_event(chunk({"content": piece}))
        for index, (call_id, tc) in enumerate(zip(call_ids, tool_calls, strict=True)):
            head = {
                "index": index,
                "id": call_id,
                "type": "function",
                "function": {"name": tc.name, "arguments": ""},
            }
            self._content_event(chunk({"tool_calls": [head]}))
            for piece in _pieces(tc.arguments_json(), reply.chunk_chars):
                self._content_event(
                    chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
                )
        self._final_event(chunk({}, finish))
        if include_usage:
            final = {**fields, "choices": [], "usage": usage}
            self._final_event(self._sse(final))
        self._final_event(b"data: [DONE]\n\n")
        self._end_stream()

    def _openai_legacy(self, reply: Reply, stream: bool) -> None:
        text, _tools, prompt, completion, _reasoning = self._resolve(reply)
        finish = _finish_reason(reply, "openai_legacy", False)
        cid = f"cmpl-{_hex_id(29)}"
        created = int(time.time())
        model = self._model("gpt-3.5-turbo-instruct")
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

        def obj(choice_text: str, finish_reason: str | None) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [
                    {"text": choice_text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
                ],
            }

        if not stream:
            payload = obj(text, finish)
            payload["usage"] = usage
            self._send_json(200, payload, self._common_headers("openai"))
            return
        self._between = reply.delay_between_chunks_s
        self._start_stream("openai")
        for piece in _pieces(text, reply.chunk_chars):
            self._content_event(self._sse(obj(piece, None)))
        self._final_event(self._sse(obj("", finish)))
        if (self._body.get("stream_options") or {}).get("include_usage"):
            final = obj("", None)
            final["choices"] = []
            final["usage"] = usage
            self._final_event(self._sse(final))
        self._final_event(b"data: [DONE]\n\n")
        self._end_stream()

    def _openai_embeddings(self, reply: Reply, stream: bool) -> None:
        raw_input = self._body.get("input", "")
        if isinstance(raw_input, str):
            inputs: list[str] = [raw_input]
        elif isinstance(raw_input, list) and raw_input and all(isinstance(x, int) for x in raw_input):
            inputs = [json.dumps(raw_input)]  # one pre-tokenised input
        elif isinstance(raw_input, list):
            inputs = [x if isinstance(x, str) else json.dumps(x) for x in raw_input]
        else:
            inputs = [json.dumps(raw_input)]
        dims = self._body.get("dimensions")
        dims = dims if isinstance(dims, int) and dims > 0 else 8
        as_base64 = self._body.get("encoding_format") == "base64"
        data = []
        for index, item in enumerate(inputs):
            vector = _embedding(item, dims)
            embedding: Any = (
                base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode() if as_base64 else vector
            )
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = sum(max(1, _tokens(x)) for x in inputs)
        payload = {
            "object": "list",
            "data": data,
            "model": self._model("text-embedding-3-small"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        self._send_json(200, payload, self._common_headers("openai"))

    def _list_models(self, reply: Reply, stream: bool) -> None:
        models = list(self.fake.served_models)
        if self._protocol == "gemini":  # google-genai's default api_version is "v1": GET /v1/models
            self._gemini_list_models(reply, stream)
            return
        if self._protocol == "anthropic":
            data = [self._anthropic_model(m) for m in models]
            payload = {
                "data": data,
                "has_more": False,
                "first_id": models[0] if models else None,
                "last_id": models[-1] if models else None,
            }
        else:
            payload = {"object": "list", "data": [self._openai_model(m) for m in models]}
        self._send_json(200, payload, self._common_headers(self._protocol))

    def _get_model(self, reply: Reply, stream: bool) -> None:
        if self._protocol == "gemini":
            self._gemini_get_model(reply, stream)
            return
        name = self._path[len("/v1/models/") :]
        if name not in self.fake.served_models:
            self._send_error(404, f"The model '{name}' does not exist (fake provider).")
            return
        payload = self._anthropic_model(name) if self._protocol == "anthropic" else self._openai_model(name)
        self._send_json(200, payload, self._common_headers(self._protocol))

    @staticmethod
    def _openai_model(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 1700000000, "owned_by": "fake-provider"}

    @staticmethod
    def _anthropic_model(name: str) -> dict[str, Any]:
        return {"type": "model", "id": name, "display_name": name, "created_at": "2025-01-01T00:00:00Z"}

    # Anthropic -----------------------------------------------------------------------------------


class _AnthropicReplies(_Plumbing):
    """Anthropic's messages and token counts."""

    def _anthropic_usage(self, reply: Reply, prompt: int, completion: int) -> dict[str, Any]:
        return {
            "input_tokens": prompt,
            "output_tokens": completion,
            "cache_creation_input_tokens": reply.cache_creation_tokens,
            "cache_read_input_tokens": reply.cached_tokens,
            "service_tier": "standard",
        }

    def _anthropic_messages(self, reply: Reply, stream: bool) -> None:
        problem = _anthropic_thinking_problem(self._body)
        if problem is not None:
            self._send_error(400, problem)
            return
        text, tool_calls, prompt, completion, _thinking_tokens = self._resolve(reply)
        stop_reason = _finish_reason(reply, "anthropic", bool(tool_calls))
        mid = f"msg_{_hex_id(24)}"
        model = self._model("claude-sonnet-4-6")
        tool_ids = [tc.id or f"toolu_{_hex_id(24)}" for tc in tool_calls]
        signature = _signature_for(reply.thinking) if reply.thinking is not None else ""
        if not stream:
            content: list[dict[str, Any]] = []
            if reply.thinking is not None:
                content.append({"type": "thinking", "thinking": reply.thinking, "signature": signature})
            if text:
                content.append({"type": "text", "text": text})
            for tid, tc in zip(tool_ids, tool_calls, strict=True):
                content.append(
                    {"type": "tool_use", "id": tid, "name": tc.name, "input": tc.arguments_object()}
                )
            payload = {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": content,
                "stop_reason": stop_reason,
                "stop_sequence": None,
                "usage": self._anthropic_usage(reply, prompt, completion),
            }
            self._send_json(200, payload, self._common_headers("anthropic"))
            return

        self._between = reply.delay_between_chunks_s
        start_usage = self._anthropic_usage(reply, prompt, 1)
        self._start_stream("anthropic")
        start = {
            "type": "message_start",
            "message": {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": start_usage,
            },
        }
        self._write_event(self._sse(start, "message_start"))
        self._write_event(self._sse({"type": "ping"}, "ping"))
        index = 0

        def block_start(block: dict[str, Any]) -> None:
            self._write_event(
                self._sse(
                    {"type": "content_block_start", "index": index, "content_block": block},
                    "content_block_start",
                )
            )

        def delta(d: dict[str, Any]) -> None:
            self._content_event(
                self._sse({"type": "content_block_delta", "index": index, "delta": d}, "content_block_delta")
            )

        def block_stop() -> None:
            self._write_event(self._sse({"type": "content_block_stop", "index": index}, "content_block_stop"))

        if reply.thinking is not None:
            block_start({"type": "thinking", "thinking": "", "signature": ""})
            for piece in _pieces(reply.thinking, reply.chunk_chars):
                delta({"type": "thinking_delta", "thinking": piece})
            self._write_event(
                self._sse(
                    {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": "signature_delta", "signature": signature},
                    },
                    "content_block_delta",
                )
            )
            block_stop()
            index += 1
        if text:
            block_start({"type": "text", "text": ""})
            for piece in _pieces(text, reply.chunk_chars):
                delta({"type": "text_delta", "text": piece})
            block_stop()
            index += 1
        for tid, tc in zip(tool_ids, tool_calls, strict=True):
            block_start({"type": "tool_use", "id": tid, "name": tc.name, "input": {}})
            self._write_event(
                self._sse(
                    {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": "input_json_delta", "partial_json": ""},
                    },
                    "content_block_delta",
                )
            )
            for piece in _pieces(tc.arguments_json(), reply.chunk_chars):
                delta({"type": "input_json_delta", "partial_json": piece})
            block_stop()
            index += 1
        message_delta = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {
                "input_tokens": prompt,
                "output_tokens": completion,
                "cache_creation_input_tokens": reply.cache_creation_tokens,
                "cache_read_input_tokens": reply.cached_tokens,
            },
        }
        self._final_event(self._sse(message_delta, "message_delta"))
        self._final_event(self._sse({"type": "message_stop"}, "message_stop"))
        self._end_stream()

    def _anthropic_count_tokens(self, reply: Reply, stream: bool) -> None:
        tokens = max(1, _tokens(_collect_text(self._body)))
        self._send_json(200, {"input_tokens": tokens}, self._common_headers("anthropic"))

    # Gemini --------------------------------------------------------------------------------------


class _GeminiReplies(_Plumbing):
    """Gemini's generateContent, embedContent, countTokens and models."""

    def _gemini_usage(self, reply: Reply, prompt: int, completion: int, thoughts: int) -> dict[str, Any]:
        candidates = max(0, completion - thoughts)
        usage: dict[str, Any] = {
            "promptTokenCount": prompt,
            "candidatesTokenCount": candidates,
            "totalTokenCount": prompt + candidates + thoughts,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
        }
        if thoughts:
            usage["thoughtsTokenCount"] = thoughts
        if reply.cached_tokens:
            usage["cachedContentTokenCount"] = reply.cached_tokens
        return usage

    def _gemini_generate(self, reply: Reply, stream: bool) -> None:
        text, tool_calls, prompt, completion, thoughts = self._resolve(reply)
        finish = _finish_reason(reply, "gemini", bool(tool_calls))
        model = self._gemini_model
        response_id = _hex_id(20)
        usage = self._gemini_usage(reply, prompt, completion, thoughts)
        signature = _signature_for(reply.thinking) if reply.thinking else None

        def call_part(tc: ToolCallSpec) -> dict[str, Any]:
            call: dict[str, Any] = {"name": tc.name, "args": tc.arguments_object()}
            if tc.id:
                call["id"] = tc.id
            return {"functionCall": call}

        def response(
            parts: list[dict[str, Any]], finish_reason: str | None, usage_md: dict[str, Any]
        ) -> dict:
            candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
            if finish_reason is not None:
                candidate["finishReason"] = finish_reason
            return {
                "candidates": [candidate],
                "usageMetadata": usage_md,
                "modelVersion": model,
                "responseId": response_id,
            }

        if not stream:
            parts: list[dict[str, Any]] = []
            if reply.thinking:
                parts.append({"text": reply.thinking, "thought": True})
            if text:
                parts.append({"text": text})
            parts.extend(call_part(tc) for tc in tool_calls)
            if signature and len(parts) > 1:
                parts[1]["thoughtSignature"] = signature
            self._send_json(200, response(parts, finish, usage))
            return

        self._between = reply.delay_between_chunks_s
        running = {"promptTokenCount": prompt, "totalTokenCount": prompt}
        self._start_stream("gemini")
        for piece in _pieces(reply.thinking or "", reply.chunk_chars):
            self._content_event(self._sse(response([{"text": piece, "thought": True}], None, running)))
        first_answer = True
        for piece in _pieces(text, reply.chunk_chars):
            part: dict[str, Any] = {"text": piece}
            if signature and first_answer:
                part["thoughtSignature"] = signature
            first_answer = False
            self._content_event(self._sse(response([part], None, running)))
        last_parts: list[dict[str, Any]] = []
        for tc in tool_calls:  # Gemini sends function calls whole, never as partial JSON
            part = call_part(tc)
            if signature and first_answer:
                part["thoughtSignature"] = signature
            first_answer = False
            last_parts.append(part)
        self._final_event(self._sse(response(last_parts or [{"text": ""}], finish, usage)))
        self._end_stream()

    def _gemini_embed(self, reply: Reply, stream: bool) -> None:
        body = self._body
        config_dims = body.get("outputDimensionality")

        def values_for(req: dict[str, Any]) -> dict[str, Any]:
            parts = (req.get("content") or {}).get("parts") or []
            text = "".join(p.get("text", "") for p in parts if isinstance(p, dict))
            dims = req.get("outputDimensionality") or config_dims
            dims = dims if isinstance(dims, int) and dims > 0 else 8
            return {"values": _embedding(text, dims)}

        if "requests" in body:
            payload: dict[str, Any] = {"embeddings": [values_for(r) for r in body.get("requests") or []]}
        else:
            payload = {"embedding": values_for(body)}
        self._send_json(200, payload)

    def _gemini_count_tokens(self, reply: Reply, stream: bool) -> None:
        self._send_json(200, {"totalTokens": max(1, _tokens(_collect_text(self._body)))})

    def _gemini_model_obj(self, name: str) -> dict[str, Any]:
        methods = [
            "generateContent",
            "streamGenerateContent",
            "countTokens",
            "embedContent",
            "batchEmbedContents",
        ]
        return {
            "name": f"models/{name}",
            "version": "001",
            "displayName": name,
            "inputTokenLimit": 1048576,
            "outputTokenLimit": 65536,
            "supportedGenerationMethods": methods,
        }

    def _gemini_list_models(self, reply: Reply, stream: bool) -> None:
        self._send_json(200, {"models": [self._gemini_model_obj(m) for m in self.fake.served_models]})

    def _gemini_get_model(self, reply: Reply, stream: bool) -> None:
        name = self._path.rsplit("/", 1)[-1]
        if name not in self.fake.served_models:
            self._send_error(404, f"models/{name} is not found (fake provider).")
            return
        self._send_json(200, self._gemini_model_obj(name))
