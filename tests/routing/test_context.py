from __future__ import annotations

from car_inference.requests import GenerateRequest, Message
from car_inference.routing.context import PREFIX_CHARS, PREFIX_REPEATS, TemplateIndex
from car_inference.routing.store import stat_keys

FEW_SHOT = "Answer like the examples. Q: 2+2? A: 4. Q: capital of Italy? A: Rome. " * 3


def test_a_prefix_becomes_a_template_once_it_repeats() -> None:
    index = TemplateIndex()
    first = GenerateRequest(prompt=FEW_SHOT + "Q: 3+3?")
    second = GenerateRequest(prompt=FEW_SHOT + "Q: capital of Peru?")
    assert index.signature(first, first.prompt) is None  # seen once: not yet a template
    sig = index.signature(second, second.prompt)
    assert PREFIX_REPEATS == 2 and sig is not None and sig.startswith("p")
    assert index.signature(first, first.prompt) == sig  # the question does not matter


def test_a_prefix_whose_template_has_learned_rows_is_one_at_once() -> None:
    """A new process (a restart, another replica, `car route --explain`) routed a template's first
    requests by the family rules: the rows learned under it were out of reach."""
    first = GenerateRequest(prompt=FEW_SHOT + "Q: 3+3?")
    sig = _recognised(first)
    asked: list[str] = []

    def learned(signature: str) -> bool:
        asked.append(signature)
        return signature == sig

    fresh = TemplateIndex()
    assert fresh.signature(first, first.prompt, learned) == sig
    assert asked == [sig] and fresh.signature(first, first.prompt) == sig, "recognised from now on"
    unknown = TemplateIndex()
    assert unknown.signature(first, first.prompt, lambda s: False) is None


def _recognised(request: GenerateRequest) -> str:
    index = TemplateIndex()
    other = GenerateRequest(prompt=FEW_SHOT + "Q: capital of Peru?")
    index.signature(request, request.prompt)
    sig = index.signature(other, other.prompt)
    assert sig is not None
    return sig


def test_the_same_question_asked_again_is_not_a_template() -> None:
    index = TemplateIndex()
    question = GenerateRequest(prompt=FEW_SHOT + "Q: 3+3?")
    for _ in range(3):  # a repeat shares its head with itself: still one text, not a task
        assert index.signature(question, question.prompt) is None
    other = GenerateRequest(prompt=FEW_SHOT + "Q: 4+4?")
    sig = index.signature(other, other.prompt)
    assert sig is not None and index.signature(question, question.prompt) == sig


def test_short_or_unique_heads_are_not_templates() -> None:
    index = TemplateIndex()
    short = GenerateRequest(prompt="hi")
    assert index.signature(short, "hi") is None and index.signature(short, "hi") is None
    for i in range(3):  # questions that differ within the first PREFIX_CHARS characters
        text = f"Question {i}: " + "x" * PREFIX_CHARS
        assert index.signature(GenerateRequest(prompt=text), text) is None


def test_the_system_prompt_leads_the_signature() -> None:
    index = TemplateIndex()
    system = "You are the support assistant of ACME. Answer politely and cite the manual section. " * 2
    asks = [
        GenerateRequest(messages=[Message(role="system", content=system), Message(role="user", content=q)])
        for q in ("Where is my order?", "How do I reset it?")
    ]
    assert index.signature(asks[0], "Where is my order?") is None
    assert index.signature(asks[1], "How do I reset it?") is not None
    as_context = GenerateRequest(prompt="Reset?", context=system)
    assert index.signature(as_context, "Reset?") == index.signature(asks[1], "How do I reset it?")


def test_the_table_stays_bounded() -> None:
    index = TemplateIndex(max_prefixes=10)
    for i in range(100):
        text = f"{i:04d} " + "y" * PREFIX_CHARS
        index.signature(GenerateRequest(prompt=text), text)
    assert len(index._seen) <= 10


def test_a_template_is_learned_alone_and_a_cluster_under_its_family() -> None:
    assert stat_keys("math", "latin-mc/pabc123") == ("template|pabc123",)
    assert stat_keys("math", "latin-mc") == ("math", "math|latin-mc")
    assert stat_keys("math", None) == ("math",)
