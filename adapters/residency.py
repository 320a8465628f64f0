"""Which adapter versions are loaded in the engine: an LRU over engine slots with pins.

A request holds its adapter for its whole life (`use`). Loading happens on first use, once
for any number of concurrent first requests (single flight). When every slot is taken, the
least recently used adapter that no request holds is unloaded to make room; if all are held,
the request waits for one to be released, up to `slot_wait_s`, then gets Overloaded.

Eviction and its side effect (the engine unload) live together here, as in vLLM's
`LRUCacheLoRAModelManager._on_remove`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from adapters.errors import Conflict, Overloaded

log = logging.getLogger(__name__)


class AdapterLoader(Protocol):
    """The engine side of residency (the vLLM runtime LoRA API)."""

    async def load_adapter(self, engine_name: str, path: Path) -> None: ...

    async def unload_adapter(self, engine_name: str) -> None: ...


class SlotState(enum.Enum):
    LOADING = "loading"
    READY = "ready"


@dataclass
class _Slot:
    engine_name: str
    state: SlotState = SlotState.LOADING
    users: int = 0
    loaded: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())
    last_used: float = field(default_factory=time.monotonic)
    load_seconds: float | None = None
    release: Callable[[], None] | None = None  # gives back what `fetch` checked out


@dataclass
class ResidencyStats:
    hits: int = 0
    loads: int = 0
    load_failures: int = 0
    evictions: int = 0
    unloads: int = 0


def _release(slot: _Slot) -> None:
    release, slot.release = slot.release, None  # at most once per load
    if release is not None:
        release()


class Residency:
    def __init__(self, loader: AdapterLoader, capacity: int, slot_wait_s: float,
                 on_event: Callable[[str, str, float], None] = lambda _e, _n, _s: None) -> None:
        self._loader = loader
        self.capacity = capacity
        self._slot_wait_s = slot_wait_s
        self._slots: OrderedDict[str, _Slot] = OrderedDict()  # least recently used first
        self._changed = asyncio.Condition()
        self._on_event = on_event  # (event, engine_name, seconds) for metrics
        self.stats = ResidencyStats()
        self.waiting = 0  # requests waiting for a slot right now
        self._pinned: set[str] = set()
        self._unloading: set[str] = set()  # evicted or retired, engine unload in flight

    @asynccontextmanager
    async def use(self, engine_name: str, fetch: Callable[[], Awaitable[Path]],
                  release: Callable[[], None] = lambda: None) -> AsyncIterator[None]:
        """Hold `engine_name` loaded for the body. If it must be loaded, `fetch` gives its
        folder, and `release` is called once the engine has unloaded it."""
        slot = await self._acquire(engine_name, fetch, release)
        try:
            yield
        finally:
            slot.users -= 1
            slot.last_used = time.monotonic()
            async with self._changed:
                self._changed.notify_all()

    async def _acquire(self, engine_name: str, fetch: Callable[[], Awaitable[Path]],
                       release: Callable[[], None]) -> _Slot:
        deadline = time.monotonic() + self._slot_wait_s
        async with self._changed:
            while True:
                slot = self._slots.get(engine_name)
                if slot is not None:
                    slot.users += 1
                    if slot.state is SlotState.READY:
                        self.stats.hits += 1
                        self._on_event("hit", engine_name, 0.0)
                    self._slots.move_to_end(engine_name)
                    break
                if engine_name in self._unloading:
                    # Its eviction is still going on in the engine: load it again after.
                    await self._changed.wait()
                    continue
                victim = None
                if len(self._slots) >= self.capacity:
                    victim = next((s for s in self._slots.values()
                                   if s.users == 0 and s.state is SlotState.READY), None)
                    if victim is None:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            raise Overloaded(
                                f"all {self.capacity} adapter slots are in use; retry shortly",
                                code="adapter_slots_busy", retry_after_s=1)
                        self.waiting += 1
                        try:
                            with suppress(asyncio.TimeoutError):
                                await asyncio.wait_for(self._changed.wait(), remaining)
                        finally:
                            self.waiting -= 1
                        continue
                    del self._slots[victim.engine_name]
                    self._unloading.add(victim.engine_name)
                slot = _Slot(engine_name, users=1)
                self._slots[engine_name] = slot
                # Only this caller loads; the others wait on `slot.loaded` below.
                asyncio.get_running_loop().create_task(self._load(slot, victim, fetch, release))
                break
        try:
            await asyncio.shield(slot.loaded)
        except BaseException:
            slot.users -= 1
            raise
        return slot

    async def _load(self, slot: _Slot, victim: _Slot | None,
                    fetch: Callable[[], Awaitable[Path]], release: Callable[[], None]) -> None:
        # Runs as its own task: a cancelled first request must not strand the others.
        started = time.monotonic()
        try:
            if victim is not None:
                self.stats.evictions += 1
                self._on_event("eviction", victim.engine_name, 0.0)
                await self._unload(victim)
            path = await fetch()
            slot.release = release
            await self._loader.load_adapter(slot.engine_name, path)
        except BaseException as exc:  # noqa: BLE001 - any failure, cancellation too, goes to the waiters
            self.stats.load_failures += 1
            self._on_event("load_failure", slot.engine_name, time.monotonic() - started)
            _release(slot)
            async with self._changed:
                if self._slots.get(slot.engine_name) is slot:
                    del self._slots[slot.engine_name]
                self._changed.notify_all()
            slot.loaded.set_exception(exc)
            slot.loaded.exception()  # mark retrieved: waiters may all have gone
            return
        slot.load_seconds = time.monotonic() - started
        slot.state = SlotState.READY
        self.stats.loads += 1
        self._on_event("load", slot.engine_name, slot.load_seconds)
        slot.loaded.set_result(None)
        async with self._changed:
            self._changed.notify_all()

    async def _unload(self, slot: _Slot) -> None:
        """Unload a slot already taken out of `_slots` (and put in `_unloading`)."""
        try:
            await self._loader.unload_adapter(slot.engine_name)
            self.stats.unloads += 1
        except Exception:  # the engine may have restarted and forgotten it
            log.warning("unloading %s from the engine failed", slot.engine_name, exc_info=True)
        finally:
            _release(slot)
            async with self._changed:
                self._unloading.discard(slot.engine_name)
                self._changed.notify_all()

    async def pin(self, engine_name: str, fetch: Callable[[], Awaitable[Path]],
                  release: Callable[[], None] = lambda: None) -> None:
        """Load `engine_name` now and keep it resident until `unpin` (preloaded adapters).

        At least one slot always stays unpinned, so every other adapter can still be served.
        """
        if engine_name in self._pinned:
            return
        if len(self._pinned) + 1 >= self.capacity:
            raise Conflict(f"at most {self.capacity - 1} adapters can be pinned "
                           f"({self.capacity} engine slots)", code="too_many_pinned")
        self._pinned.add(engine_name)
        try:
            await self._acquire(engine_name, fetch, release)  # held until unpin
        except BaseException:
            self._pinned.discard(engine_name)
            raise

    async def unpin(self, engine_name: str) -> None:
        if engine_name not in self._pinned:
            return
        self._pinned.discard(engine_name)
        slot = self._slots.get(engine_name)
        if slot is not None:
            slot.users -= 1
            async with self._changed:
                self._changed.notify_all()

    async def retire(self, engine_name: str) -> None:
        """Unload an adapter that was deleted, once no request holds it."""
        await self.unpin(engine_name)
        async with self._changed:
            slot = self._slots.get(engine_name)
            if slot is None:
                return
            await self._changed.wait_for(lambda: slot.users == 0 and slot.loaded.done())
            if self._slots.get(engine_name) is not slot:
                return
            del self._slots[engine_name]
            if slot.state is not SlotState.READY:
                self._changed.notify_all()
                return
            self._unloading.add(engine_name)
        await self._unload(slot)

    def __len__(self) -> int:
        return len(self._slots)

    def forget_all(self) -> None:
        """The engine restarted: nothing is loaded in it any more (pins included)."""
        self._pinned.clear()
        for slot in self._slots.values():
            _release(slot)
        self._slots.clear()

    def snapshot(self) -> dict[str, object]:
        now = time.monotonic()
        return {
            "capacity": self.capacity,
            "resident": [
                {"engine_name": s.engine_name, "state": s.state.value, "in_flight": s.users,
                 "idle_seconds": round(now - s.last_used, 3), "load_seconds": s.load_seconds,
                 "pinned": s.engine_name in self._pinned}
                for s in self._slots.values()
            ],
            "stats": vars(self.stats).copy(),
        }
