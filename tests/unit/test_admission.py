"""Fair admission: per-tenant caps, round-robin between tenants, bounded queues and waits."""

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
    adm = FairAdmission(max_in_flight=1, per_tenant=1, max_queue_per_tenant=100, wait_s=10)
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
