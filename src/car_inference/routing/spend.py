"""SpendControl: daily and monthly USD limits, overall and per provider, checked before a call.

Periods are UTC calendar days and months. Totals live in memory for the router's fast checks and
in the store's ``spend`` table. With limits set, ``record`` adds to them and re-reads the store at
most every ``REFRESH_S``, so spend from other processes counts within that (``reload`` does it on
demand): the re-read sums the day's entries, and it once ran after every paid call, 56 ms each
with 100,000 entries that day on SQLite (on the writer thread, or the event loop of a library).
The month's total is the day's plus the month's earlier days, re-read every ``EARLIER_DAYS_S``
(those change only by late writes; rolled up, a row per day, provider and model).

With a ``Fleet`` (``[coordination] redis_url``) the check is the fleet's, atomic, in Redis
(``coord_spend.py``): ``reserve`` holds a call's estimate against every limit before the call and
``record`` settles it with the real cost (``release`` when the call failed), so replicas calling at
once cannot all pass a check that only one of them fits in. ``check`` reserves too, for callers
that never hand the reservation back: their next ``record`` for the provider settles the oldest
one (what is left lapses after ``coord_spend._HOLD_S``). While Redis is away, the local check
above is used (one warning: ``Fleet``), and totals are re-seeded from the store when it returns.

Without a fleet (or while Redis is away) ``reserve`` holds the estimate in this process until
``record`` or ``release``, and every check counts the estimates in flight: ten concurrent calls
of a lone `car serve` each passed a check that only three fitted in, and spent three times a
daily limit although each cost exactly its estimate. (Processes without a fleet still see only
each other's recorded spend, within ``REFRESH_S``.)
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from ..config import SpendLimit, SpendSettings
from ..errors import SpendLimitExceeded
from .coord_spend import _HOLD_S, FleetSpend, Limit
from .store_api import StateStore

if TYPE_CHECKING:
    from .coord import Fleet

__all__ = ["GLOBAL_SCOPE", "Reservation", "SpendControl", "SpendPeriodStatus", "SpendStatus"]

GLOBAL_SCOPE = "global"
_LOCAL_IDS = itertools.count(1)
_PERIODS = ("daily", "monthly")
REFRESH_S = 1.0
EARLIER_DAYS_S = 60.0


class SpendPeriodStatus(BaseModel):
    model_config = ConfigDict(frozen=True)

    scope: str
    period: str
    spent_usd: float
    limit_usd: float | None
    remaining_usd: float | None


class SpendStatus(BaseModel):
    day: str
    month: str
    entries: list[SpendPeriodStatus]
    by_provider_today: dict[str, float]
    by_provider_month: dict[str, float]

    def entry(self, scope: str, period: str) -> SpendPeriodStatus | None:
        return next((e for e in self.entries if e.scope == scope and e.period == period), None)


def _larger(mine: dict[str, float], theirs: dict[str, float]) -> dict[str, float]:
    return {p: max(mine.get(p, 0.0), theirs.get(p, 0.0)) for p in mine.keys() | theirs.keys()}


def _period_bounds(now: float) -> tuple[float, float, float, float]:
    """(day start, next day start, month start, next month start) in epoch seconds, UTC."""
    t = datetime.fromtimestamp(now, UTC)
    day = datetime(t.year, t.month, t.day, tzinfo=UTC)
    month = datetime(t.year, t.month, 1, tzinfo=UTC)
    next_month = datetime(t.year + (t.month == 12), t.month % 12 + 1, 1, tzinfo=UTC)
    return day.timestamp(), day.timestamp() + 86_400, month.timestamp(), next_month.timestamp()


@dataclass(slots=True)
class Reservation:
    """A call's estimate held against the fleet's limits until ``record`` or ``release``."""

    provider: str
    usd: float
    rid: str  # its id in Redis, or in this process's holds (``local``)
    made: float  # time.monotonic()
    local: bool = False  # held in this process (no fleet, or Redis away), not in Redis


@dataclass(slots=True, frozen=True)
class _Totals:
    """What ``SpendControl._fetch`` read, for the periods of ``bounds``: the day's totals by
    provider and the earlier days of the month's (with when they were read) from the store, the
    fleet's (day, month) from Redis; None where nothing was read."""

    at: float
    bounds: tuple[float, float, float, float]
    day: dict[str, float] | None
    earlier: tuple[dict[str, float], float] | None
    theirs: tuple[dict[str, float], dict[str, float]] | None


