"""The composition root: every long-lived part of a gateway (or a training worker) built from
Settings, wired together once, started and stopped together. No logic of its own lives here:
serving is in `gateway`, the admin API in `admin`, fine-tuning in `fine_tuning`, background
loops in `watchers`, engine readiness in `engine.readiness`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from adapters.base_model import BaseModelInfo, ensure_default_model
from adapters.disk_cache import DiskCache
from adapters.errors import Unavailable
from adapters.registry import Registry
from adapters.registry.usage import UsageStore
from adapters.residency import Residency
from adapters.s3.store import S3Store
from adapters.s3.uris import parse_s3_uri
from adapters.sources import AdapterSources
from adapters.store import AdapterStore, LocalStore
from adapters.training.evaluator import GatewayEvaluator
from adapters.training.jobs import JobStore
from adapters.training.worker import Worker
from adapters.validation import AdapterLimits
from server.admin import AdminService
from server.admission import FairAdmission
from server.auth import TenantAuth
from server.engine.client import EngineClient
from server.engine.process import EngineProcess
from server.engine.readiness import EngineReadiness
from server.fine_tuning import FineTuningService
from server.gateway import Gateway
from server.metrics import Metrics
from server.quotas.counters import Counters, LocalCounters
from server.quotas.limiter import RateLimiter
from server.quotas.redis_counters import RedisCounters
from server.quotas.tokens import PromptTokens
from server.quotas.usage import UsageMeter
from server.settings import Settings
from server.slots import AdapterSlots, LocalSlots
from server.slots_link import RemoteSlots, SlotsServer
from server.watchers import (
    RegistryWatcher,
    start_from_clean_slate,
    watch_engine,
    watch_training,
)


def read_or_create_secret(path: Path, make: str) -> str:
    """A secret kept in the data folder (mode 0600), created on first use. Processes that
    start together (the units of `loraplex up --units N`) all get the one that was written
    first: it is linked into place, never renamed over another."""
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(make)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return path.read_text().strip()
    finally:
        tmp.unlink()
    return make


def shared_secrets(settings: Settings) -> tuple[str, str]:
    """(cache-salt secret, admin token), the same on every unit: from the settings (a fleet
    sets both from a Kubernetes Secret), else created once in the shared data folder."""
    salt = settings.cache_salt_secret or read_or_create_secret(
        settings.home / "secret", secrets.token_hex(32))
    admin_token = settings.admin_token or read_or_create_secret(
        settings.home / "admin_token", "lpx-admin-" + secrets.token_urlsafe(24))
    return salt, admin_token


def build_store(settings: Settings, metrics: Metrics | None = None) -> tuple[AdapterStore, str]:
    """The adapter store the settings name, and its `source` label ("s3" or "local")."""
    if settings.store is None or not settings.uses_s3:
        return LocalStore(settings.store_dir), "local"
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


def adapter_limits(settings: Settings) -> AdapterLimits:
    return AdapterLimits(settings.max_lora_rank, settings.max_adapter_bytes)


def tokenizer_loader(model_path: Path) -> Callable[[], Awaitable[Any]]:
    """Loads the base model's tokenizer (for dataset checks) once, on first use. Importing
    transformers takes seconds: that happens in the worker thread too, off the event loop."""
    loaded: list[Any] = []
    once = asyncio.Lock()

    def read() -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model_path))

    async def load() -> Any:
        async with once:
            if not loaded:
                loaded.append(await asyncio.to_thread(read))
        return loaded[0]

    return load


class Background:
    """Fire-and-forget tasks (retiring deleted versions, validating job files), each kept
    referenced until it ends so it is not garbage-collected mid-way."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def pending(self) -> list[asyncio.Task[None]]:
        return list(self._tasks)


def build_counters(settings: Settings) -> Counters:
    """The rate-limit counters: shared by every unit in Redis, or this process's own."""
    if settings.redis_url is None:
        return LocalCounters()
    return RedisCounters(settings.redis_url, timeout_s=settings.redis_timeout_s)


def build_worker(settings: Settings, registry: Registry, model_path: Path) -> Worker:
    """A training worker (`loraplex worker`): the registry, the store and the base model, no
    engine and no gateway."""
    store, _ = build_store(settings)
    # End-of-job evaluations run through the serving engine: a gateway's admin API.
    evaluator = GatewayEvaluator(settings.gateway_base_url, shared_secrets(settings)[1],
                                 settings.evaluation_timeout_s)
    return Worker(JobStore(registry, store), registry, store, model_path,
                  BaseModelInfo.from_folder(model_path), adapter_limits(settings),
                  settings.model_name, settings.home / "training", lease_s=settings.worker_lease_s,
                  evaluator=evaluator)


