"""Images for local GGUF vision-language models, through llama-cpp-python's multimodal chat handlers.

A GGUF model whose catalog entry names an ``mmproj`` (the vision projector pulled beside it) is
loaded with the chat handler of its family; a request carrying images then runs through
``Llama.create_chat_completion`` with OpenAI-style ``image_url`` parts (every image as a data:
URL, so nothing is fetched inside llama.cpp). Families and handlers (llama-cpp-python 0.3.x):
Qwen2.5-VL, LLaVA 1.5/1.6, Moondream2, nanoLLaVA, MiniCPM-V 2.6, Llama-3-Vision-Alpha and
Obsidian have their own handler; any other family (Gemma 3, SmolVLM, Qwen2-VL, Pixtral...) gets
the generic ``MTMDChatHandler``, which renders the GGUF's own chat template.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from threading import Event
from typing import Any

from ..catalog.locate import hf_cached_file
from ..errors import InferenceFailed, ModelUnavailable, UnsupportedMode
from ..requests import GenerateRequest, ImageBlock, TextBlock, TokenUsage
from ..schema import GgufSource, ModelSchema
from ..stream import Done, StreamEvent, TextDelta
from .image_input import data_url

__all__ = [
    "GENERIC_HANDLER",
    "HANDLERS",
    "chat_handler",
    "check_vision",
    "handler_name",
    "has_images",
    "mmproj_path",
    "run_vision",
    "vision_messages",
]

# Family prefix -> llama_cpp.llama_chat_format class, most specific first.
HANDLERS: tuple[tuple[str, str], ...] = (
    ("qwen2.5-vl", "Qwen25VLChatHandler"),
    ("llava-1.6", "Llava16ChatHandler"),
    ("llava-next", "Llava16ChatHandler"),
    ("llava-1.5", "Llava15ChatHandler"),
    ("llava", "Llava15ChatHandler"),
    ("moondream", "MoondreamChatHandler"),
    ("nanollava", "NanoLlavaChatHandler"),
    ("minicpm-v", "MiniCPMv26ChatHandler"),
    ("llama3-vision-alpha", "Llama3VisionAlphaChatHandler"),
    ("obsidian", "ObsidianChatHandler"),
)
GENERIC_HANDLER = "MTMDChatHandler"


def has_images(request: GenerateRequest) -> bool:
    return any(isinstance(b, ImageBlock) for m in request.chat_messages() for b in m.media())


def mmproj_path(model: ModelSchema) -> Path | None:
    """The vision projector of ``model``; None when the model has none. A projector the catalog
    names that is not on disk is ``ModelUnavailable`` with the pull that fetches it."""
    source = model.source
    if not isinstance(source, GgufSource) or not source.mmproj:
        return None
    found: Path | None = None
    if Path(source.mmproj).expanduser().is_absolute():
        found = Path(source.mmproj).expanduser()
    elif source.path:
        found = Path(source.path).expanduser().parent / source.mmproj
    elif source.hf_repo:
        found = hf_cached_file(source.hf_repo, source.mmproj, source.revision)
    if found is None or not found.is_file():
        raise ModelUnavailable(
            model.id,
            f"its vision projector {source.mmproj} is not on disk; pull it: car models pull {model.id}",
        )
    return found


def handler_name(model: ModelSchema, available: set[str]) -> str:
    """The chat handler class for ``model``'s family among the ``available`` class names."""
    family = (model.family or "").lower()
    wanted = next((cls for prefix, cls in HANDLERS if family.startswith(prefix)), GENERIC_HANDLER)
    if wanted in available:
        return wanted
    if GENERIC_HANDLER in available:
        return GENERIC_HANDLER
    raise UnsupportedMode(
        "image-content-block",
        "gguf",
        f"llama-cpp-python has no chat handler for {model.family or model.id} "
        f"(it has: {', '.join(sorted(available))}); upgrade llama-cpp-python",
    )


def chat_handler(model: ModelSchema, projector: Path) -> Any:
    """A multimodal chat handler for ``model`` over ``projector`` (the mmproj file)."""
    from llama_cpp import llama_chat_format

    available = {n for n in dir(llama_chat_format) if n.endswith("ChatHandler")}
    cls = getattr(llama_chat_format, handler_name(model, available))
    try:
        return cls(clip_model_path=str(projector), verbose=False)
    except (ValueError, RuntimeError) as exc:
        raise InferenceFailed(f"llama.cpp could not load the projector {projector}: {exc}") from exc


