"""A short-lived cache of async lookups (API keys, model names) with single flight.

When an entry expires under load, every request for it would otherwise query the database at
once (a thundering herd on each expiry). Here concurrent misses for one key share one lookup.
`clear()` (an admin change on this gateway) takes effect at once: a lookup that started
before it still answers the requests that were waiting on it, but its result is not stored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from cachetools import TTLCache

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LookupCache(Generic[K, V]):
    def __init__(self, ttl_s: float, maxsize: int = 100_000) -> None:
        self._values: TTLCache[K, V] = TTLCache(maxsize=maxsize, ttl=ttl_s)
        self._flights: dict[K, asyncio.Future[V]] = {}
        self._generation = 0

    async def get(self, key: K, lookup: Callable[[], Awaitable[V]]) -> V:
        """The cached value of `key`, or the result of `lookup()` (shared with concurrent
        callers). A lookup's exception reaches all its waiters and is not cached."""
        try:
            return self._values[key]
        except KeyError:
            pass
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.ensure_future(self._fill(key, lookup, self._generation))
            # Its exception is read here too, in case every waiter was cancelled meanwhile.
            flight.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._flights[key] = flight
        # Shielded: a waiter that is cancelled (client gone) does not cancel the others' lookup.
        return await asyncio.shield(flight)

    async def _fill(self, key: K, lookup: Callable[[], Awaitable[V]], generation: int) -> V:
        try:
            value = await lookup()
            if generation == self._generation:
                self._values[key] = value
            return value
        finally:
            if generation == self._generation:
                self._flights.pop(key, None)

    def clear(self) -> None:
        self._generation += 1
        self._values.clear()
        self._flights.clear()
