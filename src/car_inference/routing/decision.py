"""What the router decides: ``RoutingDecision`` with its ``ScoredCandidate``s and ``RoutingStrategy``.

The router builds a decision without validation (``_construct``) and keeps its scored candidates as
tuples until someone reads ``RoutingDecision.candidates``: both matter in a 100 µs budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from operator import itemgetter
from typing import Any

from pydantic import BaseModel, ConfigDict, PrivateAttr, computed_field

from .complexity import TaskComplexity
from .outcomes import InferenceTask
from .pool import ModelView

__all__ = ["RoutingDecision", "RoutingStrategy", "ScoredCandidate"]


class RoutingStrategy(StrEnum):
    EXPLICIT = "explicit"
    PREFERRED = "preferred"
    ADAPTIVE = "adaptive"
    EXPLORE = "explore"
    FALLBACK = "fallback"


@dataclass(slots=True)
class ScoredCandidate:
    """One candidate as the router saw it: its quality belief (mean ± sd, and the draw it was
    scored with), expected cost and latency, its score, and why it won or lost."""

    model_id: str
    name: str
    provider: str
    is_local: bool
    quality: float
    quality_observations: int
    latency_ms: float
    cost_usd: float
    score: float = 0.0
    notes: str = ""
    quality_sd: float = 0.0
    sampled_quality: float = 0.0
    expected_output_tokens: float = 0.0


# A scored candidate on the hot path: (score, quality mean, observations, latency_ms, cost_usd,
# view, quality sd, sampled quality, expected output tokens, score at the mean quality); scores may
# lack a constant shared by all candidates (``offset``), added when they are shown. Tuples are
# several times cheaper to make than objects; ``RoutingDecision.candidates`` turns them into
# ``ScoredCandidate``s when someone reads it.
_Row = tuple[float, float, int, float, float, ModelView, float, float, float, float]
_SCORE = itemgetter(0)
_MEAN_SCORE = itemgetter(9)


def _why(row: _Row, best: _Row, chosen: bool, won: str = "chosen: highest score") -> str:
    """Why a candidate won or lost against the chosen one, term by term."""
    if chosen:
        return won
    reasons = []
    if row[1] < best[1] - 0.005:
        reasons.append(f"quality {row[1]:.2f} < {best[1]:.2f}")
    if row[7] < best[7] and row[1] >= best[1] - 0.005:
        reasons.append(f"drew {row[7]:.2f} < {best[7]:.2f}")
    if row[4] > best[4] * 1.05:
        reasons.append(f"{row[4] / best[4]:.1f}x cost" if best[4] > 0 else "costs more")
    if row[3] > best[3] * 1.05:
        reasons.append(f"{row[3] / best[3]:.1f}x latency" if best[3] > 0 else "slower")
    return "lost: " + (", ".join(reasons) if reasons else "lower score")


class RoutingDecision(BaseModel):
    """Which model serves a request, why, and what to try next. ``model_dump()`` gives the
    ``--explain`` JSON; ``candidates`` (scored, best first) is built on first access."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model_id: str
    model_name: str
    task: InferenceTask = InferenceTask.GENERATE
    task_family: str
    prompt_cluster: str | None = None
    complexity: TaskComplexity
    strategy: RoutingStrategy
    reason: str
    predicted_quality: float
    fallbacks: list[str]
    context_length: int
    needs_compaction: bool
    estimated_input_tokens: int
    thinking_budget: int
    excluded: dict[str, str]
    _rows: list[Any] = PrivateAttr(default_factory=list)
    _offset: float = PrivateAttr(default=0.0)
    _notes: dict[str, str] = PrivateAttr(default_factory=dict)
    _candidates: list[ScoredCandidate] | None = PrivateAttr(default=None)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def candidates(self) -> list[ScoredCandidate]:
        if self._candidates is None:
            notes, offset, rows = self._notes, self._offset, self._rows
            chosen = next((r for r in rows if r[5].model_id == self.model_id), None)
            # The chosen model is not scored when it was pinned (a preferred model): the rows are
            # its fallbacks, compared with the best of them ("chosen" named one that was not).
            best = chosen if chosen is not None else (rows[0] if rows else None)
            won = "chosen: highest score" if chosen is not None else "fallback: highest score"
            out = []
            for row in rows:
                score, q, n, lat, cost, v, sd, drawn, tokens, _mean_score = row
                assert best is not None
                note = notes.get(v.model_id) or _why(row, best, row is best, won)
                out.append(ScoredCandidate(
                    v.model_id, v.name, v.provider, v.is_local, q, n, lat, cost, score + offset, note, sd,
                    drawn, tokens,
                ))  # fmt: skip
            self._candidates = out
        return self._candidates


_DECISION_FIELDS = frozenset(RoutingDecision.model_fields)


def _construct(rows: list[_Row], notes: dict[str, str], offset: float, **values: object) -> RoutingDecision:
    """``RoutingDecision.model_construct`` without its per-field bookkeeping (15 µs of a 100 µs
    budget): every field is given, none needs a default or an alias."""
    decision = object.__new__(RoutingDecision)
    object.__setattr__(decision, "__dict__", values)
    object.__setattr__(decision, "__pydantic_fields_set__", set(_DECISION_FIELDS))
    object.__setattr__(decision, "__pydantic_extra__", None)
    object.__setattr__(
        decision,
        "__pydantic_private__",
        {"_rows": rows, "_notes": notes, "_offset": offset, "_candidates": None},
    )
    return decision
