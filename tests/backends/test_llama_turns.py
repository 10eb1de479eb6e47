"""A long llama.cpp generation pauses for another client's work and resumes exactly, on the
embedded SmolLM2 (real llama.cpp, no mocks)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from car_inference.backends.base import BackendContext
from car_inference.backends.cache import ModelCache
from car_inference.backends.llama_turns import restore, save
from car_inference.backends.llamacpp import LLAMA_THREAD, LlamaCppBackend
from car_inference.catalog import load_builtin
from car_inference.config import CarConfig
from car_inference.requests import GenerateParams, GenerateRequest, ResponseFormat
from car_inference.schema import ModelSchema

from .helpers import finish_order

SMOL = "huggingface/smollm2-135m-instruct:q4_1"
STORY = "Write a long story about a dragon who learns to bake bread."


@pytest.fixture(scope="module")
def model() -> ModelSchema:
    return next(m for m in load_builtin().models if m.id == SMOL)


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> LlamaCppBackend:
    config = CarConfig(home=tmp_path_factory.mktemp("home"))
    return LlamaCppBackend(BackendContext(config=config, cache=ModelCache(config.local.cache_mb)))


def _one_turn(backend: LlamaCppBackend, model: ModelSchema) -> Any:
    """Another client's work that needs a turn of the llama.cpp thread: a one-token answer
    (tokenizing no longer takes one: it reads the vocabulary on a worker thread)."""
    return lambda: backend.generate(model, greedy("hi", 1))


def greedy(prompt: str, max_tokens: int, **kw: Any) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, params=GenerateParams(temperature=0, max_tokens=max_tokens, **kw))


def _entry(backend: LlamaCppBackend, model: ModelSchema) -> Any:
    return lambda: backend.ctx.cache.get(f"gguf:{model.id}")


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"repeat_penalty": 1.3},
        {"response_format": ResponseFormat(type="json_object")},
        {"seed": 7},  # greedy draws nothing: a seed (many clients always send one) kept the model
    ],
    ids=["plain", "repeat_penalty", "json", "greedy_seed"],
)
async def test_a_long_generation_pauses_for_another_clients_and_answers_the_same(
    backend: LlamaCppBackend, model: ModelSchema, params: dict[str, Any]
) -> None:
    """Client b's short generation, sent while a's 200 tokens are being generated, ends first (a
    paused for it, on the same model), and both answers are token for token what each gives alone:
    a's context came back exactly as it was, and so did its sampler's state (the repeat penalty's
    recent tokens, the JSON grammar's position)."""
    json = "Give a JSON array of 20 countries with their capitals and populations."
    prompt = json if "response_format" in params else STORY
    long, short = _request(prompt, 200, params), greedy("What is the capital of France?", 8)
    alone_long = await backend.generate(model, long)
    alone_short = await backend.generate(model, short)
    answers: dict[str, str] = {}

    async def run(name: str, request: GenerateRequest) -> None:
        answers[name] = (await backend.generate(model, request)).text

    finished = await finish_order(_entry(backend, model), lambda: run("a", long), lambda: run("b", short))
    assert finished == ["b", "a"]
    assert answers == {"a": alone_long.text, "b": alone_short.text}
    assert alone_long.usage is not None and alone_long.usage.completion_tokens >= 100  # several turns


def _request(prompt: str, max_tokens: int, params: dict[str, Any]) -> GenerateRequest:
    params = dict(params)
    fmt = params.pop("response_format", None)
    return greedy(prompt, max_tokens, **params).model_copy(update={"response_format": fmt})


async def test_a_long_prompt_pauses_between_its_batches(backend: LlamaCppBackend, model: ModelSchema) -> None:
    """A prompt of ~1,800 tokens is read in batches of 512; another client's request goes between
    them, and the answer is the same as alone."""
    prompt = " ".join(f"Item {i}: the market in town {i} sold apples and pears." for i in range(110))
    long = greedy(prompt + "\nWhich item mentions town 7?", 4)
    alone = await backend.generate(model, long)
    assert alone.usage is not None and alone.usage.prompt_tokens > 1500
    answers: dict[str, str] = {}

    async def run_long() -> None:
        answers["a"] = (await backend.generate(model, long)).text

    finished = await finish_order(_entry(backend, model), run_long, _one_turn(backend, model))
    assert finished == ["b", "a"] and answers["a"] == alone.text


async def test_a_seeded_generation_is_one_turn(backend: LlamaCppBackend, model: ModelSchema) -> None:
    """A seed asks for one random sequence, which a new sampler could not continue: a seeded
    generation keeps the model to its end (b waits, as before pausing)."""
    request = GenerateRequest(prompt=STORY, params=GenerateParams(temperature=0.8, seed=7, max_tokens=120))
    finished = await finish_order(
        _entry(backend, model),
        lambda: backend.generate(model, request),
        _one_turn(backend, model),
    )
    assert finished == ["a", "b"]


def test_a_restored_state_gives_the_same_next_logits(backend: LlamaCppBackend, model: ModelSchema) -> None:
    """save / restore, directly: after other tokens filled the context, the restored one predicts
    the next token bit for bit as before."""

    def work() -> None:
        loaded = backend._entry(model).instance
        llm = loaded.llm
        tokens = loaded.tokenize("The capital of France is", special=False)
        llm.reset()
        llm.eval(tokens)
        before = np.array(loaded.last_logits(tokens))
        state = save(llm)
        llm.reset()
        llm.eval(loaded.tokenize("Something else entirely, and longer than the first prompt.", special=False))
        restore(llm, state)
        assert llm.n_tokens == len(tokens) and list(llm.input_ids[: llm.n_tokens]) == tokens
        assert np.array_equal(np.array(loaded.last_logits(tokens)), before)

    LLAMA_THREAD.submit(work).result()
