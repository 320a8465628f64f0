"""The engine's adapter slots as the gateway and the admin API see them.

One gateway process owns an engine's residency (`LocalSlots`: the LRU of `adapters.residency`
over the store's checked-out folders). When a unit runs several gateway processes, the others
use the owner's over a local socket (`server.slots_link.RemoteSlots`), so the engine's slots
are never double-booked, a load is never duplicated and an eviction never removes an adapter
that another process's request is using.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Protocol

from adapters.residency import Residency
from adapters.store import AdapterStore


class AdapterSlots(Protocol):
    def hold(self, engine_name: str, store_key: str) -> AbstractAsyncContextManager[None]:
        """Keep `engine_name` (stored under `store_key`) loaded in the engine for the body."""
        ...

    async def pin(self, engine_name: str, store_key: str) -> None:
        """Load it now and keep it loaded until `unpin`."""
        ...

    async def unpin(self, engine_name: str) -> None: ...

    async def retire(self, engine_name: str) -> None:
        """Unload a deleted adapter once no request holds it."""
        ...

    async def snapshot(self) -> dict[str, Any]:
        """Capacity, what is resident now and the load / hit / eviction counts."""
        ...


class LocalSlots:
    """The residency owned by this process: folders come from the store's checkout."""

    def __init__(self, residency: Residency, store: AdapterStore) -> None:
        self.residency = residency
        self.store = store

    def _fetch(self, store_key: str) -> tuple[Callable[[], Awaitable[Path]], Callable[[], None]]:
        async def fetch() -> Path:
            return await self.store.checkout(store_key)

        return fetch, lambda: self.store.release(store_key)

    def hold(self, engine_name: str, store_key: str) -> AbstractAsyncContextManager[None]:
        return self.residency.use(engine_name, *self._fetch(store_key))

    async def pin(self, engine_name: str, store_key: str) -> None:
        await self.residency.pin(engine_name, *self._fetch(store_key))

    async def unpin(self, engine_name: str) -> None:
        await self.residency.unpin(engine_name)

    async def retire(self, engine_name: str) -> None:
        await self.residency.retire(engine_name)

    async def snapshot(self) -> dict[str, Any]:
        return self.residency.snapshot()