@dataclass
class Services:
    settings: Settings
    registry: Registry
    store: AdapterStore
    engine: EngineClient
    readiness: EngineReadiness
    residency: Residency  # used by the slots' owner only (see `slots`)
    slots: AdapterSlots
    slots_server: SlotsServer | None
    gateway: Gateway
    auth: TenantAuth
    admin: AdminService
    fine_tuning: FineTuningService
    jobs: JobStore
    metrics: Metrics
    admin_token: str
    model_path: Path
    registry_watcher: RegistryWatcher
    usage_store: UsageStore
    usage: UsageMeter
    engine_process: EngineProcess | None = None
    background: Background = field(default_factory=Background)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

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
            process = EngineProcess(settings, model_path, settings.engine_log_path,
                                    settings.engine_pid_path)
            engine_url = process.url
        engine = EngineClient(engine_url, settings.engine_request_timeout_s, engine_transport)
        readiness = EngineReadiness(metrics.engine_up)
        store, source = build_store(settings, metrics)

        def on_residency_event(event: str, _name: str, seconds: float) -> None:
            if event == "load":
                metrics.adapter_load_seconds.labels("engine", source).observe(seconds)

        residency = Residency(engine, settings.max_resident_adapters, settings.adapter_slot_wait_s,
                              on_event=on_residency_event)
        local_slots = LocalSlots(residency, store)
        slots: AdapterSlots = local_slots
        slots_server = None
        if settings.gateway_process_index == 0:  # this process owns the engine's slots
            tiers = {"engine": lambda: {**vars(residency.stats), "resident": len(residency)}}
            if isinstance(store, S3Store):
                tiers["disk"] = lambda: vars(store.cache.stats)
            metrics.watch_adapter_tiers(source, tiers, lambda: residency.waiting)
            if settings.gateway_processes > 1:
                slots_server = SlotsServer(local_slots, settings.slots_socket_path,
                                           metrics.residency_exposition)
        else:  # another process of this unit owns them; `residency` stays unused here
            slots = RemoteSlots(settings.slots_socket_path)
        salt, admin_token = shared_secrets(settings)
        admission = FairAdmission(settings.max_in_flight, settings.tenant_max_in_flight,
                                  settings.tenant_max_queue, settings.admission_wait_s,
                                  settings.admission_policy, settings.fair_output_token_weight)
        metrics.watch_queue(lambda: admission.queued)
        background = Background()
        counters = build_counters(settings)
        limiter = RateLimiter(
            counters, PromptTokens(model_path), settings.max_model_len, background.spawn,
            fail_open=settings.ratelimit_failure_mode == "open",
            on_backend_error=metrics.ratelimit_backend_errors.inc,
            on_rejected=lambda tenant, kind: metrics.ratelimit_rejections.labels(
                tenant, kind).inc())
        gateway = Gateway(registry, slots, engine, readiness, settings.model_name,
                          salt.encode(), admission, limiter, on_token_gap=metrics.itl.observe)
        base_info = BaseModelInfo.from_folder(model_path)
        jobs = JobStore(registry, store)
        auth = TenantAuth(registry)

        def forget_lookups() -> None:
            auth.forget()
            gateway.forget_resolutions()

        registry_watcher = RegistryWatcher(registry, forget_lookups, settings.registry_poll_s)
        sources = AdapterSources(
            local_allowlist=settings.local_source_allowlist,
            s3_allowlist=settings.s3_source_allowlist, max_bytes=settings.max_adapter_bytes,
            s3_client=store.client if isinstance(store, S3Store) else None)
        admin = AdminService(
            registry=registry, store=store, sources=sources, slots=slots,
            readiness=readiness, pin=gateway.pin, base_info=base_info,
            limits=adapter_limits(settings), model_name=settings.model_name,
            staging_root=settings.home / "tmp", engine=engine, engine_process=process,
            spawn=background.spawn)
        fine_tuning = FineTuningService(jobs, settings, base_info, tokenizer_loader(model_path),
                                        background.spawn)
        usage_store = UsageStore(registry)
        meter = UsageMeter(usage_store)
        metrics.watch_usage_meter(lambda: {"pending": meter.pending,
                                           "failed_flushes": meter.failed_flushes,
                                           "dropped_requests": meter.dropped_requests})
        services = cls(settings=settings, registry=registry, store=store, engine=engine,
                       readiness=readiness, residency=residency, slots=slots,
                       slots_server=slots_server, gateway=gateway,
                       auth=auth, admin=admin, fine_tuning=fine_tuning,
                       jobs=jobs, metrics=metrics, admin_token=admin_token,
                       model_path=model_path, engine_process=process, background=background,
                       registry_watcher=registry_watcher, usage_store=usage_store,
                       usage=meter)
        registry.on_change(services.registry_watcher.changed_here)
        return services

    async def start(self) -> None:
        await self.registry.create_schema()
        s = self.settings
        if self.slots_server is not None:
            await self.slots_server.start()
        if self.engine_process is not None:
            self._run(self.engine_process.supervise(on_restart=self._on_engine_exit))
        self._run(watch_engine(self.engine, self.readiness, self._on_engine_up,
                               s.engine_health_poll_s))
        self._run(self.registry_watcher.run())
        self._run(watch_training(self.jobs, self.metrics, s.training_metrics_poll_s))
        self._run(self.usage.run(s.usage_flush_s))
        self.background.spawn(self.fine_tuning.resume_validation())

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.engine_process is not None:
            await self.engine_process.stop()
        if self.slots_server is not None:
            await self.slots_server.close()
        if isinstance(self.slots, RemoteSlots):
            await self.slots.aclose()
        await self.engine.aclose()
        await self.gateway.limiter.counters.close()
        await self.usage.close()  # the last flush: a graceful stop loses no usage
        await self.registry.close()

    def forget_lookups(self) -> None:
        """Drop cached key and model lookups (the registry changed)."""
        self.registry_watcher.forget_lookups()

    def _run(self, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.append(asyncio.create_task(coro))

    def _on_engine_exit(self) -> None:
        """The spawned engine died: stop sending it work now, not at the next health poll."""
        self.metrics.engine_restarts.inc()
        self.readiness.mark_down("the engine process exited")

    async def residency_metrics(self) -> bytes:
        """The adapter slots' part of a scrape, from their owner (this process or another)."""
        if isinstance(self.slots, RemoteSlots):
            try:
                return await self.slots.metrics_text()
            except Unavailable:
                return b""  # the owner is restarting: the rest of the scrape still counts
        return self.metrics.residency_exposition()

    async def _on_engine_up(self) -> None:
        if self.settings.gateway_process_index != 0:
            return  # the slots' owner clears the engine and preloads the pins
        await start_from_clean_slate(self.engine, self.residency, self.registry, self.gateway.pin)
