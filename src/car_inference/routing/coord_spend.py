"""Spend limits the fleet shares through Redis: totals and reservations checked in one script.

Keys, under the fleet's prefix:

- ``spend:d:<YYYY-MM-DD>`` and ``spend:m:<YYYY-MM>`` (hashes): provider -> USD spent that UTC
  day / month, added to with ``HINCRBYFLOAT`` when a call's real cost is known (kept 3 and 40
  days). Seeded from the state store's ledger when Redis lacks them (a fresh Redis, or one that
  came back): each provider's total becomes the larger of the two, so spend is never forgotten.
- ``spend:held`` (hash): reservation id (``<replica>:<n>``) -> ``provider<TAB>usd<TAB>expires ms``.

``reserve`` runs one script: the day's and month's totals plus every live reservation, per scope
(all providers, or one), against each limit; within them it adds the reservation, otherwise it
answers which limit would break. Nothing else can interleave, so while every call reserves its
estimate first, the fleet's spend stays within a limit unless calls cost more than estimated. A
reservation counts while its replica's heartbeat (``alive:<replica>``, ``Fleet``) lives and
until it expires (``_HOLD_S``, for callers that never settle): a replica killed outright gives
its reservations back within ``[coordination] lease_s``. ``settle`` removes the reservation and
adds the real cost in one script; ``release`` removes it alone (the call failed).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .coord import Fleet

__all__ = ["FleetSpend", "Limit"]

_HOLD_S = 900.0  # a reservation nobody settles (a caller that died mid-call) lapses after this
_DAY_TTL_S = 3 * 86_400
_MONTH_TTL_S = 40 * 86_400

Limit = tuple[str, str, float]  # (scope: "*" for all providers or a provider in lower case, period, cap)

# KEYS: day, month, held, this replica's heartbeat. ARGV: prefix, reservation id, provider, usd,
# hold ms, lease ms, then scope, period ('d'/'m'), cap triples. Returns {1} or {0, scope, period,
# cap, spent} (numbers as strings: Lua numbers would come back truncated to integers).
_RESERVE = """
local t = redis.call('TIME'); local now = t[1] * 1000 + math.floor(t[2] / 1000)
local spent = {d = {}, m = {}}
local function add(period, provider, usd)
  local p = string.lower(provider)
  spent[period][p] = (spent[period][p] or 0) + usd
  spent[period]['*'] = (spent[period]['*'] or 0) + usd
end
for i, period in ipairs({'d', 'm'}) do
  local all = redis.call('HGETALL', KEYS[i])
  for j = 1, #all, 2 do add(period, all[j], tonumber(all[j + 1])) end
end
local alive = {}
local held = redis.call('HGETALL', KEYS[3])
for j = 1, #held, 2 do
  local id, v = held[j], held[j + 1]
  local replica = string.match(id, '^([^:]+):')
  if alive[replica] == nil then alive[replica] = redis.call('EXISTS', ARGV[1] .. 'alive:' .. replica) == 1 end
  local provider, usd, expires = string.match(v, '^(.*)\\t(.*)\\t(.*)$')
  if not alive[replica] or tonumber(expires) <= now then
    redis.call('HDEL', KEYS[3], id)
  else
    add('d', provider, tonumber(usd)); add('m', provider, tonumber(usd))
  end
end
local usd = tonumber(ARGV[4])
for k = 7, #ARGV, 3 do
  local scope, period, cap = ARGV[k], ARGV[k + 1], tonumber(ARGV[k + 2])
  local so_far = spent[period][scope] or 0
  if so_far + usd > cap + 1e-12 then return {0, scope, period, ARGV[k + 2], tostring(so_far)} end
end
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3] .. '\\t' .. ARGV[4] .. '\\t' .. (now + tonumber(ARGV[5])))
redis.call('SET', KEYS[4], 1, 'PX', ARGV[6])  -- alive, even before the next heartbeat (a fresh Redis)
return {1}
"""

# KEYS: day, month, held. ARGV: reservation id ('' for none), provider, usd, day ttl s, month ttl s.
_SETTLE = """
if ARGV[1] ~= '' then redis.call('HDEL', KEYS[3], ARGV[1]) end
if tonumber(ARGV[3]) > 0 then
  redis.call('HINCRBYFLOAT', KEYS[1], ARGV[2], ARGV[3]); redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('HINCRBYFLOAT', KEYS[2], ARGV[2], ARGV[3]); redis.call('EXPIRE', KEYS[2], ARGV[5])
