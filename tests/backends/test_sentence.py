"""The sentence-transformers backend on the embedded all-MiniLM-L6-v2, for real (offline)."""

from __future__ import annotations

import asyncio
import math
import threading

import pytest

from car_inference.backends.base import BackendContext
from car_inference.backends.cache import ModelCache
from car_inference.backends.sentence import SLICE, SLICE_TOKENS, SentenceBackend, _by_tokens
from car_inference.catalog import load_builtin
from car_inference.config import CarConfig
from car_inference.errors import InvalidInput
from car_inference.requests import ClassifyRequest, EmbedRequest, RerankRequest
from car_inference.schema import ModelSchema

from .helpers import cancel_once_started

MINILM = "sentence-transformers/all-minilm-l6-v2"


@pytest.fixture(scope="module")
def model() -> ModelSchema:
    return next(m for m in load_builtin().models if m.id == MINILM)


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> SentenceBackend:
    config = CarConfig(home=tmp_path_factory.mktemp("home"))
    return SentenceBackend(BackendContext(config=config, cache=ModelCache(config.local.cache_mb)))


def _cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


async def test_embeddings_are_normalised_and_batched_in_order(
    backend: SentenceBackend, model: ModelSchema
) -> None:
    texts = [f"sentence number {i}" for i in range(70)]  # more than one batch
    result = await backend.embed(model, EmbedRequest(texts=texts))
    assert result.dimensions == 384 and len(result.embeddings) == 70
    assert all(math.isclose(_cos(v, v), 1.0, rel_tol=1e-4) for v in result.embeddings)
    single = await backend.embed(model, EmbedRequest(texts=[texts[42]]))
    assert _cos(single.embeddings[0], result.embeddings[42]) == pytest.approx(1.0, abs=1e-5)


async def test_a_text_past_the_window_is_said(backend: SentenceBackend, model: ModelSchema) -> None:
    """Texts sharing their first 256 tokens came back as one vector without a word: the cut ones
    are named in ``truncated``, and with ``truncate=False`` the request is refused."""
    head = "word " * 300
    texts = ["short", head + "about cats", head + "about dogs"]
    result = await backend.embed(model, EmbedRequest(texts=texts))
    assert result.truncated == [1, 2] and result.prompt_tokens == 3 + 256 + 256
    with pytest.raises(InvalidInput, match=r"texts\[1\] is 30\d tokens; .* reads at most 256") as info:
        await backend.embed(model, EmbedRequest(texts=texts, truncate=False))
    assert info.value.param == "texts[1]"
    assert (await backend.embed(model, EmbedRequest(texts=["short"], truncate=False))).truncated == []


async def test_similar_texts_are_closer(backend: SentenceBackend, model: ModelSchema) -> None:
    v = (
        await backend.embed(
            model, EmbedRequest(texts=["a cat sat on the mat", "a kitten on a rug", "tax law"])
        )
    ).embeddings
    assert _cos(v[0], v[1]) > _cos(v[0], v[2])


async def test_queries_get_the_instruction_only_when_the_model_declares_one(
    backend: SentenceBackend, model: ModelSchema
) -> None:
    assert SentenceBackend._query_texts(model, ["q"], None) == ["q"]
    qwen = model.model_copy(update={"query_instruction": "Find passages"})
    assert SentenceBackend._query_texts(qwen, ["q"], None) == ["Instruct: Find passages\nQuery: q"]
    assert SentenceBackend._query_texts(qwen, ["q"], "Other") == ["Instruct: Other\nQuery: q"]


async def test_embedding_rerank_puts_the_relevant_document_first(
    backend: SentenceBackend, model: ModelSchema
) -> None:
    docs = ["Bananas are a yellow fruit.", "Paris is the capital and largest city of France.", "Stocks fell."]
    result = await backend.rerank(
        model, RerankRequest(query="What is the capital of France?", documents=docs)
    )
    assert result.method == "embedding-similarity"
    assert result.ranked[0].index == 1
    assert [d.score for d in result.ranked] == sorted((d.score for d in result.ranked), reverse=True)
    assert (await backend.rerank(model, RerankRequest(query="x", documents=[]))).ranked == []
    # A text against itself is at most 1 (float error gave 1.0000001), for any text.
    same = ["Paris", "The cat sat on the mat.", "x", "日本語のテキスト"]
    for text in same:
        [top] = (await backend.rerank(model, RerankRequest(query=text, documents=[text]))).ranked
        assert 0.99 < top.score <= 1.0, (text, top.score)


