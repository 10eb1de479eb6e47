from __future__ import annotations

import pytest

from car_inference.routing.estimate import ProfileRow, StatsRow, predict, residual, shrunk_baseline


def test_residual_is_measured_against_the_other_models() -> None:
    assert residual(0.8, 10, [(0.0, 0.0, 0.0, 0.0)]) == pytest.approx(0.3)  # nobody seen: vs 0.5
    # Family: others scored 2 of 10; the model's own 5 of 5 do not count toward its baseline.
    family = (7.0, 15.0, 5.0, 5.0)
    assert residual(1.0, 10, [family]) == pytest.approx(1.0 - (5 + 2) / 20)
    # The cluster refines the family baseline with the others' cluster rows.
    cluster = (1.0, 10.0, 0.0, 0.0)
    base_family = (5 + 2) / 20
    assert residual(0.0, 10, [family, cluster]) == pytest.approx(-(10 * base_family + 1) / 20)


def test_shrunk_baseline() -> None:
    assert shrunk_baseline([], 10) == 0.5
    assert shrunk_baseline([(2.0, 10.0)], 10, start=0.6) == pytest.approx((6 + 2) / 20)
    assert shrunk_baseline([(2.0, 10.0), (0.0, 0.0)], 10) == pytest.approx(0.35)


def _stats(total: float, n: float, resid: float = 0.0) -> StatsRow:
    return StatsRow(calls=int(n), quality_sum=total, decayed_sum=total, decayed_n=n, resid_sum=resid)


def test_predict_without_data_is_the_prior() -> None:
    assert predict(10, 0.2, 0.5, None, None, None, None, None, use_cluster=True) == (0.7, 0)


def test_predict_leaves_the_model_out_of_its_own_baseline() -> None:
    own = _stats(8.0, 10.0)
    everyone = _stats(8.0 + 2.0, 20.0)  # the others scored 2 of 10
    quality, n = predict(10, 0.0, 0.5, None, own, everyone, None, None, use_cluster=False)
    base = (10 * 0.5 + 2.0) / 20
    assert n == 10
    assert quality == pytest.approx(base + (8.0 - 10 * base) / 20)
    # Alone on a family, its own scores are not its baseline: all they can show is the model itself.
    alone, _ = predict(10, 0.0, 0.5, None, own, own, None, None, use_cluster=False)
    assert alone == pytest.approx(0.5 + (8.0 - 5.0) / 20)


def test_predict_uses_the_cluster_and_clamps() -> None:
    fam, fam_all = _stats(5.0, 10.0, resid=-3.0), _stats(10.0, 20.0)
    clu, clu_all = _stats(0.0, 5.0), _stats(0.0, 10.0)
    quality, n = predict(10, 0.0, 0.5, ProfileRow(total_calls=10, resid_sum=-3.0), fam, fam_all, clu,
                         clu_all, use_cluster=True)  # fmt: skip
    assert n == 5 and 0.0 <= quality < 0.2
    assert predict(10, 2.0, 0.5, None, None, None, None, None, use_cluster=False)[0] == 1.0
