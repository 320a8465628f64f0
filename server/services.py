"""The gateway's long-lived parts, built from Settings, started and stopped together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from adapters.base_model import BaseModelInfo, ensure_default_model
from adapters.disk_cache import DiskCache
from adapters.registry import Registry
from adapters.residency import Residency
from adapters.s3_store import S3Store, parse_s3_uri
from adapters.store import AdapterStore, LocalStore
from adapters.training.jobs import STATUSES, JobStore
from adapters.validation import AdapterLimits
from server.admission import FairAdmission
from server.auth import TenantAuth
from server.engine.client import EngineClient
from server.engine.process import EngineProcess
from server.gateway import Gateway
from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger(__name__)

HEALTH_POLL_S = 2.0
TRAINING_POLL_S = 10.0
# How often the registry generation is read: changes made by another gateway or by a training
# worker (revoked keys, new versions, aliases, deletes) reach this gateway within this time.
REGISTRY_POLL_S = 1.0


def read_or_create_secret(path: Path, make: str) -> str:
    """A secret kept in the data folder (mode 0600), created on first use."""
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(make)
    tmp.rename(path)
    return make


def build_store(settings: Settings, metrics: Metrics | None = None) -> tuple[AdapterStore, str]:
    """The adapter store the settings name, and its `source` label ("s3" or "local")."""
    if not settings.uses_s3:
        return LocalStore(settings.store_dir), "local"
    assert settings.store is not None
    bucket, prefix = parse_s3_uri(settings.store)
    metrics = metrics or Metrics()
    cache = DiskCache(settings.cache_dir, settings.cache_max_bytes,
                      on_fetched=metrics.adapter_load_seconds.labels("disk", "s3").observe)
    store = S3Store(bucket, prefix, cache, endpoint_url=settings.s3_endpoint_url,
                    region=settings.s3_region, connect_timeout_s=settings.s3_connect_timeout_s,
                    read_timeout_s=settings.s3_read_timeout_s,
                    max_attempts=settings.s3_max_attempts)
    return store, "s3"


def resolve_model_path(settings: Settings) -> Path:
    return settings.model_path or ensure_default_model(settings.models_dir)


@dataclass
class Services:
    settings: Settings
    registry: Registry
    store: AdapterStore
    base_info: BaseModelInfo
    engine: EngineClient
    residency: Residency
    gateway: Gateway
    auth: TenantAuth
    admin_token: str
    limits: AdapterLimits
    metrics: Metrics
    jobs: JobStore
    model_path: Path
    engine_process: EngineProcess | None = None
    _tokenizer: Any = None
    engine_ready: bool = False
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _background: set[asyncio.Task[None]] = field(default_factory=set)

    @classmethod
    def build(cls, settings: Settings, *, model_path: Path | None = None,
              engine_transport: httpx.AsyncBaseTransport | None = None) -> Services:
        settings.home.mkdir(parents=True, exist_ok=True)
        model_path = model_path or resolve_model_path(settings)
        registry = Registry(settings.registry_url)
        metrics = Metrics()
        process = None
        engine_url = settings.engine_url
        if engine_url is None:
            process = EngineProcess(settings, model_path, settings.home / "logs" / "engine.log")
            engine_url = process.url
        engine = EngineClient(engine_url, settings.engine_request_timeout_s, engine_transport)
        store, source = build_store(settings, metrics)

        def on_residency_event(event: str, _name: str, seconds: float) -> None:
            if event == "load":
                metrics.adapter_load_seconds.labels("engine", source).observe(seconds)

        residency = Residency(engine, settings.max_resident_adapters, settings.adapter_slot_wait_s,
                              on_event=on_residency_event)
        tiers = {"engine": lambda: {**vars(residency.stats), "resident": len(residency)}}
        if isinstance(store, S3Store):
            tiers["disk"] = lambda: vars(store.cache.stats)
        metrics.watch_adapter_tiers(source, tiers)
        metrics.slot_waiting.set_function(lambda: residency.waiting)
        salt = read_or_create_secret(settings.home / "secret", secrets.token_hex(32))
        admin_token = settings.admin_token or read_or_create_secret(
            settings.home / "admin_token", "lpx-admin-" + secrets.token_urlsafe(24))
        admission = FairAdmission(settings.max_in_flight, settings.tenant_max_in_flight,
                                  settings.tenant_max_queue, settings.admission_wait_s)
        metrics.queued.set_function(lambda: admission.queued)
        gateway = Gateway(registry, store, residency, engine, settings.model_name, salt.encode(),
                          admission, on_token_gap=metrics.itl.observe)
        services = cls(settings=settings, registry=registry, store=store,
                       base_info=BaseModelInfo.from_folder(model_path), engine=engine,
                       residency=residency, gateway=gateway, auth=TenantAuth(registry),
                       admin_token=admin_token,
                       limits=AdapterLimits(settings.max_lora_rank, settings.max_adapter_bytes),
                       metrics=metrics, jobs=JobStore(registry, settings.home / "files"),
                       model_path=model_path, engine_process=process)
        gateway.on_engine_forgot = services.mark_engine_down
        return services

    async def start(self) -> None:
        await self.registry.create_schema()
        if self.engine_process is not None:
            self._tasks.append(asyncio.create_task(
                self.engine_process.supervise(on_restart=self._on_engine_exit)))
        self._tasks.append(asyncio.create_task(self._watch_engine()))
        self._tasks.append(asyncio.create_task(self._watch_training()))
        self._tasks.append(asyncio.create_task(self._watch_registry()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.engine_process is not None:
            await self.engine_process.stop()
        await self.engine.aclose()
        await self.registry.close()

    async def tokenizer(self) -> Any:
        """The base model's tokenizer (for dataset checks), loaded once on first use."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained,
                                                      str(self.model_path))
        return self._tokenizer

    def spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        """Run a coroutine in the background, keeping a reference until it ends."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _on_engine_exit(self) -> None:
        """The spawned engine died: stop sending it work now, not at the next health poll."""
        self.metrics.engine_restarts.inc()
        self.mark_engine_down()

    def mark_engine_down(self) -> None:
        """Treat the engine as down until the next health poll finds it answering; then
        `_watch_engine` starts from a clean adapter slate (and preloads pins), as after any
        restart."""
        if self.engine_ready:
            log.warning("engine is down")
        self.engine_ready = False
        self.metrics.engine_up.set(0)

    async def _watch_engine(self) -> None:
        """Track engine health; when it comes (back) up, start from a clean adapter slate."""
        while True:
            if await self.engine.healthy():
                if not self.engine_ready:
                    await self._on_engine_up()
                self.engine_ready = True
                self.metrics.engine_up.set(1)
            else:
                self.mark_engine_down()
            await asyncio.sleep(HEALTH_POLL_S)

    def forget_lookups(self) -> None:
        """Drop cached key and model lookups (the registry changed)."""
        self.auth.forget()
        self.gateway.forget_resolutions()

    async def _watch_registry(self) -> None:
        """Lookups are cached per gateway; drop them when the registry generation moves, so
        they can be kept long without a revoked key or a moved alias outliving the change."""
        seen: int | None = None
        while True:
            try:
                generation = await self.registry.generation()
                if seen is not None and generation != seen:
                    self.forget_lookups()
                seen = generation
            except Exception:  # noqa: BLE001 - keep serving from the caches; retry next poll
                log.warning("could not read the registry generation", exc_info=True)
            await asyncio.sleep(REGISTRY_POLL_S)

    async def _watch_training(self) -> None:
        """Refresh the training-job gauges (jobs live in the database, workers elsewhere)."""
        m = self.metrics
        while True:
            try:
                counts, progress = await self.jobs.status_counts()
                for status in STATUSES:
                    m.training_jobs.labels(status).set(counts.get(status, 0))
                m.training_progress.clear()  # only running jobs: bounded cardinality
                for job_id, share in progress.items():
                    m.training_progress.labels(job_id).set(share)
            except Exception:  # noqa: BLE001 - metrics must never take the gateway down
                log.warning("could not refresh training metrics", exc_info=True)
            await asyncio.sleep(TRAINING_POLL_S)

    async def _on_engine_up(self) -> None:
        # Whatever was loaded before is unknown to this gateway (a restart of either side).
        self.residency.forget_all()
        try:
            for name in await self.engine.loaded_adapters():
                await self.engine.unload_adapter(name)
        except Exception:  # noqa: BLE001 - best effort; slots are reclaimed by LRU anyway
            log.warning("could not clear adapters left in the engine", exc_info=True)
        log.info("engine is ready at %s", self.engine.base_url)
        for version in await self.registry.pinned_versions():
            try:
                await self.gateway.pin(version)
                log.info("preloaded pinned adapter %s", version.engine_name)
            except Exception:  # noqa: BLE001 - one bad pin must not keep the others out
                log.warning("could not preload %s", version.engine_name, exc_info=True)