async def test_embedding_classification(backend: SentenceBackend, model: ModelSchema) -> None:
    result = await backend.classify(
        model,
        ClassifyRequest(
            text="The striker scored twice in the final match", labels=["politics", "sports", "cooking"]
        ),
    )
    assert result.label == "sports" and result.method == "embedding"
    assert sum(r.score for r in result.results) == pytest.approx(1.0)


async def test_cross_encoder_rerank_scores_pairs(backend: SentenceBackend, model: ModelSchema) -> None:
    """A cross-encoder scores (query, document) pairs in one model call. No cross-encoder ships in
    a package, so this one is MiniLM's encoder with a fresh one-logit head (seeded): the scores mean
    nothing, but they must be exactly what sentence-transformers' CrossEncoder computes."""
    import torch
    from sentence_transformers import CrossEncoder

    from car_inference.catalog.locate import local_path
    from car_inference.schema import SentenceSource

    path = str(local_path(model))
    cross = model.model_copy(
        update={
            "id": "test/minilm-cross",
            "capabilities": ["rerank"],
            "source": SentenceSource(path=path, cross_encoder=True),
        }
    )
    docs = ["Paris is in France.", "Bananas are yellow.", "Rome is in Italy."]
    torch.manual_seed(0)
    result = await backend.rerank(cross, RerankRequest(query="capital of France", documents=docs))
    torch.manual_seed(0)
    pairs = [("capital of France", d) for d in docs]
    reference = CrossEncoder(path, device="cpu", num_labels=1).predict(pairs)
    assert result.method == "cross-encoder"
    by_index = {d.index: d.score for d in result.ranked}
    assert [by_index[i] for i in range(3)] == pytest.approx([float(s) for s in reference], abs=1e-5)
    from car_inference.errors import UnsupportedMode

    with pytest.raises(UnsupportedMode, match="scores pairs"):
        await backend.embed(cross, EmbedRequest(texts=["x"]))


