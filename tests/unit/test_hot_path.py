"""The per-request and per-token paths: lookups shared under load, events split correctly."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from adapters.errors import NotFound
from server.engine.client import _events
from server.lookup_cache import LookupCache


class CountingLookup:
    def __init__(self, value: object = "v", error: Exception | None = None) -> None:
        self.calls = 0
        self.value, self.error = value, error
        self.gate = asyncio.Event()

    async def __call__(self) -> object:
        self.calls += 1
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        return self.value


async def test_concurrent_misses_share_one_lookup_then_hit_the_cache():
    cache: LookupCache[str, object] = LookupCache(ttl_s=60)
    lookup = CountingLookup("owner")
    waiters = [asyncio.ensure_future(cache.get("k", lookup)) for _ in range(20)]
    await asyncio.sleep(0)
    lookup.gate.set()
    assert await asyncio.gather(*waiters) == ["owner"] * 20
    assert lookup.calls == 1
    assert await cache.get("k", lookup) == "owner"
    assert lookup.calls == 1  # served from the cache


async def test_a_failed_lookup_reaches_every_waiter_and_is_not_cached():
    cache: LookupCache[str, object] = LookupCache(ttl_s=60)
    failing = CountingLookup(error=NotFound("gone"))
    waiters = [asyncio.ensure_future(cache.get("k", failing)) for _ in range(5)]
    await asyncio.sleep(0)
    failing.gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, NotFound) for r in results) and failing.calls == 1
    good = CountingLookup("back")
    good.gate.set()
    assert await cache.get("k", good) == "back"


async def test_entries_expire():
    cache: LookupCache[str, object] = LookupCache(ttl_s=0.05)
    first, second = CountingLookup("old"), CountingLookup("new")
    first.gate.set()
    second.gate.set()
    assert await cache.get("k", first) == "old"
    await asyncio.sleep(0.1)
    assert await cache.get("k", second) == "new"


async def test_clear_during_a_lookup_does_not_store_its_stale_result():
    cache: LookupCache[str, object] = LookupCache(ttl_s=60)
    stale = CountingLookup("before the admin change")
    waiter = asyncio.ensure_future(cache.get("k", stale))
    await asyncio.sleep(0)
    cache.clear()  # e.g. a key revoked on this gateway while its lookup was running
    fresh = CountingLookup("after")
    fresh.gate.set()
    assert await cache.get("k", fresh) == "after"  # a new lookup, not the one in flight
    stale.gate.set()
    assert await waiter == "before the admin change"
    assert await cache.get("k", CountingLookup("unused")) == "after"


async def test_a_cancelled_waiter_does_not_cancel_the_shared_lookup():
    cache: LookupCache[str, object] = LookupCache(ttl_s=60)
    lookup = CountingLookup("v")
    first = asyncio.ensure_future(cache.get("k", lookup))
    second = asyncio.ensure_future(cache.get("k", lookup))
    await asyncio.sleep(0)
    first.cancel()
    lookup.gate.set()
    assert await second == "v"
    with pytest.raises(asyncio.CancelledError):
        await first


async def _raw_events(*reads: bytes) -> list[list[bytes]]:
    async def body():  # type: ignore[no-untyped-def]
        for data in reads:
            yield data

    resp = httpx.Response(200, content=body())
    return [burst async for burst in _events(resp)]


@pytest.mark.parametrize(("reads", "bursts"), [
    # one event per read, as vLLM usually writes them
    ((b"data: {\"a\":1}\n\n", b"data: [DONE]\n\n"), [[b"data: {\"a\":1}"], [b"data: [DONE]"]]),
    # an event split across reads, even inside its terminator
    ((b"data: {\"a\"", b":1}\n", b"\ndata: [DONE]\n\n"), [[b"data: {\"a\":1}", b"data: [DONE]"]]),
    # several events in one read stay one burst
    ((b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n",), [[b"data: 1", b"data: 2", b"data: [DONE]"]]),
    # a last event without its blank line is still delivered
    ((b"data: 1\n\ndata: 2",), [[b"data: 1"], [b"data: 2"]]),
])
async def test_events_are_whole_however_the_bytes_arrive(reads, bursts):
    assert await _raw_events(*reads) == bursts
