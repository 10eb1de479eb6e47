"""Tokenize, embed, rerank and classify through the engine, on the embedded models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from car_inference.engine import InferenceEngine
from car_inference.errors import InvalidInput, ModelNotFound, ModelUnavailable, UnsupportedMode
from car_inference.requests import (
    ClassifyRequest,
    EmbedRequest,
    GenerateParams,
    GenerateRequest,
    RerankRequest,
)

from .conftest import RemoteEngine

SMOL = "huggingface/smollm2-135m-instruct:q4_1"


def greedy(prompt: str, max_tokens: int = 40, **kw: object) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, params=GenerateParams(temperature=0, max_tokens=max_tokens), **kw)  # type: ignore[arg-type]


async def test_tokenize_round_trip_and_remote_models_refuse(local_engine: InferenceEngine) -> None:
    tokens = (await local_engine.tokenize("smollm2", "The quick brown fox")).tokens
    assert (await local_engine.detokenize("smollm2", tokens)).text == "The quick brown fox"
    # The seed's test: a known remote model -> UnsupportedMode("tokenize/detokenize", "remote").
    remote_id = next(m.id for m in local_engine.list_models() if not m.is_local)
    for call in (local_engine.tokenize(remote_id, "hello"), local_engine.detokenize(remote_id, [1, 2, 3])):
        with pytest.raises(UnsupportedMode) as info:
            await call
        assert (info.value.mode, info.value.backend) == ("tokenize/detokenize", "remote")
    with pytest.raises(UnsupportedMode):
        await local_engine.tokenize("sentence-transformers/all-minilm-l6-v2", "x")


async def test_embed_rerank_classify_defaults(local_engine: InferenceEngine) -> None:
    embedded = await local_engine.embed(EmbedRequest(texts=["hello", "world"]))
    assert embedded.model_used == "sentence-transformers/all-minilm-l6-v2" and embedded.dimensions == 384

    ranked = await local_engine.rerank(
        RerankRequest(
            query="Which city is the capital of France?",
            documents=["The Amazon is a river.", "Paris is the capital of France.", "Cats purr."],
            top_n=2,
        )
    )
    assert ranked.ranked[0].index == 1 and len(ranked.ranked) == 2 and ranked.method == "embedding-similarity"
    assert (await local_engine.rerank(RerankRequest(query="q", documents=[]))).ranked == []
    # An empty document scores 0 unseen (MiniLM ranked "" first); copies of one document tie
    # exactly and keep input order (their scores differed in the last digits, the later first).
    query = "capital of France?"
    docs = ["Bananas are yellow.", "", "Paris is in France.", "Bananas are yellow.", ""]
    odd = await local_engine.rerank(RerankRequest(query=query, documents=docs))
    order = [d.index for d in odd.ranked]
    assert order[0] == 2 and order[-2:] == [1, 4] and order.index(0) + 1 == order.index(3)
    scores = {d.index: d.score for d in odd.ranked}
    assert scores[1] == scores[4] == 0.0 and scores[0] == scores[3] > 0.0
    empty = await local_engine.rerank(RerankRequest(query=query, documents=["", ""], top_n=1))
    assert [(d.index, d.score) for d in empty.ranked] == [(0, 0.0)]

    label = await local_engine.classify(
        ClassifyRequest(text="I won the tennis final", labels=["sports", "finance"])
    )
    assert label.label == "sports" and label.method == "embedding"
    llm = await local_engine.classify(
        ClassifyRequest(
            text="This film was wonderful, I loved it", labels=["positive", "negative"], method="likelihood"
        )
    )
    assert llm.method == "likelihood" and llm.model_used == SMOL and llm.label == "positive"


async def test_speech_and_media_say_what_is_missing(local_engine: InferenceEngine, tmp_path: Path) -> None:
    from car_inference.requests import GenerateImageRequest, TranscribeRequest

    # Speech runs on the embedded models (tests/backends/test_piper.py, test_whisper.py); bad input
    # is the caller's to fix, and a capability with no model says so.
    with pytest.raises(InvalidInput, match="audio file not found"):
        await local_engine.transcribe(TranscribeRequest(audio_path=str(tmp_path / "none.wav")))
    # A missing file is said before a model that cannot run here (no key): the typo is the news.
    missing = TranscribeRequest(audio_path=str(tmp_path / "none.wav"), model="openai/gpt-transcribe")
    with pytest.raises(InvalidInput, match="audio file not found"):
        await local_engine.transcribe(missing)
    with pytest.raises(ModelUnavailable, match="image_generation"):
        await local_engine.generate_image(GenerateImageRequest(prompt="a cat"))


async def test_wrong_types_and_broken_text_are_invalid_input(local_engine: InferenceEngine) -> None:
    """A string where a request goes, a token list of strings, text with an unpaired surrogate:
    each was an AttributeError, TypeError or UnicodeEncodeError from deep inside."""
    calls = [
        (local_engine.generate("hello"), "generate takes a GenerateRequest, not str"),  # type: ignore[arg-type]
        (local_engine.embed(None), "embed takes an EmbedRequest, not NoneType"),  # type: ignore[arg-type]
        (local_engine.rerank({"query": "q"}), "rerank takes a RerankRequest, not dict"),  # type: ignore[arg-type]
        (local_engine.tokenize("smollm2", 5), "tokenize's text takes a str, not int"),  # type: ignore[arg-type]
        (local_engine.tokenize(5, "x"), "tokenize's model takes a str, not int"),  # type: ignore[arg-type]
        (local_engine.detokenize(None, [1]), "detokenize's model takes a str"),  # type: ignore[arg-type]
        (local_engine.tokenize("smollm2", "a \ud800 b"), r"unpaired surrogate \(\\ud800\)"),
        (local_engine.detokenize("smollm2", ["a"]), "list of token ids"),  # type: ignore[list-item]
    ]
    for call, says in calls:
        with pytest.raises(InvalidInput, match=says):
            await call
    for labels, says in ((["yes", "yes"], "the label 'yes' twice"), (["yes", " "], "an empty label")):
        with pytest.raises(InvalidInput, match=says):
            await local_engine.classify(ClassifyRequest(text="Is it?", labels=labels))
    with pytest.raises(InvalidInput, match="resolve takes a str, not NoneType"):
        local_engine.resolve(None)  # type: ignore[arg-type]
    engine: Any = local_engine  # the calls below are typed wrong on purpose
    misuse: list[tuple[Any, str]] = [  # each was a bare AttributeError, ValueError or TypeError
        (lambda: engine.resolve(""), "the model name is empty"),
        (lambda: engine.forget_model(None), "forget_model takes a str, not NoneType"),
        (lambda: engine.default_model("nonsense"), "'nonsense' is not a capability"),
        (lambda: engine.register_model({"id": "x"}), "register_model takes a ModelSchema, not dict"),
        (lambda: engine.import_profiles(None), "import_profiles takes a list, not NoneType"),
        (lambda: engine.import_profiles([{"x": 1}]), "import_profiles: "),
        (lambda: engine.prune_traces("30"), "older_than_days must be a number >= 0, not '30'"),
    ]
    for blocking, says in misuse:
        with pytest.raises(InvalidInput, match=says):
            blocking()
    with pytest.raises(InvalidInput, match="route takes a GenerateRequest"):
        local_engine.route("hello")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="stream takes a GenerateRequest"):
        async for _ in local_engine.stream("hello"):  # type: ignore[arg-type]
            pass


async def test_a_hosted_embedding_model_reranks_by_similarity(remote_engine: RemoteEngine) -> None:
    """With a hosted embedder as [defaults] embed, every rerank without a model failed ("mode
    embed not implemented on backend openai: ... does not implement rerank"), though the docs
    say the default embedding model ranks by similarity. And no documents answered 200 for a
    model that does not exist."""
    engine = remote_engine(
        {"emb": {"provider": "x", "capabilities": ["embed"]}}, config='[defaults]\nembed = "x/emb"\n'
    )
    docs = ["Paris is the capital of France.", "Bananas are yellow.", "Rome is in Italy."]
    ranked = await engine.rerank(RerankRequest(query="capital of France?", documents=docs))
    assert ranked.model_used == "x/emb" and ranked.method == "embedding-similarity"
    query = (
        await engine.embed(EmbedRequest(texts=["capital of France?"], model="x/emb", is_query=True))
    ).embeddings
    vectors = (await engine.embed(EmbedRequest(texts=docs, model="x/emb"))).embeddings
    expected = sorted(
        ((sum(a * b for a, b in zip(query[0], v, strict=True)), i) for i, v in enumerate(vectors)),
        reverse=True,
    )
    assert [(d.index, d.score) for d in ranked.ranked] == [(i, pytest.approx(s)) for s, i in expected]
    blank = await engine.rerank(RerankRequest(query="capital of France?", documents=["", docs[0]]))
    assert {d.index: d.score for d in blank.ranked}[0] == 0.0  # an empty document matches nothing
    assert (await engine.rerank(RerankRequest(query="q", documents=[]))).model_used == "x/emb"
    with pytest.raises(ModelNotFound, match="x/embb"):
        await engine.rerank(RerankRequest(query="q", documents=[], model="x/embb"))
    engine.close()
