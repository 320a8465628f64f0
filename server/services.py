"""The gateway's long-lived parts, built from Settings, started and stopped together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from adapters.base_model import BaseModelInfo, ensure_default_model
from adapters.registry import Registry
from adapters.residency import Residency
from adapters.store import AdapterStore, LocalStore
from adapters.validation import AdapterLimits
from server.auth import TenantAuth
from server.engine.client import EngineClient
from server.engine.process import EngineProcess
from server.gateway import Gateway
from server.settings import Settings

log = logging.getLogger(__name__)

HEALTH_POLL_S = 2.0


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
    engine_process: EngineProcess | None = None
    engine_ready: bool = False
    engine_ready_event: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _background: set[asyncio.Task[None]] = field(default_factory=set)

    @classmethod
    def build(cls, settings: Settings, *, model_path: Path | None = None,
              engine_transport: httpx.AsyncBaseTransport | None = None) -> Services:
        settings.home.mkdir(parents=True, exist_ok=True)
        model_path = model_path or resolve_model_path(settings)
        registry = Registry(settings.registry_url)
        store = LocalStore(settings.store_dir)
        process = None
        engine_url = settings.engine_url
        if engine_url is None:
            process = EngineProcess(settings, model_path, settings.home / "logs" / "engine.log")
            engine_url = process.url
        engine = EngineClient(engine_url, settings.engine_request_timeout_s, engine_transport)
        residency = Residency(engine, settings.max_resident_adapters, settings.adapter_slot_wait_s)
        salt = read_or_create_secret(settings.home / "secret", secrets.token_hex(32))
        admin_token = settings.admin_token or read_or_create_secret(
            settings.home / "admin_token", "lpx-admin-" + secrets.token_urlsafe(24))
        gateway = Gateway(registry, store, residency, engine, settings.model_name, salt.encode())
        return cls(settings=settings, registry=registry, store=store,
                   base_info=BaseModelInfo.from_folder(model_path), engine=engine,
                   residency=residency, gateway=gateway, auth=TenantAuth(registry),
                   admin_token=admin_token,
                   limits=AdapterLimits(settings.max_lora_rank, settings.max_adapter_bytes),
                   engine_process=process)

    async def start(self) -> None:
        await self.registry.create_schema()
        if self.engine_process is not None:
            restarted = asyncio.Event()
            self._tasks.append(asyncio.create_task(self.engine_process.supervise(restarted)))
        self._tasks.append(asyncio.create_task(self._watch_engine()))

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

    def spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        """Run a coroutine in the background, keeping a reference until it ends."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _watch_engine(self) -> None:
        """Track engine health; when it comes (back) up, start from a clean adapter slate."""
        while True:
            healthy = await self.engine.healthy()
            if healthy and not self.engine_ready:
                await self._on_engine_up()
            if not healthy and self.engine_ready:
                log.warning("engine is down")
                self.engine_ready_event.clear()
            self.engine_ready = healthy
            if healthy:
                self.engine_ready_event.set()
            await asyncio.sleep(HEALTH_POLL_S)

    async def _on_engine_up(self) -> None:
        # Whatever was loaded before is unknown to this gateway (a restart of either side).
        self.residency.forget_all()
        try:
            for name in await self.engine.loaded_adapters():
                await self.engine.unload_adapter(name)
        except Exception:  # noqa: BLE001 - best effort; slots are reclaimed by LRU anyway
            log.warning("could not clear adapters left in the engine", exc_info=True)
        log.info("engine is ready at %s", self.engine.base_url)
