"""Fair admission: per-tenant caps, token-fair (VTC), round-robin and FIFO policies, bounded
queues and waits. No clocks: the order in which freed slots are handed out is the result."""

from __future__ import annotations

import asyncio

import pytest

from adapters.errors import Overloaded
from server.admission import FairAdmission


async def hold(adm: FairAdmission, tenant: str, release: asyncio.Event, order: list[str]) -> None:
    async with adm.admit(tenant):
        order.append(tenant)
        await release.wait()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_freed_capacity_goes_round_robin_across_tenants() -> None:
    adm = FairAdmission(max_in_flight=1, per_tenant=1, max_queue_per_tenant=100, wait_s=10,
                        policy="round_robin")
    gates = {name: asyncio.Event() for name in ("a0", "a1", "a2", "a3", "b0", "c0")}
    order: list[str] = []
    tasks = []
    # a floods first; b and c arrive later, each with one request.
    for name in ("a0", "a1", "a2", "a3", "b0", "c0"):
        tasks.append(asyncio.create_task(hold(adm, name[0], gates[name], order)))
        await settle()
    assert order == ["a"] and adm.queued == 5
    for name in ("a0", "a1", "b0", "c0", "a2", "a3"):
        gates[name].set()
        await settle()
    await asyncio.gather(*tasks)
    # a had queued first, so it gets the next turn; then b and c before a's backlog.
    assert order == ["a", "a", "b", "c", "a", "a"]
    assert adm.in_flight == 0 and adm.queued == 0


async def test_per_tenant_cap_leaves_room_for_others() -> None:
    adm = FairAdmission(max_in_flight=10, per_tenant=2, max_queue_per_tenant=10, wait_s=10)
    release = asyncio.Event()
    order: list[str] = []
    tasks = [asyncio.create_task(hold(adm, "a", release, order)) for _ in range(5)]
    await settle()
    tasks.append(asyncio.create_task(hold(adm, "b", release, order)))
    await settle()
    assert order.count("a") == 2 and order.count("b") == 1 and adm.queued == 3
    release.set()
    await asyncio.gather(*tasks)
    assert order.count("a") == 5 and adm.in_flight == 0


async def test_full_queue_and_long_wait_are_429() -> None:
    adm = FairAdmission(max_in_flight=1, per_tenant=1, max_queue_per_tenant=1, wait_s=0.05)
    release = asyncio.Event()
    first = asyncio.create_task(hold(adm, "a", release, []))
    await settle()
    waiter = asyncio.create_task(hold(adm, "a", release, []))
    await settle()
    with pytest.raises(Overloaded) as full:
        async with adm.admit("a"):
            pass
    assert full.value.code == "tenant_queue_full" and full.value.retry_after_s
    with pytest.raises(Overloaded) as slow:
        await waiter
    assert slow.value.code == "admission_timeout"
    release.set()
    await first
    assert adm.in_flight == 0 and adm.queued == 0


async def test_a_cancelled_waiter_leaves_no_trace() -> None:
    adm = FairAdmission(max_in_flight=1, per_tenant=1, max_queue_per_tenant=5, wait_s=10)
    release = asyncio.Event()
    order: list[str] = []
    first = asyncio.create_task(hold(adm, "a", release, order))
    await settle()
    gone = asyncio.create_task(hold(adm, "b", release, order))
    await settle()
    gone.cancel()
    await settle()
    assert adm.queued == 0
    release.set()
    await first
    assert order == ["a"] and adm.in_flight == 0


