"""The counters in Redis, shared by every gateway unit so that a limit is one global limit.

Every operation is one Lua script: one round trip, atomic on the server, and timed by the
server's clock (`TIME`), so units whose clocks disagree still refill buckets alike.

- A bucket is a hash {level, at_ms}. Its key expires when the bucket would be full again:
  an idle tenant costs no memory, and a missing bucket reads as full, which is what it is.
- A slot key is a sorted set: member the holder, score the end of its lease (ms). Acquire
  first drops expired leases, so the slots of a unit that died free themselves within
  `lease_s`; a task of each unit renews the leases it holds every `lease_s / 3`.

Keys are `prefix` + the caller's key. Callers write one tenant's keys with a hash tag
(`t:{acme}:rpm`), so that under Redis Cluster all the keys of one call are in one slot, as a
script needs. Levels travel as strings both ways: Redis truncates a Lua number it returns to
an integer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

import redis.asyncio as redis
from redis.exceptions import RedisError

from server.quotas.counters import Bucket, BucketState, CountersUnavailable, Slot, state_of

log = logging.getLogger(__name__)
T = TypeVar("T")

# ARGV: mode ("take" or "adjust"), then limit and cost of each bucket.
# Returns {taken (1/0), level of each bucket after (before, when refused), as strings}.
_TAKE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + t[2] / 1000
local adjust = ARGV[1] == 'adjust'
local levels, taken = {}, 1
for i, key in ipairs(KEYS) do
  local limit, cost = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local level, at = unpack(redis.call('HMGET', key, 'level', 'at_ms'))
  if level then
    level = math.min(limit, tonumber(level) + math.max(now - tonumber(at), 0) * limit / 60000)
  else
    level = limit
  end
  levels[i] = level
  if cost > level then taken = 0 end
end
if adjust then taken = 1 end
local out = {taken}
for i, key in ipairs(KEYS) do
  local limit, cost = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local level = levels[i]
  if taken == 1 then
    level = level - cost
    if adjust then level = math.min(limit, level) end
    redis.call('HSET', key, 'level', string.format('%.17g', level),
               'at_ms', string.format('%.17g', now))
    local full_ms = math.max(limit - level, 0) * 60000 / math.max(limit, 1)
    redis.call('PEXPIRE', key, math.ceil(full_ms) + 1000)
  end
  out[i + 1] = string.format('%.17g', level)
end
return out
"""

# ARGV: holder, lease (ms), then the limit of each slot key.
# Returns 0 when the holder now holds every slot, else the (1-based) index of the first full one.
_ACQUIRE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local holder, lease = ARGV[1], tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if not redis.call('ZSCORE', key, holder)
      and redis.call('ZCARD', key) >= tonumber(ARGV[i + 2]) then
    return i
  end
end
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + lease, holder)
  redis.call('PEXPIRE', key, lease)
end
return 0
"""

# One slot key. ARGV: lease (ms), then its holders here: extends the leases still there.
_RENEW = """
local t = redis.call('TIME')
local until_ms = t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', until_ms, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
return 0
"""


class RedisCounters:
    """`Counters` in Redis at `url`. Every call fails with `CountersUnavailable` when Redis
    does not answer within `timeout_s` (the rate limiter is on every request's path: it must
    not wait long on a broken Redis)."""

    def __init__(self, url: str, *, timeout_s: float = 0.25, lease_s: float = 30.0,
                 prefix: str = "loraplex:") -> None:
        self._redis = redis.Redis.from_url(url, socket_timeout=timeout_s,
                                           socket_connect_timeout=timeout_s)
        self._prefix = prefix
        self._lease_ms = max(int(lease_s * 1000), 1)
        self._take = self._redis.register_script(_TAKE)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._renew = self._redis.register_script(_RENEW)
        self._held: dict[str, set[str]] = {}  # slot key (prefixed) -> holders in this process
        self._renewer: asyncio.Task[None] | None = None

    @staticmethod
    async def _call(call: Awaitable[T]) -> T:
        try:
            return await call
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            raise CountersUnavailable(f"Redis: {exc}") from exc

    async def ping(self) -> None:
        await self._call(self._redis.ping())

    async def _buckets(self, mode: str, buckets: Sequence[Bucket]) -> list[Any]:
        args: list[str | int] = [mode]
        for b in buckets:
            args += [b.limit, repr(float(b.cost))]
        result: list[Any] = await self._call(
            self._take(keys=[self._prefix + b.key for b in buckets], args=args))
        return result

    async def take(self, buckets: Sequence[Bucket]) -> tuple[bool, list[BucketState]]:
        if not buckets:
            return True, []
        taken, *levels = await self._buckets("take", buckets)
        return bool(taken), [state_of(float(level), b.limit, b.cost, bool(taken))
                             for b, level in zip(buckets, levels, strict=True)]

    async def adjust(self, buckets: Sequence[Bucket]) -> None:
        if buckets:
            await self._buckets("adjust", buckets)

    async def acquire(self, slots: Sequence[Slot], holder: str) -> int | None:
        if not slots:
            return None
        keys = [self._prefix + s.key for s in slots]
        full = await self._call(self._acquire(
            keys=keys, args=[holder, self._lease_ms, *(s.limit for s in slots)]))
        if full:
            return int(full) - 1
        for key in keys:
            self._held.setdefault(key, set()).add(holder)
        if self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())
        return None

    async def release(self, slots: Sequence[Slot], holder: str) -> None:
        keys = [self._prefix + s.key for s in slots]
        for key in keys:
            held = self._held.get(key)
            if held is not None:
                held.discard(holder)
                if not held:
                    del self._held[key]
        if keys:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.zrem(key, holder)
                await self._call(pipe.execute())

    async def _renew_forever(self) -> None:
        """Extend the leases held here, so a long stream keeps its slot; a unit that dies
        stops renewing, and its leases run out."""
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            if not self._held:
                continue
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for key, holders in list(self._held.items()):
                        await self._renew(keys=[key], args=[self._lease_ms, *holders],
                                          client=pipe)
                    await self._call(pipe.execute())
            except CountersUnavailable as exc:
                log.warning("could not renew concurrency leases (will retry): %s", exc)

    async def close(self) -> None:
        """Stop renewing and disconnect. Held slots are not released: their leases run out."""
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        await self._redis.aclose()