class SpendControl:
    def __init__(
        self,
        settings: SpendSettings | None = None,
        store: StateStore | None = None,
        clock: Callable[[], float] = time.time,
        *,
        fleet: Fleet | None = None,
    ) -> None:
        self.settings = settings or SpendSettings()
        self.store = store
        self._clock = clock
        self._fleet = FleetSpend(fleet) if fleet is not None else None
        self._unclaimed: dict[str, deque[Reservation]] = {}  # check()'s, by provider (lower case)
        self._held: dict[str, Reservation] = {}  # estimates in flight here, by rid (no fleet)
        self._orphans: list[str] = []  # reservations Redis was away to release
        self._lock = threading.Lock()
        self._bounds = (0.0, 0.0, 0.0, 0.0)
        self._day: dict[str, float] = {}
        self._month: dict[str, float] = {}
        self._earlier: dict[str, float] = {}  # the month's days before today
        self._read_at = self._earlier_at = -math.inf  # clock times of the last reads
        self._providers = {name.lower(): limit for name, limit in self.settings.providers.items()}
        self._roll(clock())  # sets the periods and reads their totals from the store

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The spend lock, taken after the store's where the store has one (SQLite). The writer
        thread records spend inside the store's batch (store, then spend) while ``status`` read
        the store under the spend lock (spend, then store): the two threads deadlocked (a test
        hung its 600 s). One order for both: the store's lock (re-entrant), then ours."""
        outer = getattr(self.store, "thread_lock", None)
        with outer if outer is not None else contextlib.nullcontext(), self._lock:
            yield

    @property
    def has_limits(self) -> bool:
        s = self.settings
        return (
            s.daily_usd is not None
            or s.monthly_usd is not None
            or any(p.daily_usd is not None or p.monthly_usd is not None for p in self._providers.values())
        )

    def _roll(self, now: float) -> None:
        """Start new totals when the UTC day or month has changed."""
        day0, day1, month0, month1 = self._bounds
        if day0 <= now < day1:
            return
        self._bounds = _period_bounds(now)
        self._day = {}
        if not month0 <= now < month1:
            self._month = {}  # a new day in the same month keeps the month's totals
        self._earlier_at = -math.inf  # yesterday is one of the earlier days now
        self._reload_locked()

    def reload(self) -> None:
        """Re-read this day's and month's totals from the store."""
        with self._locked():
            self._reload_locked(whole=True)

    def _reload_locked(self, *, whole: bool = False) -> None:
        self._install(self._fetch(whole=whole))

    def _reload_unlocked(self, *, whole: bool = False) -> None:
        """``_reload_locked`` with the store and Redis read before the lock is taken: a database
        that stopped answering held the lock for as long, and every paid request (``reserve``,
        on the server's event loop) waited on it, /health and all."""
        fetched = self._fetch(whole=whole)
        with self._locked():
            self._install(fetched, keep_larger=True)

    def _fetch(self, *, whole: bool) -> _Totals:
        """This period's totals as the store and the fleet have them (reads only)."""
        now = self._clock()
        day0, day1, month0, _ = self._bounds
        day: dict[str, float] | None = None
        earlier: tuple[dict[str, float], float] | None = None
        if self.store is not None:
            if whole or not 0 <= now - self._earlier_at < EARLIER_DAYS_S:
                earlier = self.store.spend_by_provider(month0, day0), now
            day = self.store.spend_by_provider(day0, day1)
        fleet = self._fleet
        theirs = fleet.totals(self._clock()) if fleet is not None and fleet.reachable else None
        return _Totals(now, self._bounds, day, earlier, theirs)

    def _install(self, fetched: _Totals, *, keep_larger: bool = False) -> None:
        """Under the lock: ``fetched`` as this period's totals (unless the period rolled meanwhile),
        the fleet's where they are larger. ``keep_larger``: read outside the lock, so spend this
        process counted meanwhile may be missing from it; totals only grow within a period, so
        each provider keeps the larger of the two (a reload after a rolled-back write replaces)."""
        if fetched.bounds != self._bounds:
            return  # read for the day before: _roll has read the new one
        self._read_at = fetched.at
        if fetched.earlier is not None:
            self._earlier, self._earlier_at = fetched.earlier
        if fetched.day is not None:
            day, month = fetched.day, dict(self._earlier)
            for provider, usd in day.items():
                month[provider] = month.get(provider, 0.0) + usd
            if keep_larger:
                day, month = _larger(self._day, day), _larger(self._month, month)
            self._day, self._month = day, month
        if fetched.theirs is not None:
            for mine, theirs in zip((self._day, self._month), fetched.theirs, strict=True):
                for provider, usd in theirs.items():
                    mine[provider] = max(mine.get(provider, 0.0), usd)

    def _limits(self, provider: str) -> list[tuple[str, SpendLimit]]:
        scopes: list[tuple[str, SpendLimit]] = [(GLOBAL_SCOPE, self.settings)]
        limit = self._providers.get(provider.lower())
        if limit is not None:
            scopes.append((provider, limit))
        return scopes

    def _spent(self, scope: str, period: str) -> float:
        totals = self._day if period == "daily" else self._month
        if scope == GLOBAL_SCOPE:
            return sum(totals.values())
        key = scope.lower()
        return sum(v for p, v in totals.items() if p.lower() == key)

    def _in_flight(self, scope: str) -> float:
        """Under the lock: the estimates this process holds for calls in flight in ``scope``
        (those older than ``_HOLD_S``, whose caller never settled them, lapse)."""
        if not self._held:
            return 0.0
        now = time.monotonic()
        for rid in [r for r, res in self._held.items() if now - res.made > _HOLD_S]:
            del self._held[rid]
        key = scope.lower()
        return sum(r.usd for r in self._held.values() if scope == GLOBAL_SCOPE or r.provider.lower() == key)

    def _first_breach(self, provider: str, estimate_usd: float) -> SpendLimitExceeded | None:
        """The first limit that ``estimate_usd`` more would break (on top of the spend recorded
        and the estimates in flight here), None when it fits."""
        with self._locked():
            return self._breach_locked(provider, estimate_usd)

    def _breach_locked(self, provider: str, estimate_usd: float) -> SpendLimitExceeded | None:
        self._roll(self._clock())
        for scope, limit in self._limits(provider):
            flight = self._in_flight(scope)
            for period in _PERIODS:
                cap = limit.daily_usd if period == "daily" else limit.monthly_usd
                if cap is None:
                    continue
                spent = self._spent(scope, period) + flight
                if spent + estimate_usd > cap + 1e-12:
                    return SpendLimitExceeded(scope, period, cap, spent, estimate_usd, held_usd=flight)
        return None

    def _hold(self, provider: str, estimate_usd: float) -> Reservation | None:
        """Check and hold ``estimate_usd`` here in one locked step, so concurrent calls cannot all
        pass a check that only some of them fit in. Raises the breach; None for a free call."""
        with self._locked():
            breach = self._breach_locked(provider, estimate_usd)
            if breach is not None:
                raise breach
            if estimate_usd <= 0:
                return None
            rid = f"local-{next(_LOCAL_IDS)}"
            reservation = self._held[rid] = Reservation(
                provider, estimate_usd, rid, time.monotonic(), local=True
            )
            return reservation

    def headroom(self, provider: str) -> float:
        """USD that may still be spent with ``provider`` now: the least remaining over the limits
        that apply to it (``inf`` when none does)."""
        if not self.has_limits:
            return math.inf
        with self._locked():
            self._roll(self._clock())
            room = math.inf
            for scope, limit in self._limits(provider):
                flight = self._in_flight(scope)
                for period in _PERIODS:
                    cap = limit.daily_usd if period == "daily" else limit.monthly_usd
                    if cap is not None:
                        room = min(room, cap - self._spent(scope, period) - flight)
            return room

    def would_exceed(self, provider: str, estimate_usd: float) -> bool:
        """Would spending ``estimate_usd`` more with ``provider`` break a limit?"""
        if not self.has_limits:
            return False
        return self._first_breach(provider, estimate_usd) is not None

    def breach(self, provider: str, estimate_usd: float) -> SpendLimitExceeded | None:
        """The limit spending ``estimate_usd`` more would break here, holding nothing (a request
        refused early, before the call that will ``reserve`` it), None when it fits; a free call
        (estimate 0) fits, as ``reserve`` is not asked for one."""
        if not self.has_limits or not estimate_usd:
            return None
        return self._first_breach(provider, estimate_usd)

    def check(self, provider: str, estimate_usd: float) -> None:
        """Raise ``SpendLimitExceeded`` (the first limit it would break) or return. In a fleet the
        estimate is held until the next ``record`` for ``provider`` (see the module's text)."""
        reservation = self.reserve(provider, estimate_usd, hold_here=False)
        if reservation is not None:
            with self._locked():
                held = self._unclaimed.setdefault(provider.lower(), deque())
                while held and time.monotonic() - held[0].made > _HOLD_S:
                    held.popleft()  # lapsed in Redis too
                held.append(reservation)

    def reserve(self, provider: str, estimate_usd: float, *, hold_here: bool = True) -> Reservation | None:
        """Like ``check``, and hold the estimate until ``record(..., reservation=)`` or ``release``
        (in the fleet's Redis, else in this process unless ``hold_here`` is False): returns the
        reservation (None without limits that apply)."""
        if not self.has_limits:
            return None
        fleet = self._fleet
        limits = self._fleet_limits(provider)
        if not limits:  # none applies to this provider: nothing to hold
            return None
        if fleet is not None and fleet.reachable:
            now = self._clock()
            with self._locked():
                self._roll(now)
                if fleet.needs_seed(now):  # a fresh (or returned) Redis learns the store's totals
                    self._reload_locked()
                    fleet.seed(now, self._day, self._month)
            self._release_orphans()
            ok, rid, breach, spent = fleet.reserve(now, provider, estimate_usd, limits)
            if ok and rid is not None:
                return Reservation(provider, estimate_usd, rid, time.monotonic())
            if breach is not None:
                scope = GLOBAL_SCOPE if breach[0] == "*" else provider
                raise SpendLimitExceeded(scope, breach[1], breach[2], spent, estimate_usd)
            # Redis did not answer: this replica's own check below
        if hold_here:
            return self._hold(provider, estimate_usd)
        breach_here = self._first_breach(provider, estimate_usd)
        if breach_here is not None:
            raise breach_here
        return None

    def _fleet_limits(self, provider: str) -> list[Limit]:
        out: list[Limit] = []
        for scope, limit in self._limits(provider):
            name = "*" if scope == GLOBAL_SCOPE else provider.lower()
            for period in _PERIODS:
                cap = limit.daily_usd if period == "daily" else limit.monthly_usd
                if cap is not None:
                    out.append((name, period, cap))
        return out

    def release(self, reservation: Reservation | None) -> None:
        """Give a reservation back (the call failed, or cost nothing)."""
        if reservation is not None and reservation.local:
            with self._locked():
                self._held.pop(reservation.rid, None)
            return
        if reservation is None or self._fleet is None:
            return
        if self._fleet.reachable:
            self._fleet.release(reservation.rid)
        if not self._fleet.reachable:
            with self._locked():
                self._orphans.append(reservation.rid)

    def _release_orphans(self) -> None:
        with self._locked():
            orphans, self._orphans = self._orphans, []
        for rid in orphans:
            self.release(Reservation("", 0.0, rid, 0.0))

    def record(
        self,
        provider: str,
        model_id: str,
        usd: float,
        *,
        reservation: Reservation | None = None,
        settles: bool = True,
    ) -> None:
        """Count money spent (the provider's reported or our estimated cost), settling
        ``reservation`` (else, in a fleet, the oldest one ``check`` made for ``provider``; not with
        ``settles=False``: money a caller spent on a call we never held an estimate for)."""
        if reservation is None and settles and self._fleet is not None:
            with self._locked():
                held = self._unclaimed.get(provider.lower())
                reservation = held.popleft() if held else None
        if usd <= 0 or (reservation is not None and reservation.local):
            self.release(reservation)  # a hold here ends as the spend is counted below
            if usd <= 0:
                return
            reservation = None
        now = self._clock()
        if self.store is not None:
            self.store.add_spend(provider, model_id, usd, ts=now)
        fleet = self._fleet
        if fleet is not None and fleet.reachable:
            if not fleet.settle(now, reservation.rid if reservation else None, provider, usd):
                self.release(reservation)  # Redis went away: given back when it returns
        elif reservation is not None:
            self.release(reservation)
        with self._locked():
            self._roll(now)
            self._day[provider] = self._day.get(provider, 0.0) + usd
            self._month[provider] = self._month.get(provider, 0.0) + usd
            due = self.store is not None and self.has_limits and not 0 <= now - self._read_at < REFRESH_S
            if due:
                self._read_at = now  # one refresh at a time
        if due:
            self._reload_unlocked()  # other processes' spend counts against the limits too

    def status(self) -> SpendStatus:
        now = self._clock()
        with self._locked():
            self._roll(now)
        self._reload_unlocked(whole=True)  # every process's spend, not only what this one counted
        with self._locked():
            entries = []
            scopes: list[tuple[str, SpendLimit]] = [(GLOBAL_SCOPE, self.settings)]
            scopes += [(name, limit) for name, limit in self.settings.providers.items()]
            for scope, limit in scopes:
                for period in _PERIODS:
                    cap = limit.daily_usd if period == "daily" else limit.monthly_usd
                    spent = self._spent(scope, period)
                    entries.append(
                        SpendPeriodStatus(
                            scope=scope,
                            period=period,
                            spent_usd=spent,
                            limit_usd=cap,
                            remaining_usd=None if cap is None else max(0.0, cap - spent),
                        )
                    )
            t = datetime.fromtimestamp(now, UTC)
            return SpendStatus(
                day=t.strftime("%Y-%m-%d"),
                month=t.strftime("%Y-%m"),
                entries=entries,
                by_provider_today=dict(self._day),
                by_provider_month=dict(self._month),
            )
