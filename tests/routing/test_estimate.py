from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from car_inference.routing.estimate import (
    ALL,
    DIFFICULTY_PSEUDO_CALLS,
    DRIFT_VAR,
    FAMILY_BASE_PSEUDO_CALLS,
    TEMPLATE_SHIFT_MIN_AROUND,
    TEMPLATE_SHIFT_PSEUDO_CALLS,
    StatsRow,
    belief,
    difficulty,
    family_level,
    noise_of,
    posterior,
    template_shift,
)


def _stats(total: float, n: float) -> StatsRow:
    return StatsRow(calls=int(n), quality_sum=total, decayed_sum=total, decayed_n=n)


def test_posterior_is_the_conjugate_gaussian_update() -> None:
    # Prior N(0.5, 0.04) plus a drift of 0.01; 10 outcomes summing to 8 with noise 0.25.
    mean, var = posterior(0.5, 0.04, [(10.0, 8.0, 0.01)], 0.25)
    precision = 1 / 0.05 + 10 / 0.25
    assert var == pytest.approx(1 / precision)
    assert mean == pytest.approx((0.5 / 0.05 + 8.0 / 0.25) / precision)
    # No outcome at a level: only its drift widens the belief.
    assert posterior(0.7, 0.04, [(0.0, 0.0, 0.01)], 0.25) == pytest.approx((0.7, 0.05))


def test_noise_is_bounded_near_certain_means() -> None:
    """A mean of 1.0 would give zero noise, and one outcome would then be certainty."""
    assert noise_of(1.0) == noise_of(0.99) == 0.04
    assert noise_of(0.5) == 0.25


def test_an_untried_model_keeps_its_prior_with_the_widest_uncertainty() -> None:
    mean, var, n = belief(0.8, 0.02, [None, None], 0.16)
    assert (mean, n) == (0.8, 0)
    assert var == pytest.approx(0.02 + sum(DRIFT_VAR[:2]))


def test_each_level_counts_only_what_narrower_levels_do_not_hold() -> None:
    """20 calls in the family, 10 of them in the cluster: the family level weighs the other 10
    at the family's mean, the cluster level its own 10 at the cluster's mean."""
    family, cluster = _stats(15.0, 20.0), _stats(9.0, 10.0)
    mean, var, n = belief(0.5, 0.02, [family, cluster], 0.25)
    expected = posterior(0.5, 0.02, [(10.0, 7.5, DRIFT_VAR[0]), (10.0, 9.0, DRIFT_VAR[1])], 0.25)
    assert (mean, var) == pytest.approx(expected)
    assert n == 10
    # The cluster's 90 % pulls the belief above what the prior and the family's 75 % give, with
    # more certainty than ten calls alone would (noise 0.25 / 10).
    family_only, _v = posterior(0.5, 0.02, [(10.0, 7.5, DRIFT_VAR[0])], 0.25)
    assert family_only + 0.1 < mean < 0.9 and var < 0.025


def test_difficulty_is_how_much_observed_models_beat_their_priors() -> None:
    """An untried model's prior moves with how hard the context is for everyone, not to the
    context's average: at 0.6 where a 0.9-prior model scores 0.3, it is predicted well below 0.6."""
    level = {ALL: _stats(6.0, 20.0), "a/strong": _stats(6.0, 20.0)}
    offset = difficulty([{}, level], {"a/strong": 0.9, "b/untried": 0.6})
    assert offset == pytest.approx((6.0 - 20 * 0.9) / (20 + DIFFICULTY_PSEUDO_CALLS))
    assert 0.6 + offset < 0.35
    assert difficulty([{}, {}], {"a/strong": 0.9}) == 0.0  # nothing observed: the prior as it is


def test_evidence_moves_a_model_away_from_its_prior() -> None:
    bad, _var, n = belief(0.9, 0.02, [_stats(8.0, 40.0)], noise_of(0.9))
    assert bad < 0.35 and n == 40


