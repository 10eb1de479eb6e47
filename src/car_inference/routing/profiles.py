"""The exported outcome shapes: the seed's ``outcome_profiles.json`` entries.

``ModelProfile`` is one model's totals and per-task statistics; ``TaskStats`` is keyed by task family
(``code``) or family and prompt cluster (``code|latin-short``). Files written by the seed engine (counts
only) load too: their quality is taken to be their success rate.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .estimate import ProfileRow, StatsRow

__all__ = [
    "ModelProfile",
    "TaskStats",
    "export_profile",
    "export_stats",
    "imported_profile",
    "mean_latencies",
    "parsed_profiles",
    "replace_models",
    "row_fields",
    "sum_rows",
    "unread_keys",
]

# What an imported profile may hold (``car profiles import``): NaN failed deep in the store with a
# traceback, and infinity or a negative count was taken (the router then believed 1.00 from no
# calls, and the next export wrote `Infinity`, which is not JSON).
# The bounds leave room for sums: baselines add every model's rows, and two counts just under
# 2**63 overflowed SQLite's integers (a traceback), two amounts of 1e308 stored infinity.
Count = Annotated[int, Field(ge=0, lt=2**40)]  # calls: a trillion per model
Tokens = Annotated[int, Field(ge=0, lt=2**50)]
Amount = Annotated[float, Field(ge=0, le=1e15, allow_inf_nan=False)]
Share = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
# A model id as the catalog has them; "*" names the baselines (every model's sums) and a profile
# of that name made every later export fail.
ModelId = Annotated[str, Field(min_length=1, max_length=512, pattern=r"^[^\s*][^\s]*$")]
_SLACK = 1e-6  # float sums of outcomes each at most 1
# ``updated_at`` is seconds since 1970 by this clock; a day ahead allows for clocks that differ. A
# time far ahead was taken: its template was never forgotten, and the store kept it as the newest.
_FUTURE_SLACK_S = 86_400.0
# The keys the router reads (``store_base.stat_keys``): a family, family|cluster (``complexity``'s
# script-shape clusters) or template|p<hash> (``context.template_key``).
_CLUSTER_KEY = re.compile(r"[a-z_]+\|(?:latin|cjk)-(?:mc|long|short)")
_TEMPLATE_KEY = re.compile(r"template\|p[0-9a-f]{10}")


class TaskStats(BaseModel):
    model_config = ConfigDict(extra="ignore")

    calls: Count = 0
    success_count: Count = 0
    fail_count: Count = 0
    total_latency_ms: Amount = 0.0
    quality_sum: Amount | None = None
    decayed_sum: Amount | None = None
    decayed_n: Amount | None = None
    ema_quality: Share = 0.0
    updated_at: Count = 0
    total_output_tokens: Tokens = 0
    joined_at: Count = 0

    @model_validator(mode="after")
    def _fill(self) -> TaskStats:
        # Seed files carry only counts: their quality is their success rate.
        if self.quality_sum is None:
            self.quality_sum = float(self.success_count)
        if self.decayed_n is None:
            self.decayed_n = float(self.calls)
        if self.decayed_sum is None:
            self.decayed_sum = self.quality_sum * (self.decayed_n / self.calls) if self.calls else 0.0
        # Each outcome's quality is 0..1: sums above their counts are no outcomes' (and made the
        # baselines' means above 1, which every later export refused).
        if self.quality_sum > self.calls * (1 + _SLACK) + _SLACK:
            raise ValueError(f"quality_sum {self.quality_sum} is more than calls {self.calls}")
        if self.decayed_sum > self.decayed_n * (1 + _SLACK) + _SLACK:
            raise ValueError(f"decayed_sum {self.decayed_sum} is more than decayed_n {self.decayed_n}")
        _outcomes_within(self.success_count, self.fail_count, self.calls)
        return self


def _not_ahead(profile: ModelProfile) -> None:
    """An import's times are not far ahead (checked on import only: a row stored so before made
    every export, and so every `car profiles import`, fail)."""
    now = time.time()
    times = [("updated_at", profile.updated_at)]
    times += [(f"task_stats[{k!r}].updated_at", s.updated_at) for k, s in profile.task_stats.items()]
    for where, updated_at in times:
        ahead = updated_at - now
        if ahead > _FUTURE_SLACK_S:
            raise ValueError(
                f"{profile.model_id}: {where} {updated_at} is {ahead / 86_400:,.0f} days ahead of this"
                " clock (seconds since 1970 expected, not milliseconds)"
            )


def _outcomes_within(successes: int, failures: int, calls: int) -> None:
    """Successes and failures are some of the calls: 10**6 successes in 601 calls was imported."""
    if successes + failures > calls:
        raise ValueError(
            f"success_count {successes} and fail_count {failures} add up to more than calls {calls}"
        )


class ModelProfile(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model_id: ModelId
    total_calls: Count = 0
    success_count: Count = 0
    fail_count: Count = 0
    total_latency_ms: Amount = 0
    total_input_tokens: Tokens = 0
    total_output_tokens: Tokens = 0
    task_stats: dict[str, TaskStats] = Field(default_factory=dict)
    ema_quality: Share = 0.5
    quality_per_1k_tokens: Amount = 0.0
    updated_at: Count = 0

    @model_validator(mode="after")
    def _consistent(self) -> ModelProfile:
        _outcomes_within(self.success_count, self.fail_count, self.total_calls)
        if any(not key.strip() or key != key.strip() for key in self.task_stats):
            raise ValueError("task_stats: a key is empty or has spaces around it (keys are task families)")
        # Each outcome counts once in each key it falls under: a key with more calls than the
        # model's total is no outcomes' (500 calls in one family of a 1-call profile took every
        # model's quality there to about 0 through the rebuilt baselines).
        for key, stats in self.task_stats.items():
            if stats.calls > self.total_calls:
                raise ValueError(
                    f"task_stats[{key!r}] has {stats.calls} calls, more than total_calls {self.total_calls}"
                )
        return self


def parsed_profiles(profiles: Iterable[ModelProfile | dict[str, Any]]) -> list[ModelProfile]:
    """``profiles`` validated, each model once: a file naming one twice was "imported 2" with the
    last one silently kept."""
    parsed = [p if isinstance(p, ModelProfile) else ModelProfile.model_validate(p) for p in profiles]
    seen: set[str] = set()
    for profile in parsed:
        _not_ahead(profile)
        if profile.model_id in seen:
            raise ValueError(f"{profile.model_id} has two profiles; keep one")
        seen.add(profile.model_id)
    return parsed


def unread_keys(profile: ModelProfile) -> list[str]:
    """The task_stats keys of ``profile`` that no request of the router's own rules is counted under
    (``store_base.stat_keys``): kept, as what ``record_attempt`` was told, but a misspelt family
    ("Code", "coding") was imported without a word and never read."""
    from ..requests import TaskHint
    from .media import MEDIA_FAMILY

    families = {h.value for h in TaskHint} | set(MEDIA_FAMILY.values())
    return [
        key
        for key in profile.task_stats
        if not (
            key in families
            or (_CLUSTER_KEY.fullmatch(key) and key.partition("|")[0] in families)
            or _TEMPLATE_KEY.fullmatch(key)
        )
    ]


def row_fields(row: ProfileRow | StatsRow) -> dict[str, Any]:
    return {name: getattr(row, name) for name in row.__slots__}


def export_stats(s: StatsRow) -> TaskStats:
    return TaskStats.model_validate(row_fields(s) | {"updated_at": int(s.updated_at)})


def export_profile(model_id: str, p: ProfileRow, stats: Mapping[str, Mapping[str, StatsRow]]) -> ModelProfile:
    """One model's profile with its stats under every key (family, family|cluster)."""
    tasks = {key: export_stats(by_model[model_id]) for key, by_model in stats.items() if model_id in by_model}
    tokens = p.total_input_tokens + p.total_output_tokens
    per_1k = p.ema_quality / (tokens / p.total_calls / 1000) if tokens and p.total_calls else 0.0
    return ModelProfile(
        model_id=model_id,
        total_calls=p.total_calls,
        success_count=p.success_count,
        fail_count=p.fail_count,
        total_latency_ms=p.total_latency_ms,
        total_input_tokens=p.total_input_tokens,
        total_output_tokens=p.total_output_tokens,
        task_stats=tasks,
        ema_quality=p.ema_quality,
        quality_per_1k_tokens=per_1k,
        updated_at=int(p.updated_at),
    )


