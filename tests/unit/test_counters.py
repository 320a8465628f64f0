"""The counters behind the rate limits: one behaviour, two homes.

The conformance tests run against `LocalCounters` (a fake clock that only moves when a test
moves it) and `RedisCounters` on a real redis-server (whose clock moves by itself: levels
are compared with a tolerance, worth a few seconds of refill at the limits used here). The
Redis-only tests cover what one process cannot show: units sharing counts, leases that run
out when a unit dies, renewal, an outage and the keys' expiry.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
import redis.asyncio as redis

from server.quotas.counters import (
    Bucket,
    Counters,
    CountersUnavailable,
    LocalCounters,
    Slot,
)
from server.quotas.redis_counters import RedisCounters
from tests.redis_server import RedisServer

TOL = 0.1  # tokens: Redis' clock runs during a test (limits here refill at most 10/s)


@dataclass
class Env:
    counters: Counters
    wait: Callable[[float], Awaitable[None]]  # let `seconds` pass, for the counters' clock


def new_prefix() -> str:
    return f"test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture(params=["local", "redis"])
async def env(request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    if request.param == "local":
        now = [1000.0]

        async def advance(seconds: float) -> None:
            now[0] += seconds

        yield Env(LocalCounters(clock=lambda: now[0]), advance)
        return
    counters = RedisCounters(request.getfixturevalue("redis_url"), prefix=new_prefix())
    try:
        yield Env(counters, asyncio.sleep)
    finally:
        await counters.close()


# -- buckets ---------------------------------------------------------------------------------

async def test_take_reports_fractional_remaining_and_reset(env: Env) -> None:
    taken, [state] = await env.counters.take([Bucket("t:{a}:tpm", 60, 10.25)])
    assert taken
    assert state.limit == 60
    assert state.remaining == pytest.approx(49.75, abs=TOL)  # floats survive the round trip
    assert state.reset_s == pytest.approx(10.25, abs=TOL)  # 1 token a second
    assert state.retry_after_s == 0.0


async def test_take_is_all_or_nothing(env: Env) -> None:
    big, small = Bucket("t:{a}:rpm", 100, 3), Bucket("k:{a}:rpm", 6, 3)
    assert (await env.counters.take([Bucket(small.key, 6, 5)]))[0]  # 1 left
    taken, states = await env.counters.take([big, small])
    assert not taken
    assert states[0].remaining == 100 and states[0].retry_after_s == 0.0  # it had enough
    assert states[1].remaining == pytest.approx(1, abs=TOL)
    assert states[1].retry_after_s == pytest.approx(20, abs=1)  # 2 missing, 6 a minute
    # The bucket that had enough was not taken from either.
    taken, [state] = await env.counters.take([big])
    assert taken and state.remaining == pytest.approx(97, abs=TOL)
    taken, [state] = await env.counters.take([Bucket(small.key, 6, 1)])
    assert taken and state.remaining == pytest.approx(0, abs=TOL)


async def test_refused_take_leaves_the_level_and_says_when_to_retry(env: Env) -> None:
    key = "t:{a}:tpm"
    taken, [state] = await env.counters.take([Bucket(key, 60, 60)])
    assert taken and state.remaining == pytest.approx(0, abs=TOL)
    assert state.reset_s == pytest.approx(60, abs=TOL)
    taken, [state] = await env.counters.take([Bucket(key, 60, 30)])
    assert not taken
    assert state.remaining == pytest.approx(0, abs=TOL)
    assert state.retry_after_s == pytest.approx(30, abs=TOL)
    # A read (cost 0) shows the refused take took nothing.
    taken, [state] = await env.counters.take([Bucket(key, 60, 0)])
    assert taken and state.remaining == pytest.approx(0, abs=TOL)


async def test_cost_over_the_limit_never_fits(env: Env) -> None:
    taken, [state] = await env.counters.take([Bucket("t:{a}:tpm", 60, 61)])
    assert not taken
    assert state.remaining == 60
    assert math.isinf(state.retry_after_s)


async def test_adjust_refunds_up_to_the_limit_and_goes_into_debt(env: Env) -> None:
    key = "t:{a}:tpm"

    async def level() -> float:
        _, [state] = await env.counters.take([Bucket(key, 60, 0)])
        return state.remaining

    await env.counters.take([Bucket(key, 60, 20)])
    await env.counters.adjust([Bucket(key, 60, -10)])  # used less than it reserved
    assert await level() == pytest.approx(50, abs=TOL)
    await env.counters.adjust([Bucket(key, 60, -100)])
    assert await level() == pytest.approx(60, abs=TOL)  # never above the limit
    await env.counters.adjust([Bucket(key, 60, 100)])  # used more than it reserved
    assert await level() == pytest.approx(-40, abs=TOL)
    taken, [state] = await env.counters.take([Bucket(key, 60, 1)])
    assert not taken
    assert state.retry_after_s == pytest.approx(41, abs=TOL)  # the debt is paid back first


async def test_buckets_refill_with_time(env: Env) -> None:
    key = "t:{a}:rpm"
    taken, _ = await env.counters.take([Bucket(key, 600, 600)])  # 10 a second
    assert taken
    await env.wait(0.3)
    _, [state] = await env.counters.take([Bucket(key, 600, 0)])
    # At least 0.3 s passed; the upper bound only catches a refill far too fast.
    assert 3 - TOL <= state.remaining < 30
    taken, _ = await env.counters.take([Bucket(key, 600, 2.5)])
    assert taken


async def test_empty_calls_take_and_hold_nothing(env: Env) -> None:
    assert await env.counters.take([]) == (True, [])
    await env.counters.adjust([])
    assert await env.counters.acquire([], "h") is None
    await env.counters.release([], "h")


# -- slots -----------------------------------------------------------------------------------

async def test_slots_respect_the_limit_and_free_on_release(env: Env) -> None:
    slot = Slot("t:{a}:concurrent", 2)
    assert await env.counters.acquire([slot], "h1") is None
    assert await env.counters.acquire([slot], "h2") is None
    assert await env.counters.acquire([slot], "h3") == 0
    assert await env.counters.acquire([slot], "h1") is None  # already held: still one slot
    assert await env.counters.acquire([slot], "h3") == 0
    await env.counters.release([slot], "h1")
    assert await env.counters.acquire([slot], "h3") is None
    await env.counters.release([slot], "nobody")  # harmless
    assert await env.counters.acquire([slot], "h4") == 0


async def test_acquire_of_several_slots_is_all_or_nothing(env: Env) -> None:
    wide, narrow = Slot("t:{a}:concurrent", 2), Slot("k:{a}:concurrent", 1)
    assert await env.counters.acquire([wide, narrow], "h1") is None
    assert await env.counters.acquire([wide, narrow], "h2") == 1  # index of the full one
    # h2 holds no slot of `wide`: its second slot is still free, and then it is full.
    assert await env.counters.acquire([wide], "h3") is None
    assert await env.counters.acquire([wide], "h4") == 0
    await env.counters.release([wide, narrow], "h1")
    assert await env.counters.acquire([wide, narrow], "h2") is None


# -- Redis only ------------------------------------------------------------------------------

@pytest.fixture
def prefix() -> str:
    return new_prefix()


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


async def test_gateways_share_counts(redis_url: str, prefix: str) -> None:
    a = RedisCounters(redis_url, prefix=prefix)
    b = RedisCounters(redis_url, prefix=prefix)
    try:
        bucket = Bucket("t:{a}:rpm", 60, 40)
        assert (await a.take([bucket]))[0]
        taken, [state] = await b.take([bucket])
        assert not taken and state.remaining == pytest.approx(20, abs=TOL)
        slot = Slot("t:{a}:concurrent", 1)
        assert await a.acquire([slot], "on-a") is None
        assert await b.acquire([slot], "on-b") == 0
        await a.release([slot], "on-a")
        assert await b.acquire([slot], "on-b") is None
    finally:
        await a.close()
        await b.close()


async def until_acquired(counters: RedisCounters, slot: Slot, holder: str,
                         limit_s: float = 10.0) -> float:
    """Seconds until `holder` gets `slot` (the limit only guards against a hung test)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while await counters.acquire([slot], holder) is not None:
        assert loop.time() - start < limit_s, f"{holder} never got the slot"
        await asyncio.sleep(0.05)
    return loop.time() - start


