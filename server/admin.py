"""The admin API's logic, with no FastAPI in it: tenants, keys, adapter versions (registered
from an upload, a local folder or S3), pins, aliases, deletes, and the engine's state. It
answers with the wire objects of `server.protocol.admin`; the routers only call it.

Cached lookups need no care here: every registry change that could alter one drops this
gateway's caches when it commits (`Registry.on_change`), and other gateways' within a second.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from adapters.base_model import BaseModelInfo
from adapters.errors import InvalidInput
from adapters.registration import register_version
from adapters.registry import AdapterVersion, DeletedVersions, Registry
from adapters.s3.store import S3Store
from adapters.sources import AdapterSources, UploadedFile
from adapters.store import AdapterStore, exports_of
from adapters.validation import AdapterLimits
from server.engine.client import EngineClient
from server.engine.process import EngineProcess
from server.engine.readiness import EngineReadiness
from server.protocol.admin import (
    AdapterList,
    AdapterObject,
    AdapterVersionObject,
    AliasDeleted,
    AliasObject,
    CreatedKey,
    EngineStatus,
    KeyLimitsObject,
    KeyLimitsSet,
    KeyList,
    KeyObject,
    TenantLimitsObject,
    TenantLimitsSet,
    TenantList,
    TenantObject,
    VersionSource,
)
from server.protocol.common import Deleted
from server.slots import AdapterSlots

Spawn = Callable[[Coroutine[Any, Any, None]], None]


class AdminService:
    def __init__(self, *, registry: Registry, store: AdapterStore, sources: AdapterSources,
                 slots: AdapterSlots, readiness: EngineReadiness,
                 pin: Callable[[AdapterVersion], Awaitable[None]], base_info: BaseModelInfo,
                 limits: AdapterLimits, model_name: str, staging_root: Path,
                 engine: EngineClient, engine_process: EngineProcess | None,
                 spawn: Spawn) -> None:
        self.registry = registry
        self.store = store
        self.sources = sources
        self.slots = slots
        self.readiness = readiness
        self._pin = pin  # loads a version into the engine and keeps it there
        self.base_info = base_info
        self.limits = limits
        self.model_name = model_name
        self.staging_root = staging_root
        self.engine = engine
        self.engine_process = engine_process
        self._spawn = spawn

    # -- tenants -------------------------------------------------------------------------------

    async def create_tenant(self, tenant_id: str) -> TenantObject:
        return TenantObject.from_row(await self.registry.create_tenant(tenant_id))

    async def list_tenants(self) -> TenantList:
        return TenantList(data=[TenantObject.from_row(t) for t in await self.registry.list_tenants()])

    async def get_tenant(self, tenant_id: str) -> TenantObject:
        return TenantObject.from_row(await self.registry.get_tenant(tenant_id))

    async def delete_tenant(self, tenant_id: str) -> Deleted:
        """Delete the tenant, its keys and its adapters (unloaded once idle, files erased)."""
        self._retire(await self.registry.delete_tenant(tenant_id), exports_of(tenant_id))
        return Deleted(id=tenant_id, object="tenant")

    # -- keys ----------------------------------------------------------------------------------

    async def create_key(self, tenant_id: str, name: str | None) -> CreatedKey:
        """A new key; the secret is in this answer only (the registry keeps its hash)."""
        row, key = await self.registry.create_key(tenant_id, name)
        return CreatedKey(**KeyObject.from_row(row).model_dump(), key=key)

    async def list_keys(self, tenant_id: str) -> KeyList:
        return KeyList(data=[KeyObject.from_row(k) for k in await self.registry.list_keys(tenant_id)])

    async def revoke_key(self, tenant_id: str, key_id: str) -> KeyObject:
        return KeyObject.from_row(await self.registry.revoke_key(tenant_id, key_id))

    # -- limits --------------------------------------------------------------------------------

    async def get_tenant_limits(self, tenant_id: str) -> TenantLimitsObject:
        return TenantLimitsObject.from_row(await self.registry.get_tenant(tenant_id))

    async def set_tenant_limits(self, tenant_id: str, body: TenantLimitsSet) -> TenantLimitsObject:
        row = await self.registry.set_tenant_limits(tenant_id, body.limits(), body.weight)
        return TenantLimitsObject.from_row(row)

    async def get_key_limits(self, tenant_id: str, key_id: str) -> KeyLimitsObject:
        return KeyLimitsObject.from_row(await self.registry.get_key(tenant_id, key_id))

    async def set_key_limits(self, tenant_id: str, key_id: str,
                             body: KeyLimitsSet) -> KeyLimitsObject:
        row = await self.registry.set_key_limits(tenant_id, key_id, body.limits())
        return KeyLimitsObject.from_row(row)

    # -- adapter versions ----------------------------------------------------------------------

    async def register_upload(self, tenant: str, name: str,
                              files: Sequence[UploadedFile]) -> AdapterVersionObject:
        async with self._staging() as folder:
            source = await self.sources.save_upload(files, folder)
            return await self._register(tenant, name, folder, source)

    async def register_from(self, tenant: str, name: str,
                            body: VersionSource) -> AdapterVersionObject:
        async with self._staging() as folder:
            if body.source is not None:
                source = await self.sources.copy_s3(body.source, folder)
            elif body.path is not None:
                source = await self.sources.copy_local(body.path, folder)
            else:
                raise InvalidInput("send the adapter files as multipart/form-data, or JSON with "
                                   "'path' (a local folder) or 'source' (an s3:// folder)",
                                   param="path")
            return await self._register(tenant, name, folder, source)

    async def _register(self, tenant: str, name: str, folder: Path,
                        source: str) -> AdapterVersionObject:
        row = await register_version(self.registry, self.store, self.base_info, self.limits,
                                     tenant, name, folder, source, self.model_name)
        return AdapterVersionObject.from_row(row, tenant, name)

    @asynccontextmanager
    async def _staging(self) -> AsyncIterator[Path]:
        folder = self.staging_root / secrets.token_hex(8)
        folder.mkdir(parents=True)
        try:
            yield folder
        finally:
            await asyncio.to_thread(shutil.rmtree, folder, True)

    async def list_adapters(self, tenant: str) -> AdapterList:
        return AdapterList(data=[AdapterObject.from_row(a, tenant)
                                 for a in await self.registry.list_adapters(tenant)])

    async def get_adapter(self, tenant: str, name: str) -> AdapterObject:
        return AdapterObject.from_row(await self.registry.get_adapter(tenant, name), tenant)

    async def delete_adapter(self, tenant: str, name: str) -> Deleted:
        """Delete every version and alias (unloaded once idle, files erased)."""
        self._retire(await self.registry.delete_adapter(tenant, name), exports_of(tenant, name))
        return Deleted(id=name, object="adapter")

    async def get_version(self, tenant: str, name: str, version: int) -> AdapterVersionObject:
        row = await self.registry.get_version(tenant, name, version)
        return AdapterVersionObject.from_row(row, tenant, name)

    async def delete_version(self, tenant: str, name: str, version: int) -> Deleted:
        self._retire(await self.registry.delete_version(tenant, name, version),
                     exports_of(tenant, name, version))
        return Deleted(id=f"{name}@{version}", object="adapter_version")

    def _retire(self, deleted: DeletedVersions, exports: str) -> None:
        """Unload deleted versions once idle, then erase their files (the engine reads them)
        and their merged-model exports (the folders under `exports`)."""

        async def retire() -> None:
            for engine_name, key in zip(deleted.engine_names, deleted.store_keys, strict=True):
                await self.slots.retire(engine_name)
                await self.store.delete(key)
            await self.store.delete_prefix(exports)

        self._spawn(retire())

    # -- pins and aliases ----------------------------------------------------------------------

    async def pin(self, tenant: str, name: str, version: int) -> AdapterVersionObject:
        """Keep this version resident: loaded now (if the engine is up) and at every start.
        If it cannot be loaded now, the pin is rolled back and the error raised."""
        row = await self.registry.set_pinned(tenant, name, version, True)
        if self.readiness.ready:
            try:
                await self._pin(row)
            except BaseException:
                await self.registry.set_pinned(tenant, name, version, False)
                raise
        return AdapterVersionObject.from_row(row, tenant, name)

    async def unpin(self, tenant: str, name: str, version: int) -> AdapterVersionObject:
        row = await self.registry.set_pinned(tenant, name, version, False)
        await self.slots.unpin(row.engine_name)
        return AdapterVersionObject.from_row(row, tenant, name)

    async def set_alias(self, tenant: str, name: str, alias: str, version: int) -> AliasObject:
        row = await self.registry.set_alias(tenant, name, alias, version)
        return AliasObject(adapter=name, alias=alias, version=row.version)

    async def delete_alias(self, tenant: str, name: str, alias: str) -> AliasDeleted:
        await self.registry.delete_alias(tenant, name, alias)
        return AliasDeleted(adapter=name, alias=alias)

    # -- engine --------------------------------------------------------------------------------

    async def engine_status(self) -> EngineStatus:
        process = self.engine_process
        return EngineStatus(
            url=self.engine.base_url, ready=self.readiness.ready, spawned=process is not None,
            restarts=process.restarts if process else None,
            adapters=await self.slots.snapshot(), store=self.store.description,
            disk_cache=self.store.cache.snapshot() if isinstance(self.store, S3Store) else None)
