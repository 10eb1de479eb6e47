from __future__ import annotations

from car_inference.requests import GenerateRequest
from car_inference.routing.decision import RoutingDecision, RoutingStrategy, ScoredCandidate

from .helpers import make_router, registry, remote


def test_candidates_are_built_once_on_first_read() -> None:
    reg = registry(remote("a/x", quality=0.9), remote("b/y", quality=0.5))
    decision = make_router().decide(GenerateRequest(prompt="hello"), reg)
    first = decision.candidates
    assert first is decision.candidates  # cached
    assert all(isinstance(c, ScoredCandidate) for c in first)
    assert [c.model_id for c in first] == ["a/x", "b/y"]
    assert first[0].score >= first[1].score


def test_a_decision_validates_and_round_trips() -> None:
    reg = registry(remote("a/x", quality=0.9))
    decision = make_router().decide(GenerateRequest(prompt="hello"), reg)
    data = decision.model_dump(exclude={"candidates"})
    again = RoutingDecision.model_validate(data)
    assert again.model_id == "a/x" and again.strategy is RoutingStrategy.ADAPTIVE
    assert again.candidates == []  # candidates come from the router, not from input
    assert decision.model_dump()["candidates"][0]["model_id"] == "a/x"


def test_each_candidate_says_why_it_won_or_lost() -> None:
    reg = registry(remote("a/x", quality=0.9, price=(1, 1)), remote("b/y", quality=0.5, price=(5, 5)))
    decision = make_router().decide(GenerateRequest(prompt="hello"), reg)
    won, lost = decision.candidates
    assert won.model_id == "a/x" and won.notes == "chosen: highest score"
    assert lost.notes.startswith("lost: quality 0.50 < 0.90") and "5.0x cost" in lost.notes
    assert lost.quality_sd > 0 and lost.expected_output_tokens == 256
