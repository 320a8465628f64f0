"""Counters behind the rate limits: token buckets and concurrency slots.

One interface, two homes: `LocalCounters` in this process (a single gateway), and
`redis_counters.RedisCounters` in a Redis server every unit shares, so a limit is global.

Buckets refill continuously, as OpenAI's limits do: a bucket of `limit` per minute holds at
most `limit` and gains `limit / 60` every second. `take` is all or nothing across the
buckets it is given (a request takes from its tenant's and its key's buckets, or from none).
A bucket may go below zero through `adjust` (a request that used more than it reserved): that
debt is paid back by the refill before the next request fits.

Slots count requests in flight. Each is held by a `holder` (one request) under a lease, so
the slots of a gateway that died free themselves when their lease runs out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

WINDOW_S = 60.0  # limits are per minute


class CountersUnavailable(Exception):
    """The shared counters cannot be reached (Redis down): the caller fails open or closed."""


@dataclass(frozen=True)
class Bucket:
    """One token bucket: `key` names it, `limit` is its size per minute, `cost` what to take
    (0 reads it without taking)."""

    key: str
    limit: int
    cost: float


@dataclass(frozen=True)
class BucketState:
    limit: int
    remaining: float  # in the bucket after this call (what was there, if refused)
    reset_s: float  # until the bucket is full again
    retry_after_s: float = 0.0  # until `cost` fits, when refused (inf: never, cost > limit)


@dataclass(frozen=True)
class Slot:
    """Concurrency slots: at most `limit` holders of `key` at once."""

    key: str
    limit: int


class Counters(Protocol):
    async def take(self, buckets: Sequence[Bucket]) -> tuple[bool, list[BucketState]]:
        """Take every bucket's cost if every bucket has it, else nothing. Returns whether it
        was taken and each bucket's state, in order."""
        ...

    async def adjust(self, buckets: Sequence[Bucket]) -> None:
        """Take `cost` (negative: give back) unconditionally: settles a reservation."""
        ...

    async def acquire(self, slots: Sequence[Slot], holder: str) -> int | None:
        """Hold one slot of each for `holder`, or none: None when held, else the index of the
        first slot that was full."""
        ...

    async def release(self, slots: Sequence[Slot], holder: str) -> None:
        ...

    async def close(self) -> None:
        ...


def refill(level: float, limit: int, elapsed_s: float) -> float:
    return min(float(limit), level + max(elapsed_s, 0.0) * limit / WINDOW_S)


def state_of(level: float, limit: int, cost: float, taken: bool) -> BucketState:
    """A bucket's state given its level (after the take, when taken)."""
    rate = limit / WINDOW_S
    reset_s = max(limit - level, 0.0) / rate
    if taken or cost <= 0:
        return BucketState(limit, level, reset_s)
    retry = math.inf if cost > limit else max(cost - level, 0.0) / rate
    return BucketState(limit, level, reset_s, retry)


@dataclass
class _Level:
    level: float
    at: float


@dataclass
class LocalCounters:
    """Counters of one process. `clock` is injectable (tests); monotonic seconds."""

    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, _Level] = field(default_factory=dict)
    _slots: dict[str, set[str]] = field(default_factory=dict)

    def _level(self, bucket: Bucket, now: float) -> float:
        current = self._buckets.get(bucket.key)
        if current is None:
            return float(bucket.limit)
        return refill(current.level, bucket.limit, now - current.at)

    async def take(self, buckets: Sequence[Bucket]) -> tuple[bool, list[BucketState]]:
        now = self.clock()
        levels = [self._level(b, now) for b in buckets]
        taken = all(b.cost <= level for b, level in zip(buckets, levels, strict=True))
        states = []
        for b, level in zip(buckets, levels, strict=True):
            if taken:
                level -= b.cost
                self._buckets[b.key] = _Level(level, now)
            states.append(state_of(level, b.limit, b.cost, taken))
        return taken, states

    async def adjust(self, buckets: Sequence[Bucket]) -> None:
        now = self.clock()
        for b in buckets:
            self._buckets[b.key] = _Level(min(float(b.limit), self._level(b, now) - b.cost), now)

    async def acquire(self, slots: Sequence[Slot], holder: str) -> int | None:
        for i, slot in enumerate(slots):
            held = self._slots.get(slot.key, set())
            if holder not in held and len(held) >= slot.limit:
                return i
        for slot in slots:
            self._slots.setdefault(slot.key, set()).add(holder)
        return None

    async def release(self, slots: Sequence[Slot], holder: str) -> None:
        for slot in slots:
            held = self._slots.get(slot.key)
            if held is not None:
                held.discard(holder)
                if not held:
                    del self._slots[slot.key]

    async def close(self) -> None:
        return None
