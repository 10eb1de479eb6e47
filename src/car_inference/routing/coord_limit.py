"""The fleet's bound on requests in flight (``[coordination] global_concurrency``), in Redis.

Each replica holds a counter ``conc:<replica>`` (its requests in flight, ``PX lease_s``) listed in
the set ``conc``. Taking a slot is one script: the sum of the live replicas' counters (a counter
that expired belongs to a dead replica and is forgotten) against the bound, then ``INCR`` of this
replica's own; giving it back is ``DECR`` (never below 0). A heartbeat task writes the count
this replica holds, with a fresh lease, every ``lease_s / 3``: a replica killed with requests in
flight gives its slots back within ``lease_s``, and a take or give-back whose answer Redis lost is
set right at the next beat (a slot taken or given back while a beat is on its way may be off by
one until the next).

The server's event loop makes these calls, with redis-py's asyncio client (a request waits on
them: at most ``timeout_ms``). Degrade, never fail: while the ``Fleet`` finds Redis unreachable,
or when a call here fails (the fleet is told, and warns once), requests are bounded by the
replica's own limit only (``server.max_concurrency``); the fleet's thread notices when Redis is
back, and slots are counted again from the next request on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from .coord import Fleet

__all__ = ["FleetLimiter"]

log = logging.getLogger("car_inference.routing.coord")

# KEYS: the set of replicas. ARGV: prefix, replica, bound, lease ms. Returns {taken 0/1, in flight}.
_ACQUIRE = """
local total = 0
for _, r in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local v = redis.call('GET', ARGV[1] .. 'conc:' .. r)
  if v then total = total + tonumber(v) else redis.call('SREM', KEYS[1], r) end
end
if total >= tonumber(ARGV[3]) then return {0, total} end
local mine = ARGV[1] .. 'conc:' .. ARGV[2]
redis.call('INCR', mine)
redis.call('PEXPIRE', mine, ARGV[4])
redis.call('SADD', KEYS[1], ARGV[2])
return {1, total + 1}
"""

# KEYS: this replica's counter. ARGV: lease ms.
_RELEASE = """
if redis.call('DECR', KEYS[1]) < 0 then redis.call('SET', KEYS[1], 0) end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

# KEYS: this replica's counter, the set. ARGV: replica, count held here, lease ms. The count is
# written, not only its lease renewed: a release lost to a Redis blip left the counter one high,
# renewed for ever, and the fleet answered server_busy until this replica restarted.
_BEAT = """
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""


class FleetLimiter:
    """Slots of the fleet's concurrency bound for one replica (see the module's text)."""

    def __init__(self, fleet: Fleet, limit: int) -> None:
        self.fleet = fleet
        self.limit = limit
        self.held = 0  # slots this replica holds in Redis now
        self.fleet_in_flight: int | None = None  # the fleet's count at the last slot taken
        self._client: Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._beat: asyncio.Task[None] | None = None
        self._releases: set[asyncio.Task[None]] = set()
        self._mine = fleet.key("conc", fleet.replica)
        self._set = fleet.key("conc")

    def _redis(self) -> Redis:
        """The asyncio client, made in the server's loop on first use."""
        if self._client is None:
            from redis.asyncio import Redis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            settings = self.fleet.settings
            assert settings.redis_url is not None
            timeout = settings.timeout_ms / 1000
            self._client = Redis.from_url(
                settings.redis_url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 0),
            )
            for name, text in (("acquire", _ACQUIRE), ("release", _RELEASE), ("beat", _BEAT)):
                self._scripts[name] = self._client.register_script(text)
            self._beat = asyncio.get_running_loop().create_task(self._beat_loop())
        return self._client

    @property
    def _lease_ms(self) -> int:
        return int(self.fleet.settings.lease_s * 1000)

    async def acquire(self) -> bool | None:
        """True: a slot of the fleet's is held; False: the fleet is at its bound; None: Redis is
        away (the request is not counted)."""
        if not self.fleet.reachable:
            return None
        self._redis()
        try:
            taken, total = await self._scripts["acquire"](
                keys=[self._set], args=[self.fleet.prefix, self.fleet.replica, self.limit, self._lease_ms]
            )
        except self.fleet.errors as exc:
            self.fleet.lost(exc)
            return None
        self.fleet_in_flight = int(total)
        if int(taken):
            self.held += 1
            return True
        return False

    def release(self, slot: bool | None) -> None:
        """Give a slot back (in a task of its own: the request's end never waits on Redis)."""
        if not slot:
            return
        self.held -= 1
        task = asyncio.get_running_loop().create_task(self._release())
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self) -> None:
        try:
            await self._scripts["release"](keys=[self._mine], args=[self._lease_ms])
        except self.fleet.errors as exc:
            self.fleet.lost(exc)  # the next heartbeat writes the count held

    async def _beat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.fleet.settings.lease_s / 3)
            if not self.fleet.reachable:
                continue
            try:
                await self._scripts["beat"](
                    keys=[self._mine, self._set], args=[self.fleet.replica, self.held, self._lease_ms]
                )
            except self.fleet.errors as exc:
                self.fleet.lost(exc)

    async def aclose(self) -> None:
        """Stop the heartbeat, give back what is held, close the client (the server stops)."""
        if self._beat is not None:
            self._beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beat
            self._beat = None
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)
        if self._client is not None:
            with contextlib.suppress(*self.fleet.errors):
                await self._client.delete(self._mine)
            await self._client.aclose()
            self._client = None