async def test_a_dead_gateways_slots_free_themselves(redis_url: str, prefix: str) -> None:
    a = RedisCounters(redis_url, prefix=prefix, lease_s=1.0)
    b = RedisCounters(redis_url, prefix=prefix, lease_s=1.0)
    try:
        slot = Slot("t:{a}:concurrent", 1)
        assert await a.acquire([slot], "on-a") is None
        await a.close()  # dies without releasing: close stops the renewal, releases nothing
        assert await b.acquire([slot], "on-b") == 0
        waited = await until_acquired(b, slot, "on-b")
        assert waited > 0.5  # it took the lease running out, not the close
    finally:
        await b.close()


async def test_renewal_keeps_a_held_slot_past_its_lease(redis_url: str, prefix: str) -> None:
    a = RedisCounters(redis_url, prefix=prefix, lease_s=0.6)
    b = RedisCounters(redis_url, prefix=prefix, lease_s=0.6)
    try:
        slot = Slot("t:{a}:concurrent", 1)
        assert await a.acquire([slot], "stream") is None
        await asyncio.sleep(1.5)  # 2.5 leases: only renewal keeps it
        assert await b.acquire([slot], "other") == 0
        await a.release([slot], "stream")
        assert await b.acquire([slot], "other") is None
    finally:
        await a.close()
        await b.close()


