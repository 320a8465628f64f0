"""Fair admission of tenant requests to the engine.

At most `max_in_flight` requests are forwarded at once, and at most `per_tenant` of one
tenant. Past that, requests wait in their tenant's FIFO queue, and freed capacity goes to the
tenants round-robin, so a tenant sending a flood waits behind itself, not in front of others.
A full tenant queue, or a wait past `wait_s`, answers 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from adapters.errors import Overloaded


class FairAdmission:
    def __init__(self, max_in_flight: int, per_tenant: int, max_queue_per_tenant: int,
                 wait_s: float) -> None:
        self.max_in_flight = max_in_flight
        self.per_tenant = per_tenant
        self.max_queue = max_queue_per_tenant
        self.wait_s = wait_s
        self.in_flight = 0
        self._running: dict[str, int] = {}
        self._queues: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    @asynccontextmanager
    async def admit(self, tenant: str) -> AsyncIterator[None]:
        await self._enter(tenant)
        try:
            yield
        finally:
            self._leave(tenant)

    def _can_run(self, tenant: str) -> bool:
        return (self.in_flight < self.max_in_flight
                and self._running.get(tenant, 0) < self.per_tenant)

    def _grant(self, tenant: str) -> None:
        self.in_flight += 1
        self._running[tenant] = self._running.get(tenant, 0) + 1

    async def _enter(self, tenant: str) -> None:
        if self._can_run(tenant) and not self._queues.get(tenant):
            self._grant(tenant)
            return
        queue = self._queues.setdefault(tenant, deque())
        if len(queue) >= self.max_queue:
            raise Overloaded(f"tenant {tenant!r} has {len(queue)} requests waiting already",
                             code="tenant_queue_full", retry_after_s=1)
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(ticket)
        try:
            await asyncio.wait_for(asyncio.shield(ticket), self.wait_s)
        except BaseException as exc:
            if ticket.done() and not ticket.cancelled():
                self._leave(tenant)  # granted just as we gave up: hand it on
            else:
                ticket.cancel()
                self._drop(tenant, ticket)
            if isinstance(exc, asyncio.TimeoutError):
                raise Overloaded("the server is busy; request waited too long for admission",
                                 code="admission_timeout", retry_after_s=2) from exc
            raise

    def _leave(self, tenant: str) -> None:
        self.in_flight -= 1
        self._running[tenant] -= 1
        if not self._running[tenant]:
            del self._running[tenant]
        self._dispatch()

    def _drop(self, tenant: str, ticket: asyncio.Future[None]) -> None:
        queue = self._queues.get(tenant)
        if queue is not None and ticket in queue:
            queue.remove(ticket)
            if not queue:
                del self._queues[tenant]

    def _dispatch(self) -> None:
        """Hand free capacity to waiting tenants, one request each per round."""
        progress = True
        while progress and self.in_flight < self.max_in_flight:
            progress = False
            for tenant in list(self._queues):
                queue = self._queues[tenant]
                if not self._can_run(tenant):
                    continue
                ticket = queue.popleft()
                if not queue:
                    del self._queues[tenant]
                else:
                    self._queues.move_to_end(tenant)  # next round starts with the others
                self._grant(tenant)
                ticket.set_result(None)
                progress = True
                if self.in_flight >= self.max_in_flight:
                    return
