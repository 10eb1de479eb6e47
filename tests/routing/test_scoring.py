"""The scoring loop's expected answer lengths (``routing.scoring``); the utility formula and the
beliefs it samples are checked through the router in ``test_router.py``."""

from __future__ import annotations

import pytest

from car_inference.config import RoutingSettings
from car_inference.requests import GenerateParams, GenerateRequest
from car_inference.routing.estimate import ALL, StatsRow
from car_inference.routing.pool import TYPICAL_OUTPUT_TOKENS
from car_inference.routing.scoring import OUTPUT_PRIOR_CALLS, context_length, expected_output_tokens

from .helpers import make_router, registry, remote

QUESTION = GenerateRequest(prompt="Which planet is largest?\nA. Mars\nB. Jupiter\nC. Venus\nAnswer:")


def test_expected_output_tokens_shrinks_toward_the_prior_and_caps() -> None:
    assert expected_output_tokens(0, 0, 1024) == TYPICAL_OUTPUT_TOKENS  # nothing counted: unknown
    assert expected_output_tokens(0, 0, 100) == 100  # never past max_tokens
    assert expected_output_tokens(0, 0, 1024, prior=12.0) == 12.0
    # two answers of 30 tokens, shrunk toward a context length of 12
    assert expected_output_tokens(60, 2, 1024, prior=12.0) == pytest.approx(
        (OUTPUT_PRIOR_CALLS * 12 + 60) / (OUTPUT_PRIOR_CALLS + 2)
    )
    assert expected_output_tokens(10_000, 2, 1024, prior=12.0) == 1024


def test_context_length_is_the_narrowest_level_with_counted_answers() -> None:
    family = {ALL: StatsRow(calls=50, success_count=50, total_output_tokens=50 * 200)}
    cluster = {ALL: StatsRow(calls=40, success_count=40, total_output_tokens=40 * 12)}
    k, typical = OUTPUT_PRIOR_CALLS, TYPICAL_OUTPUT_TOKENS
    level, length = context_length([family, cluster], 1024)
    assert level == 1 and length == pytest.approx((k * typical + 480) / (k + 40))
    level, length = context_length([family, {}], 1024)  # the cluster has counted nothing yet
    assert level == 0 and length == pytest.approx((k * typical + 10_000) / (k + 50))
    assert context_length([{}, {}], 1024) == (-1, None)


def _answer(router, reg, model_id: str, tokens: int, n: int) -> None:  # type: ignore[no-untyped-def]
    for i in range(n):
        d = router.decide(QUESTION, reg)
        router.tracker.record_attempt(
            model_id, family=d.task_family, cluster=d.prompt_cluster, trace_id=f"{model_id}{i}",
            started_at=0.0, success=True, score=0.7, output_tokens=tokens, latency_ms=100.0,
        )  # fmt: skip


def test_a_model_new_to_a_context_is_priced_at_the_contexts_answer_length() -> None:
    """Multiple-choice answers are a few tokens whoever gives them: a model that never answered
    here is priced at the context's length, not at the typical 256 tokens (which made it look 20x
    dearer and, under cost-aware weights, never tried)."""
    reg = registry(remote("a/tried", quality=0.7), remote("b/new", quality=0.7))
    router = make_router(RoutingSettings(exploration=0))
    _answer(router, reg, "a/tried", 12, 30)
    by_id = {c.model_id: c for c in router.decide(QUESTION, reg).candidates}
    context = (OUTPUT_PRIOR_CALLS * TYPICAL_OUTPUT_TOKENS + 30 * 12) / (OUTPUT_PRIOR_CALLS + 30)
    assert by_id["b/new"].expected_output_tokens == pytest.approx(context)  # 47, not 256
    tried = (OUTPUT_PRIOR_CALLS * context + 30 * 12) / (OUTPUT_PRIOR_CALLS + 30)
    assert by_id["a/tried"].expected_output_tokens == pytest.approx(tried)
    assert by_id["b/new"].cost_usd < 3 * by_id["a/tried"].cost_usd  # not 15x


def test_a_model_s_own_answers_move_its_length_away_from_the_context_s() -> None:
    reg = registry(remote("a/terse", quality=0.7), remote("b/verbose", quality=0.7))
    router = make_router(RoutingSettings(exploration=0))
    _answer(router, reg, "a/terse", 10, 40)
    _answer(router, reg, "b/verbose", 200, 40)
    request = QUESTION.model_copy(update={"params": GenerateParams(max_tokens=150)})
    by_id = {c.model_id: c for c in router.decide(request, reg).candidates}
    assert by_id["a/terse"].expected_output_tokens < 30
    assert by_id["b/verbose"].expected_output_tokens == 150  # capped at max_tokens