async def test_keys_expire_when_nothing_is_left_to_remember(raw: redis.Redis,
                                                            redis_url: str, prefix: str) -> None:
    counters = RedisCounters(redis_url, prefix=prefix, lease_s=5.0)
    try:
        await counters.take([Bucket("t:{a}:tpm", 60, 30)])  # full again in 30 s
        ttl = await raw.pttl(prefix + "t:{a}:tpm")
        assert 28_000 < ttl <= 31_000
        await counters.take([Bucket("t:{a}:rpm", 60, 0)])  # a read of a full bucket
        assert 0 < await raw.pttl(prefix + "t:{a}:rpm") <= 1_000
        await counters.acquire([Slot("t:{a}:concurrent", 3)], "h")
        assert 0 < await raw.pttl(prefix + "t:{a}:concurrent") <= 5_000
    finally:
        await counters.close()


async def test_an_outage_is_counters_unavailable_and_recovers() -> None:
    with RedisServer() as server:
        counters = RedisCounters(server.url(), prefix=new_prefix())
        bucket, slot = Bucket("t:{a}:rpm", 60, 1), Slot("t:{a}:concurrent", 1)
        try:
            await counters.ping()
            assert (await counters.take([bucket]))[0]
            server.stop()
            calls: list[Callable[[], Awaitable[object]]] = [
                counters.ping, lambda: counters.take([bucket]),
                lambda: counters.adjust([bucket]), lambda: counters.acquire([slot], "h"),
                lambda: counters.release([slot], "h")]
            for call in calls:
                with pytest.raises(CountersUnavailable) as info:
                    await call()
                assert isinstance(info.value.__cause__, (redis.RedisError, OSError))
            server.start()  # same port, empty (nothing is saved): the scripts reload
            taken, [state] = await counters.take([bucket])
            assert taken and state.remaining == pytest.approx(59, abs=TOL)
            assert await counters.acquire([slot], "h") is None
        finally:
            await counters.close()