def test_the_family_level_counts_each_cluster_against_its_own_baseline() -> None:
    """Simpson's paradox: A beats everyone by 0.05 in both clusters, but was mostly observed in
    the hard one, so its raw family mean (0.33) is below B's (0.71). Re-based on this cluster,
    A's family evidence says what it is: 0.05 above the cluster's baseline, B 0.05 below."""
    hard = {ALL: _stats(30.0, 100.0), "a": _stats(0.35 * 90, 90.0), "b": _stats(0.25 * 10, 10.0)}
    easy = {ALL: _stats(70.0, 100.0), "a": _stats(0.75 * 10, 10.0), "b": _stats(0.65 * 90, 90.0)}
    family = {ALL: _stats(100.0, 200.0), "a": _stats(39.0, 100.0), "b": _stats(61.0, 100.0)}
    here: dict[str, StatsRow] = {}  # a third cluster, nobody observed yet: the family's baseline
    level = family_level(family, here, [hard, easy, here])
    mean = {m: level[m].decayed_sum / level[m].decayed_n for m in ("a", "b")}
    assert mean["a"] == pytest.approx(0.5 + 0.05) and mean["b"] == pytest.approx(0.5 - 0.05)
    assert level[ALL] is family[ALL] and level["a"].calls == 100  # counts kept, only the mean re-based
    # Observed in this cluster: its own baseline (shrunk toward the family's) and its rows, which
    # belief() subtracts from the family level's count, are taken into account.
    here = {ALL: _stats(9.0, 10.0), "a": _stats(4.5, 5.0)}
    level = family_level(family, here, [hard, easy, here])
    base = (FAMILY_BASE_PSEUDO_CALLS * 0.5 + 9.0) / (FAMILY_BASE_PSEUDO_CALLS + 10.0)
    assert level["a"].decayed_n == pytest.approx(100.0 + 5.0)
    assert level["a"].decayed_sum / level["a"].decayed_n == pytest.approx(base + 0.05)
    # A model seen only here has no evidence from elsewhere: the level's own count is zero.
    only_here = {ALL: _stats(9.0, 10.0), "c": _stats(4.0, 5.0)}
    level = family_level({ALL: _stats(9.0, 10.0), "c": _stats(4.0, 5.0)}, only_here, [only_here])
    assert level["c"].decayed_n == pytest.approx(5.0)


def test_a_template_level_is_counted_under_no_other_key() -> None:
    """A template's outcomes are counted under its key alone, so with ``detached`` the cluster
    level keeps all of its own calls, where nested levels subtract the level below."""
    family, cluster, template = _stats(16.0, 20.0), _stats(8.0, 10.0), _stats(3.0, 10.0)
    mean, var, n = belief(0.5, 0.02, [family, cluster, template], 0.25, detached=True)
    expected = posterior(
        0.5,
        0.02,
        [(10.0, 10.0 * 0.8, DRIFT_VAR[0]), (10.0, 10.0 * 0.8, DRIFT_VAR[1]), (10.0, 3.0, DRIFT_VAR[2])],
        0.25,
    )
    assert (mean, var) == pytest.approx(expected) and n == 10
    nested, _v, _n = belief(0.5, 0.02, [family, cluster, template], 0.25)
    assert nested != pytest.approx(mean)  # nested: the cluster's 10 calls were all the template's
    # A model never seen around the template but seen in it: its template outcomes still count.
    alone, _v, n = belief(0.5, 0.02, [None, None, template], 0.25, detached=True)
    assert alone < 0.45 and n == 10


def test_a_template_is_measured_against_the_requests_around_it() -> None:
    """A template where everyone scores 0.3, in a cluster where they score 0.8: the gap, shrunk
    while either side is thin; nothing where the cluster around it is too thin to compare with."""
    k = TEMPLATE_SHIFT_PSEUDO_CALLS
    cluster, template = {ALL: _stats(160.0, 200.0)}, {ALL: _stats(30.0, 100.0)}
    shift = template_shift([{}, cluster, template])
    assert shift == pytest.approx((0.3 - 0.8) * 100 / (100 + k) * 200 / (200 + k))
    assert template_shift([{}, cluster]) == 0.0  # an untemplated request
    assert template_shift([{}, cluster, {}]) == 0.0  # a template with no outcome yet
    thin = {ALL: _stats(0.8 * (TEMPLATE_SHIFT_MIN_AROUND - 1), TEMPLATE_SHIFT_MIN_AROUND - 1)}
    assert template_shift([{}, thin, template]) == 0.0
    # a cluster whose requests are all templated: measured against the family's baseline
    assert template_shift([cluster, {}, template]) == pytest.approx(shift)


def test_the_shift_moves_only_the_levels_above_a_detached_template() -> None:
    family, cluster, template = _stats(16.0, 20.0), _stats(8.0, 10.0), _stats(3.0, 10.0)
    mean, var, _n = belief(0.5, 0.02, [family, cluster, template], 0.25, detached=True, shift=-0.4)
    expected = posterior(
        0.5,
        0.02,
        [(10.0, 10.0 * 0.4, DRIFT_VAR[0]), (10.0, 10.0 * 0.4, DRIFT_VAR[1]), (10.0, 3.0, DRIFT_VAR[2])],
        0.25,
    )
    assert (mean, var) == pytest.approx(expected)
    # no effect on nested levels (an untemplated request has no template to shift toward)
    nested = belief(0.5, 0.02, [family, cluster], 0.25)
    assert belief(0.5, 0.02, [family, cluster], 0.25, shift=-0.4) == nested


def test_with_decayed_is_a_copy_with_only_the_decayed_record_changed() -> None:
    values: dict[str, Any] = {f.name: float(i + 1) for i, f in enumerate(dataclasses.fields(StatsRow))}
    row = StatsRow(**values)
    assert row.with_decayed(40.0, 30.0) == dataclasses.replace(row, decayed_n=40.0, decayed_sum=30.0)
    assert row.decayed_n != 40.0, "the row itself is unchanged"
