"""The engine's PromptMeter on the real embedded models: windows from the backends, exact counts
from the GGUF's own tokenizer, and routing decisions that use them."""

from __future__ import annotations

from pathlib import Path

import pytest

from car_inference.engine import InferenceEngine
from car_inference.engine.meter import EngineMeter
from car_inference.requests import GenerateParams, GenerateRequest
from fakes import FakeProviderServer, Reply

from .conftest import RemoteEngine

SMOLLM = "huggingface/smollm2-135m-instruct:q4_1"


@pytest.fixture
def small_ctx_engine(isolated_home: Path) -> InferenceEngine:
    (isolated_home / "config.toml").write_text("[local]\nn_ctx = 1024\n")
    return InferenceEngine()


def test_window_comes_from_the_backend(small_ctx_engine: InferenceEngine) -> None:
    meter = EngineMeter(small_ctx_engine)
    smollm = small_ctx_engine.registry.resolve(SMOLLM)
    assert smollm.context_length > 1024
    assert meter.window(smollm) == 1024  # loaded with local.n_ctx, capped by the model's own
    hosted = small_ctx_engine.registry.resolve("openai/gpt-4o-mini")
    assert meter.window(hosted) == hosted.context_length
    assert meter.count(hosted, GenerateRequest(prompt="hi")) is None  # no tokenizer of its own


async def test_count_is_the_rendered_prompt_on_its_tokenizer(small_ctx_engine: InferenceEngine) -> None:
    meter = EngineMeter(small_ctx_engine)
    smollm = small_ctx_engine.registry.resolve(SMOLLM)
    params = GenerateParams(max_tokens=4, temperature=0)
    request = GenerateRequest(prompt="Name three colours.", params=params)
    counted = meter.count(smollm, request)
    assert small_ctx_engine.cache.keys() == []  # counted on a vocabulary-only load, no weights
    result = await small_ctx_engine.generate(request.model_copy(update={"model": SMOLLM}))
    assert result.usage is not None and counted == result.usage.prompt_tokens
    assert meter.count(smollm, request) == counted  # now on the loaded model: same count


async def test_explicit_local_model_decision_uses_exact_count(small_ctx_engine: InferenceEngine) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 80  # ~800 tokens: inside the error band
    request = GenerateRequest(model=SMOLLM, prompt=text, params=GenerateParams(max_tokens=64))
    decision = small_ctx_engine.route(request)
    smollm = small_ctx_engine.registry.resolve(SMOLLM)
    exact = EngineMeter(small_ctx_engine).count(smollm, request)
    assert decision.context_length == 1024
    assert decision.estimated_input_tokens == exact
    assert decision.needs_compaction is (exact > 1024)
    # The long request is routed off the event loop and still answers.
    result = await small_ctx_engine.generate(request)
    assert result.model_used == SMOLLM


def test_routing_imports_no_sdk(isolated_home: Path) -> None:
    """Windows and counts come from in-process backends only: the first decision must not import
    the hosted providers' SDKs (over a second of start-up for `car generate`)."""
    import subprocess
    import sys

    code = (
        "import sys; from car_inference.engine import InferenceEngine;"
        "from car_inference.requests import GenerateRequest;"
        "InferenceEngine().route(GenerateRequest(prompt='hi'));"
        "print(sorted(m for m in ('openai', 'anthropic', 'google.genai') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


async def test_cache_reads_and_writes_are_priced_apart(
    remote_engine: RemoteEngine, fake: FakeProviderServer
) -> None:
    """Anthropic bills the prompt tokens it writes to its cache at 1.25x input and those it reads
    at a tenth: both were charged at the plain input price (a cache write undercounted spend)."""
    cost = {
        "input_per_mtok": 4.0,
        "output_per_mtok": 20.0,
        "cached_input_per_mtok": 0.4,
        "cache_write_per_mtok": 5.0,
    }
    engine = remote_engine({"claude": {"kind": "anthropic", "provider": "anthropic", "cost": cost}})
    fake.queue(
        Reply(
            text="ok",
            prompt_tokens=1000,
            completion_tokens=100,
            cached_tokens=2000,
            cache_creation_tokens=3000,
        )
    )
    result = await engine.generate(GenerateRequest(model="anthropic/claude", prompt="hi"))
    usage = result.usage
    assert usage is not None and usage.prompt_tokens == 6000
    assert (usage.cached_prompt_tokens, usage.cache_write_prompt_tokens) == (2000, 3000)
    # 1,000 fresh at $4, 2,000 read at $0.40, 3,000 written at $5, 100 out at $20 (per million)
    assert usage.cost_usd == pytest.approx((1000 * 4.0 + 2000 * 0.4 + 3000 * 5.0 + 100 * 20.0) / 1e6)