def sum_rows(rows: Iterable[StatsRow]) -> StatsRow:
    """All the rows' counts and sums together (a baseline row)."""
    total = StatsRow()
    for s in rows:
        total.calls += s.calls
        total.success_count += s.success_count
        total.fail_count += s.fail_count
        total.total_latency_ms += s.total_latency_ms
        total.quality_sum += s.quality_sum
        total.decayed_sum += s.decayed_sum
        total.decayed_n += s.decayed_n
        total.total_output_tokens += s.total_output_tokens
        total.updated_at = max(total.updated_at, s.updated_at)
    total.ema_quality = total.quality_sum / total.calls if total.calls else 0.0
    return total


def replace_models(stats: dict[str, dict[str, StatsRow]], parsed: list[ModelProfile]) -> set[str]:
    """The imported models' rows in place of their old ones, in one pass over the keys (it was
    one pass per profile: 16,000 profiles took 16.7 s). Returns the keys that changed."""
    ids = {mp.model_id for mp in parsed}
    touched: set[str] = set()
    for key, by_model in stats.items():
        if not ids.isdisjoint(by_model):
            touched.add(key)
            for model_id in ids & by_model.keys():
                del by_model[model_id]
    for mp in parsed:
        for key, ts in mp.task_stats.items():
            stats.setdefault(key, {})[mp.model_id] = StatsRow(**ts.model_dump())
            touched.add(key)
    return touched


def imported_profile(mp: ModelProfile, stats: Mapping[str, Mapping[str, StatsRow]]) -> ProfileRow:
    """An imported profile's totals; its quality sum from its family rows when they account for
    every call, else the EMA stands for every call (seed files carry counts only)."""
    families = [stats[k][mp.model_id] for k in mp.task_stats if "|" not in k]
    if families and sum(s.calls for s in families) == mp.total_calls:
        quality_sum = sum(s.quality_sum for s in families)
    else:
        quality_sum = mp.ema_quality * mp.total_calls
    return ProfileRow(
        total_calls=mp.total_calls, success_count=mp.success_count, fail_count=mp.fail_count,
        total_latency_ms=mp.total_latency_ms, total_input_tokens=mp.total_input_tokens,
        total_output_tokens=mp.total_output_tokens, quality_sum=quality_sum,
        ema_quality=mp.ema_quality, updated_at=mp.updated_at,
    )  # fmt: skip


def mean_latencies(
    profiles: Mapping[str, ProfileRow], known: Iterable[str], min_samples: int
) -> dict[str, float]:
    """Each profile's mean latency, for the models ``known`` has no p50 for (an imported profile,
    pruned traces): scored at it, not at the catalog's guess (an import turned a learned 900 ms
    into 4,867). Calls whose latency was not known count as 0 in it, so it can only be lower than
    the truth when some were not."""
    have = set(known)
    return {
        model_id: p.total_latency_ms / p.success_count
        for model_id, p in profiles.items()
        if model_id not in have and p.success_count >= min_samples and p.total_latency_ms > 0
    }
