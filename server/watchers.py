"""Background loops of a gateway: engine health, registry generation, training-job gauges.

Each is a coroutine that runs until cancelled, started and stopped by `Services`. None of
them may take the gateway down: a failure is logged and retried at the next poll.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from adapters.registry import AdapterVersion, Registry
from adapters.residency import Residency
from adapters.training.jobs import JobStatus, JobStore
from server.engine.client import EngineClient
from server.engine.readiness import EngineReadiness
from server.metrics import Metrics

log = logging.getLogger(__name__)


async def watch_engine(engine: EngineClient, readiness: EngineReadiness,
                       on_up: Callable[[], Awaitable[None]], poll_s: float) -> None:
    """Track engine health; each time it comes (back) up, run `on_up` before taking work."""
    while True:
        if await engine.healthy():
            if not readiness.ready:
                await on_up()
            readiness.mark_up()
        else:
            readiness.mark_down("the health check failed")
        await asyncio.sleep(poll_s)


async def start_from_clean_slate(engine: EngineClient, residency: Residency, registry: Registry,
                                 pin: Callable[[AdapterVersion], Awaitable[None]]) -> None:
    """The engine (re)started or this gateway did: what was loaded before is unknown here, so
    unload whatever the engine holds and preload the pinned versions again."""
    residency.forget_all()
    try:
        for name in await engine.loaded_adapters():
            await engine.unload_adapter(name)
    except Exception:  # best effort; slots are reclaimed by LRU anyway
        log.warning("could not clear adapters left in the engine", exc_info=True)
    log.info("engine is ready at %s", engine.base_url)
    for version in await registry.pinned_versions():
        try:
            await pin(version)
            log.info("preloaded pinned adapter %s", version.engine_name)
        except Exception:  # one bad pin must not keep the others out
            log.warning("could not preload %s", version.engine_name, exc_info=True)


class RegistryWatcher:
    """Lookups are cached per gateway; they are dropped whenever the registry generation moves:
    at once for a change committed by this process (`changed_here`, a `Registry.on_change`
    listener), within `poll_s` for one made by another gateway or a training worker (`run`).
    So they can be kept long without a revoked key or a moved alias outliving the change."""

    def __init__(self, registry: Registry, forget_lookups: Callable[[], None],
                 poll_s: float) -> None:
        self.registry = registry
        self.forget_lookups = forget_lookups
        self.poll_s = poll_s
        self.seen: int | None = None  # the newest generation the caches reflect

    def changed_here(self, generation: int) -> None:
        self.forget_lookups()
        # The poll that reads this generation must not drop the caches a second time.
        self._saw(generation)

    async def run(self) -> None:
        while True:
            try:
                generation = await self.registry.generation()
                if self.seen is not None and generation > self.seen:
                    self.forget_lookups()
                self._saw(generation)
            except Exception:
                log.warning("could not read the registry generation", exc_info=True)
            await asyncio.sleep(self.poll_s)

    def _saw(self, generation: int) -> None:
        self.seen = generation if self.seen is None else max(self.seen, generation)


async def watch_training(jobs: JobStore, metrics: Metrics, poll_s: float) -> None:
    """Refresh the training-job gauges (jobs live in the database, workers elsewhere)."""
    while True:
        try:
            counts, progress = await jobs.status_counts()
            for status in JobStatus:
                metrics.training_jobs.labels(status.value).set(counts.get(status.value, 0))
            metrics.training_progress.clear()  # only running jobs: bounded cardinality
            for job_id, share in progress.items():
                metrics.training_progress.labels(job_id).set(share)
        except Exception:  # metrics must never take the gateway down
            log.warning("could not refresh training metrics", exc_info=True)
        await asyncio.sleep(poll_s)