def vision_messages(
    request: GenerateRequest, system: str | None, timeout_s: float = 30.0, *, private_ok: bool = True
) -> list[dict[str, Any]]:
    """The request in llama-cpp-python's chat format: text parts and ``image_url`` parts whose
    URL is a data: URL (files read, http(s) URLs fetched here; ``private_ok=False``: not from
    loopback or private addresses, backends/image_input.py). Audio and video are refused."""
    messages = request.chat_messages()  # the request's context comes first as a system message
    out: list[dict[str, Any]] = []
    if system and not any(m.role == "system" for m in messages):
        out.append({"role": "system", "content": system})
    for message in messages:
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
            continue
        parts: list[dict[str, Any]] = []
        for block in message.content:
            if isinstance(block, TextBlock):
                parts.append({"type": "text", "text": block.text})
            elif isinstance(block, ImageBlock):
                url = data_url(block, timeout_s, private_ok=private_ok)  # here, never inside llama.cpp
                parts.append({"type": "image_url", "image_url": {"url": url}})
            else:
                raise UnsupportedMode(
                    f"{block.type}-content-block", "gguf", "local vision models read images only"
                )
        out.append({"role": message.role, "content": parts})
    return out


def check_vision(model: ModelSchema, request: GenerateRequest) -> None:
    """``UnsupportedMode`` for a request a local vision chat cannot run: checked before any image
    is fetched."""
    if mmproj_path(model) is None:
        raise UnsupportedMode(
            "image-content-block",
            "gguf",
            f"{model.id} has no vision projector (mmproj) in the catalog; it reads text only",
        )
    if request.calls_tools():
        raise UnsupportedMode("tool-use", "gguf", "tools and images together are not supported locally")


def run_vision(
    llm: Any, model: ModelSchema, request: GenerateRequest, messages: list[dict[str, Any]], cancelled: Event
) -> Iterator[StreamEvent]:
    """One multimodal chat completion of ``messages`` (``vision_messages``' output, images already
    fetched: a slow URL must not hold the model's turn). Blocking; the caller holds the model's
    lock. The answer comes in one piece: llama-cpp-python reports exact usage only for a whole
    completion. Once ``cancelled`` is set (the caller went away) the answer ends at the next token
    (``_end_when``) instead of running on to ``max_tokens`` with the model held."""
    if getattr(llm, "chat_handler", None) is None:
        check_vision(model, request)  # a model without a projector says so
        raise InferenceFailed(f"{model.id}: loaded without its vision projector")
    params = request.params
    try:
        answer = llm.create_chat_completion(
            messages=messages,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k is not None else 40,
            stop=params.stop or None,
            seed=params.seed,
            repeat_penalty=params.repeat_penalty,
            frequency_penalty=params.frequency_penalty,
            presence_penalty=params.presence_penalty,
            logits_processor=_end_when(cancelled, llm.token_eos()),
        )
    except (ValueError, RuntimeError) as exc:  # the projector or an image that will not load
        raise InferenceFailed(f"{model.id}: llama.cpp could not run the images: {exc}") from exc
    if cancelled.is_set():
        return
    choice = answer["choices"][0]
    text = choice["message"].get("content") or ""
    usage = answer.get("usage") or {}
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    yield TextDelta(text=text)
    yield Done(
        text=text,
        usage=TokenUsage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            context_window=llm.n_ctx(),
            cost_usd=0.0,
        ),
        finish_reason=choice.get("finish_reason") or "stop",
    )


def _end_when(cancelled: Event, eos: int) -> Any:
    """A logits processor that leaves only the end-of-generation token once ``cancelled`` is set.
    The multimodal handlers pass no stopping criteria on to ``create_completion``, and an exception
    raised in llama.cpp's sampler callback is printed and swallowed; a forced end stops the
    completion at its next token, and the model is free."""
    import llama_cpp
    import numpy as np

    def process(_input_ids: Any, scores: Any) -> Any:
        if not cancelled.is_set():
            return scores
        ended = np.full_like(scores, -np.inf)
        ended[eos] = 0.0
        return ended

    return llama_cpp.LogitsProcessorList([process])