end
return 1
"""

# KEYS: a totals hash. ARGV: ttl s, then provider, usd pairs. Each total becomes max(Redis, store).
_SEED = """
for k = 2, #ARGV, 2 do
  local have = tonumber(redis.call('HGET', KEYS[1], ARGV[k]) or '0')
  if tonumber(ARGV[k + 1]) > have then redis.call('HSET', KEYS[1], ARGV[k], ARGV[k + 1]) end
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""

# KEYS: day, month. Returns provider, usd pairs of each (as strings).
_TOTALS = """
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}
"""


class FleetSpend:
    """The Redis side of ``SpendControl`` for one replica (see the module's text)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        r = fleet.redis
        self._reserve = r.register_script(_RESERVE)
        self._settle = r.register_script(_SETTLE)
        self._seed = r.register_script(_SEED)
        self._totals = r.register_script(_TOTALS)
        self._ids = itertools.count(1)
        self.seeded: tuple[int, str] | None = None  # (fleet epoch, day) of the last seeding

    @property
    def reachable(self) -> bool:
        return self.fleet.reachable

    def _keys(self, now: float) -> list[str]:
        t = datetime.fromtimestamp(now, UTC)
        f = self.fleet
        return [
            f.key("spend", "d", t.strftime("%Y-%m-%d")),
            f.key("spend", "m", t.strftime("%Y-%m")),
            f.key("spend", "held"),
        ]

    def needs_seed(self, now: float) -> bool:
        day = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")
        return self.seeded != (self.fleet.epoch, day)

    def seed(self, now: float, day: Mapping[str, float], month: Mapping[str, float]) -> bool:
        """Make the fleet's totals at least the store's (``day`` / ``month``: provider -> USD)."""
        keys = self._keys(now)
        for key, totals, ttl in ((keys[0], day, _DAY_TTL_S), (keys[1], month, _MONTH_TTL_S)):
            args: list[str | int] = [ttl]
            for provider, usd in totals.items():
                args += [provider, repr(float(usd))]
            if self.fleet.call(self._seed, [key], args) is None:
                return False
        self.seeded = (self.fleet.epoch, datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d"))
        return True

    def reserve(
        self, now: float, provider: str, usd: float, limits: Iterable[Limit]
    ) -> tuple[bool, str | None, Limit | None, float]:
        """(True, reservation id, None, 0) within the limits; (False, None, the limit that would
        break, spent so far) otherwise; (False, None, None, 0) when Redis did not answer."""
        rid = f"{self.fleet.replica}:{next(self._ids)}"
        lease_ms = int(self.fleet.settings.lease_s * 1000)
        args: list[str | int] = [
            self.fleet.prefix,
            rid,
            provider,
            repr(float(usd)),
            int(_HOLD_S * 1000),
            lease_ms,
        ]
        for scope, period, cap in limits:
            args += [scope, period[0], repr(float(cap))]
        answer = self.fleet.call(self._reserve, [*self._keys(now), self.fleet.alive_key()], args)
        if answer is None:
            return False, None, None, 0.0
        if int(answer[0]) == 1:
            return True, rid, None, 0.0
        name, when, cap_s, spent = (x.decode() if isinstance(x, bytes) else str(x) for x in answer[1:])
        limit: Limit = (name, "daily" if when == "d" else "monthly", float(cap_s))
        return False, None, limit, float(spent)

    def settle(self, now: float, rid: str | None, provider: str, usd: float) -> bool:
        """Remove reservation ``rid`` (if any) and add ``usd`` spent with ``provider``."""
        args: list[str | int] = [rid or "", provider, repr(float(max(usd, 0.0))), _DAY_TTL_S, _MONTH_TTL_S]
        return self.fleet.call(self._settle, self._keys(now), args) is not None

    def release(self, rid: str) -> None:
        try:
            self.fleet.redis.hdel(self.fleet.key("spend", "held"), rid)
        except self.fleet.errors as exc:
            self.fleet.lost(exc)

    def totals(self, now: float) -> tuple[dict[str, float], dict[str, float]] | None:
        """The fleet's spend this day and month (provider -> USD); None when Redis did not answer."""
        answer = self.fleet.call(self._totals, self._keys(now)[:2], [])
        if answer is None:
            return None
        out: list[dict[str, float]] = []
        for flat in answer:
            items = [x.decode() if isinstance(x, bytes) else str(x) for x in flat]
            out.append({items[i]: float(items[i + 1]) for i in range(0, len(items), 2)})
        return out[0], out[1]