async def test_all_torch_work_runs_on_one_thread(
    backend: SentenceBackend, model: ModelSchema, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Overlapping requests encode on TORCH_THREAD alone (torch's OpenMP pools, one per calling
    thread, throttle each other past the CPU count: 10-25 % fewer sentences/s on 2 cores)."""
    from sentence_transformers import SentenceTransformer

    threads: set[str] = set()
    encode = SentenceTransformer.encode

    def recording(self: SentenceTransformer, *args: object, **kwargs: object) -> object:
        threads.add(threading.current_thread().name)
        return encode(self, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(SentenceTransformer, "encode", recording)
    await asyncio.gather(
        *(backend.embed(model, EmbedRequest(texts=[f"text {i}"])) for i in range(3)),
        backend.rerank(model, RerankRequest(query="capital", documents=["Paris", "bananas"])),
        backend.classify(model, ClassifyRequest(text="I love it", labels=["positive", "negative"])),
    )
    assert threads == {"car-torch_0"}


async def test_a_large_request_is_encoded_in_slices_in_order(
    backend: SentenceBackend, model: ModelSchema
) -> None:
    texts = [f"sentence number {i} about {'cats' if i % 2 else 'trains'}" for i in range(2 * SLICE + 10)]
    result = await backend.embed(model, EmbedRequest(texts=texts))
    assert len(result.embeddings) == len(texts)
    for i in (0, SLICE - 1, SLICE, 2 * SLICE + 9):  # each side of each slice's edge
        single = await backend.embed(model, EmbedRequest(texts=[texts[i]]))
        assert _cos(single.embeddings[0], result.embeddings[i]) == pytest.approx(1.0, abs=1e-5)


async def test_a_caller_that_stops_waiting_frees_the_thread_within_a_slice(
    backend: SentenceBackend, model: ModelSchema
) -> None:
    """40,000 texts take most of a minute here; cancelled (a client that went away), the encoding
    stops at its next slice and the model, and the one thread every sentence model shares, are free."""
    backend.warm_up(model)
    texts = [f"text {i} of a very large request" for i in range(40_000)]
    task = asyncio.create_task(backend.embed(model, EmbedRequest(texts=texts)))
    await cancel_once_started(task, backend.ctx.cache.get(f"sentence:{model.id}"), within_s=10)


async def _small_goes_between(backend: SentenceBackend, model: ModelSchema, texts: list[str]) -> None:
    """A one-text embedding sent while ``texts`` are encoded finishes first: it waited for one
    turn of theirs, not for all."""
    backend.warm_up(model)
    big = asyncio.ensure_future(backend.embed(model, EmbedRequest(texts=texts)))
    entry = backend.ctx.cache.get(f"sentence:{model.id}")
    assert entry is not None
    while not entry.lock.locked():
        await asyncio.sleep(0.01)
    small = asyncio.ensure_future(backend.embed(model, EmbedRequest(texts=["a short one"])))
    done, _ = await asyncio.wait({big, small}, return_when=asyncio.FIRST_COMPLETED)
    assert small in done and not big.done(), "the small request waited for the whole large one"
    assert len((await small).embeddings) == 1
    big.cancel()
    with pytest.raises(asyncio.CancelledError):
        await big


async def test_a_small_request_is_served_between_the_slices_of_a_large_one(
    backend: SentenceBackend, model: ModelSchema
) -> None:
    """200 texts of 2,000 characters take 8-10 s; a one-text embedding sent meanwhile waits for
    one slice of them, not for all (2,048 such texts held the thread 96 s)."""
    long_texts = [f"document {i}: " + "words of a long report " * 90 for i in range(200)]
    await _small_goes_between(backend, model, long_texts)


def test_runs_hold_at_most_the_token_budget() -> None:
    items = list("abcdef")
    assert list(_by_tokens(items, [3, 3, 3, 9, 1, 1], budget=6)) == [["a", "b"], ["c"], ["d"], ["e", "f"]]
    assert list(_by_tokens(items[:1], [50], budget=6)) == [["a"]]  # one item over the budget: alone
    assert list(_by_tokens([], [], budget=6)) == []


def _cjk_texts(n: int) -> list[str]:
    """Texts of 128 CJK characters: one token a character (33,000 tokens for 256 of them, 4.5x
    what as many English texts of that length read), so a slice by characters held 7.6 s."""
    return ["".join(chr(0x4E00 + (i * 131 + j * 17) % 2000) for j in range(128)) for i in range(n)]


async def test_turns_are_sized_by_tokens_not_characters(
    backend: SentenceBackend, model: ModelSchema, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each encode turn reads at most SLICE_TOKENS tokens, whatever the script; the tokens the
    request reports are the tokenizer's own count."""
    from sentence_transformers import SentenceTransformer

    backend.warm_up(model)
    tokenizer = backend.ctx.cache.get(f"sentence:{model.id}").instance.tokenizer  # type: ignore[union-attr]
    runs: list[int] = []
    encode = SentenceTransformer.encode

    def recording(self: SentenceTransformer, sentences: list[str], *args: object, **kwargs: object) -> object:
        runs.append(sum(len(i) for i in tokenizer(sentences, truncation=True, max_length=256)["input_ids"]))
        return encode(self, sentences, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(SentenceTransformer, "encode", recording)
    texts = _cjk_texts(64)
    result = await backend.embed(model, EmbedRequest(texts=texts))
    assert result.prompt_tokens == sum(runs) == 64 * 130
    assert len(runs) >= 3 and max(runs) <= SLICE_TOKENS


async def test_a_small_request_is_served_between_the_turns_of_a_large_cjk_one(
    backend: SentenceBackend, model: ModelSchema
) -> None:
    """256 CJK texts of 128 characters: one slice by characters (7.6 s of the thread on two cores);
    a one-text embedding sent meanwhile now waits for one turn of SLICE_TOKENS tokens."""
    await _small_goes_between(backend, model, _cjk_texts(256))
