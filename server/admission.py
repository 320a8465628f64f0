"""Fair admission of tenant requests to the engine.

At most `max_in_flight` requests are forwarded at once, and at most `per_tenant` of one
tenant. Past that, requests wait in their tenant's FIFO queue, and freed capacity goes to the
waiting tenants by `policy`:

- `token_fair` (default): the Virtual Token Counter of Sheng et al., "Fairness in Serving
  Large Language Models" (OSDI 2024). Each tenant has a counter of the service it received:
  prompt tokens when a request is let in, plus `output_weight` x each generated token, divided
  by the tenant's weight. Freed capacity goes to the waiting tenant with the smallest counter,
  so a tenant sending few long prompts cannot crowd out one sending many short ones. A tenant
  that becomes active again is lifted to the smallest counter of those active, so idle time
  banks no credit. A lone tenant still gets every slot (work-conserving).
- `round_robin`: tenants in turn, one request each.
- `fifo`: arrival order, ignoring tenants (kept to measure what fairness buys).

A full tenant queue, or a wait past `wait_s`, answers 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

from adapters.errors import Overloaded

Policy = Literal["token_fair", "round_robin", "fifo"]


class FairAdmission:
    def __init__(self, max_in_flight: int, per_tenant: int, max_queue_per_tenant: int,
                 wait_s: float, policy: Policy = "token_fair",
                 output_weight: float = 2.0) -> None:
        self.max_in_flight = max_in_flight
        self.per_tenant = per_tenant
        self.max_queue = max_queue_per_tenant
        self.wait_s = wait_s
        self.policy = policy
        self.output_weight = output_weight
        self.in_flight = 0
        self._running: dict[str, int] = {}
        # tenant -> its waiting (arrival number, ticket, prompt cost), oldest first
        self._queues: OrderedDict[str, deque[tuple[int, asyncio.Future[None], float]]] = \
            OrderedDict()
        self._arrivals = itertools.count()
        self._counters: dict[str, float] = {}  # virtual token counters (token_fair)
        self._weights: dict[str, float] = {}

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def counter(self, tenant: str) -> float:
        """The tenant's virtual token counter (weighted tokens served)."""
        return self._counters.get(tenant, 0.0)

    @asynccontextmanager
    async def admit(self, tenant: str, prompt_tokens: float = 0.0,
                    weight: float = 1.0) -> AsyncIterator[None]:
        """Hold one of the engine's request slots for the body of the `with`. `prompt_tokens`
        is charged to the tenant's counter when it gets in (token_fair)."""
        self._weights[tenant] = weight if weight > 0 else 1.0
        await self._enter(tenant, prompt_tokens)
        try:
            yield
        finally:
            self._leave(tenant)

    def charge(self, tenant: str, prompt_tokens: float = 0.0,
               completion_tokens: float = 0.0) -> None:
        """Add service to the tenant's counter: generated tokens as they stream, or a
        correction of the prompt estimate charged at admission (may be negative)."""
        cost = prompt_tokens + self.output_weight * completion_tokens
        if cost:
            self._counters[tenant] = (self._counters.get(tenant, 0.0)
                                      + cost / self._weights.get(tenant, 1.0))

    def _active(self, tenant: str) -> bool:
        return tenant in self._running or tenant in self._queues

    def _lift(self, tenant: str) -> None:
        """A tenant becoming active starts no lower than the least-served active tenant."""
        others = [self.counter(t) for t in {*self._running, *self._queues} if t != tenant]
        if others:
            self._counters[tenant] = max(self.counter(tenant), min(others))

    def _can_run(self, tenant: str) -> bool:
        return (self.in_flight < self.max_in_flight
                and self._running.get(tenant, 0) < self.per_tenant)

    def _grant(self, tenant: str, prompt_tokens: float) -> None:
        self.in_flight += 1
        self._running[tenant] = self._running.get(tenant, 0) + 1
        self.charge(tenant, prompt_tokens)

    async def _enter(self, tenant: str, prompt_tokens: float) -> None:
        if not self._active(tenant):
            self._lift(tenant)
        if self._can_run(tenant) and not self._queues.get(tenant):
            self._grant(tenant, prompt_tokens)
            return
        queue = self._queues.setdefault(tenant, deque())
        if len(queue) >= self.max_queue:
            if not queue:
                del self._queues[tenant]
            raise Overloaded(f"tenant {tenant!r} has {len(queue)} requests waiting already",
                             code="tenant_queue_full", retry_after_s=1)
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append((next(self._arrivals), ticket, prompt_tokens))
        try:
            await asyncio.wait_for(asyncio.shield(ticket), self.wait_s)
        except BaseException as exc:  # cancellation too: the slot must be handed on
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
        if queue is None:
            return
        for entry in queue:
            if entry[1] is ticket:
                queue.remove(entry)
                break
        if not queue:
            del self._queues[tenant]

    def _next_tenant(self) -> str | None:
        """The waiting tenant that gets the next free slot, by policy."""
        ready = [t for t in self._queues if self._can_run(t)]
        if not ready:
            return None
        if self.policy == "round_robin":
            return ready[0]
        if self.policy == "fifo":
            return min(ready, key=lambda t: self._queues[t][0][0])
        return min(ready, key=lambda t: (self.counter(t), self._queues[t][0][0]))

    def _dispatch(self) -> None:
        """Hand free capacity to waiting tenants (work-conserving: while any can run)."""
        while self.in_flight < self.max_in_flight:
            tenant = self._next_tenant()
            if tenant is None:
                return
            queue = self._queues[tenant]
            _, ticket, prompt_tokens = queue.popleft()
            if not queue:
                del self._queues[tenant]
            else:
                self._queues.move_to_end(tenant)  # round_robin: the others go first next time
            self._grant(tenant, prompt_tokens)
            ticket.set_result(None)