async def grant_order(adm: FairAdmission, arrivals: list[tuple[str, float]],
                      output_tokens: dict[str, float] | None = None,
                      weights: dict[str, float] | None = None) -> list[str]:
    """Queue `arrivals` (tenant, prompt tokens) in order behind one held slot (the adm has
    max_in_flight=1), then let each admitted request finish in turn: the tenants in the order
    they were let in. A request is charged `output_tokens[tenant]` generated tokens as it ends."""
    admitted: list[tuple[str, asyncio.Event]] = []

    async def one(tenant: str, cost: float) -> None:
        async with adm.admit(tenant, cost, (weights or {}).get(tenant, 1.0)):
            done = asyncio.Event()
            admitted.append((tenant, done))
            await done.wait()
            adm.charge(tenant, completion_tokens=(output_tokens or {}).get(tenant, 0))

    first = asyncio.create_task(one("blocker", 0))
    await settle()
    tasks = [asyncio.create_task(one(tenant, cost)) for tenant, cost in arrivals]
    await settle()
    for i in range(len(arrivals) + 1):
        assert len(admitted) == i + 1  # exactly one runs at a time
        admitted[i][1].set()
        await settle()
    await asyncio.gather(first, *tasks)
    return [tenant for tenant, _ in admitted[1:]]


async def test_token_fair_serves_the_short_prompt_tenant_between_long_prompts() -> None:
    # Both tenants backlogged with one slot: "long" sends 1000-token prompts, "short" 10-token
    # ones. By tokens served, short gets ~100 requests per long one; round-robin would
    # alternate them one for one.
    arrivals = [("long", 1000.0)] * 5 + [("short", 10.0)] * 30
    order = await grant_order(FairAdmission(1, 1, 100, 10), arrivals)
    assert order[0] == "long"  # equal counters at first: the earlier arrival wins the tie
    assert order[1:31] == ["short"] * 30  # then short until its backlog is gone
    rr = await grant_order(FairAdmission(1, 1, 100, 10, policy="round_robin"), arrivals)
    assert rr[:10] == ["long", "short"] * 5
    fifo = await grant_order(FairAdmission(1, 1, 100, 10, policy="fifo"), arrivals)
    assert fifo == [t for t, _ in arrivals]


async def test_generated_tokens_count_with_their_weight() -> None:
    # Equal prompts, but "chatty" generates 100 tokens per request (x2 weight = 200) and
    # "terse" 1: after chatty's first request, terse's counter stays below until it has had
    # about 200 times chatty's service.
    arrivals = [("chatty", 1.0)] * 3 + [("terse", 1.0)] * 3
    order = await grant_order(FairAdmission(1, 1, 100, 10, output_weight=2.0), arrivals,
                              output_tokens={"chatty": 100, "terse": 1})
    assert order == ["chatty", "terse", "terse", "terse", "chatty", "chatty"]


async def test_weights_give_a_tier_a_proportional_share() -> None:
    arrivals = [("gold", 100.0)] * 12 + [("free", 100.0)] * 12
    order = await grant_order(FairAdmission(1, 1, 100, 10), arrivals,
                              weights={"gold": 2.0, "free": 1.0})
    # gold is charged half as much per token: two requests for each of free's while both wait.
    assert order[:12].count("gold") == 8, order


async def test_a_returning_tenant_banks_no_credit_for_its_idle_time() -> None:
    adm = FairAdmission(max_in_flight=4, per_tenant=4, max_queue_per_tenant=100, wait_s=10)
    # "busy" is served 10,000 tokens while "idle" sends nothing.
    for _ in range(10):
        async with adm.admit("busy", 1000.0):
            pass
    release = asyncio.Event()
    order: list[str] = []
    holder = asyncio.create_task(hold(adm, "busy", release, order))
    await settle()
    async with adm.admit("idle", 10.0):
        # lifted to the least-served active tenant (busy), not starting from zero
        assert adm.counter("idle") >= adm.counter("busy")
    release.set()
    await holder


async def test_a_lone_tenant_gets_every_slot() -> None:
    adm = FairAdmission(max_in_flight=8, per_tenant=8, max_queue_per_tenant=100, wait_s=10)
    release = asyncio.Event()
    order: list[str] = []
    tasks = [asyncio.create_task(hold(adm, "solo", release, order)) for _ in range(10)]
    await settle()
    assert adm.in_flight == 8 and adm.queued == 2  # work-conserving up to the engine's cap
    release.set()
    await asyncio.gather(*tasks)
    assert adm.in_flight == 0 and adm.queued == 0 and order == ["solo"] * 10
