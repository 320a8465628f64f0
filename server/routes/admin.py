"""The admin API: tenants, keys, adapters, versions, aliases and engine residency."""

from __future__ import annotations

import asyncio
import secrets
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from adapters.errors import AdapterInvalid, Forbidden, InvalidInput
from adapters.registration import register_version
from adapters.registry import (
    Adapter,
    AdapterVersion,
    ApiKey,
    DeletedVersions,
    Tenant,
    timestamp,
)
from adapters.s3.store import S3Store
from adapters.validation import (
    ADAPTER_FILES,
    IGNORED_FILES,
    PICKLE_SUFFIXES,
    check_file_names,
)
from server.deps import AdminDep, ServicesDep, parse_json
from server.services import Services

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TenantCreate(_Body):
    id: str = Field(min_length=1, max_length=64)


class KeyCreate(_Body):
    name: str | None = Field(default=None, max_length=128)


class VersionSource(_Body):
    path: str | None = Field(default=None, max_length=4096)
    source: str | None = Field(default=None, max_length=4096)


class AliasSet(_Body):
    version: int = Field(ge=1)


# -- tenants -------------------------------------------------------------------------------

@router.post("/tenants", status_code=201)
async def create_tenant(request: Request, services: ServicesDep) -> dict[str, Any]:
    body = await parse_json(request, TenantCreate)
    return _tenant(await services.registry.create_tenant(body.id))


@router.get("/tenants")
async def list_tenants(services: ServicesDep) -> dict[str, Any]:
    return {"object": "list", "data": [_tenant(t) for t in await services.registry.list_tenants()]}


@router.get("/tenants/{tenant}")
async def get_tenant(tenant: str, services: ServicesDep) -> dict[str, Any]:
    return _tenant(await services.registry.get_tenant(tenant))


@router.delete("/tenants/{tenant}")
async def delete_tenant(tenant: str, services: ServicesDep) -> dict[str, Any]:
    deleted = await services.registry.delete_tenant(tenant)
    _retire(services, deleted)
    services.auth.forget()
    return {"id": tenant, "deleted": True}


# -- keys ----------------------------------------------------------------------------------

@router.post("/tenants/{tenant}/keys", status_code=201)
async def create_key(tenant: str, request: Request, services: ServicesDep) -> dict[str, Any]:
    body = await parse_json(request, KeyCreate) if await request.body() else KeyCreate()
    row, key = await services.registry.create_key(tenant, body.name)
    return {**_key(row), "key": key}


@router.get("/tenants/{tenant}/keys")
async def list_keys(tenant: str, services: ServicesDep) -> dict[str, Any]:
    return {"object": "list", "data": [_key(k) for k in await services.registry.list_keys(tenant)]}


@router.delete("/tenants/{tenant}/keys/{key_id}")
async def revoke_key(tenant: str, key_id: str, services: ServicesDep) -> dict[str, Any]:
    row = await services.registry.revoke_key(tenant, key_id)
    services.auth.forget()
    return _key(row)


# -- adapters and versions -----------------------------------------------------------------

@router.post("/tenants/{tenant}/adapters/{name}/versions", status_code=201)
async def create_version(tenant: str, name: str, request: Request,
                         services: ServicesDep) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "")
    async with _staging(services) as folder:
        if content_type.startswith("multipart/form-data"):
            await _receive_upload(request, folder)
            source = "upload"
        else:
            body = await parse_json(request, VersionSource)
            source = await _copy_from_source(services, body, folder)
        row = await register_version(services.registry, services.store, services.base_info,
                                     services.limits, tenant, name, folder, source,
                                     services.settings.model_name)
    services.gateway.forget_resolutions()
    return _version(row, tenant, name)


@router.get("/tenants/{tenant}/adapters")
async def list_adapters(tenant: str, services: ServicesDep) -> dict[str, Any]:
    adapters = await services.registry.list_adapters(tenant)
    return {"object": "list", "data": [_adapter(a, tenant) for a in adapters]}


@router.get("/tenants/{tenant}/adapters/{name}")
async def get_adapter(tenant: str, name: str, services: ServicesDep) -> dict[str, Any]:
    return _adapter(await services.registry.get_adapter(tenant, name), tenant)


@router.delete("/tenants/{tenant}/adapters/{name}")
async def delete_adapter(tenant: str, name: str, services: ServicesDep) -> dict[str, Any]:
    deleted = await services.registry.delete_adapter(tenant, name)
    _retire(services, deleted)
    return {"id": name, "deleted": True}


@router.get("/tenants/{tenant}/adapters/{name}/versions/{version}")
async def get_version(tenant: str, name: str, version: int,
                      services: ServicesDep) -> dict[str, Any]:
    return _version(await services.registry.get_version(tenant, name, version), tenant, name)


@router.delete("/tenants/{tenant}/adapters/{name}/versions/{version}")
async def delete_version(tenant: str, name: str, version: int,
                         services: ServicesDep) -> dict[str, Any]:
    deleted = await services.registry.delete_version(tenant, name, version)
    _retire(services, deleted)
    return {"id": f"{name}@{version}", "deleted": True}


@router.put("/tenants/{tenant}/adapters/{name}/versions/{version}/pin")
async def pin_version(tenant: str, name: str, version: int,
                      services: ServicesDep) -> dict[str, Any]:
    """Preload this version now and at every engine start, and keep it resident."""
    row = await services.registry.set_pinned(tenant, name, version, True)
    if services.engine_ready:
        try:
            await services.gateway.pin(row)
        except BaseException:
            await services.registry.set_pinned(tenant, name, version, False)
            raise
    return _version(row, tenant, name)


@router.delete("/tenants/{tenant}/adapters/{name}/versions/{version}/pin")
async def unpin_version(tenant: str, name: str, version: int,
                        services: ServicesDep) -> dict[str, Any]:
    row = await services.registry.set_pinned(tenant, name, version, False)
    await services.residency.unpin(row.engine_name)
    return _version(row, tenant, name)


@router.put("/tenants/{tenant}/adapters/{name}/aliases/{alias}")
async def set_alias(tenant: str, name: str, alias: str, request: Request,
                    services: ServicesDep) -> dict[str, Any]:
    body = await parse_json(request, AliasSet)
    row = await services.registry.set_alias(tenant, name, alias, body.version)
    services.gateway.forget_resolutions()
    return {"adapter": name, "alias": row.alias, "version": row.version}


@router.delete("/tenants/{tenant}/adapters/{name}/aliases/{alias}")
async def delete_alias(tenant: str, name: str, alias: str,
                       services: ServicesDep) -> dict[str, Any]:
    await services.registry.delete_alias(tenant, name, alias)
    services.gateway.forget_resolutions()
    return {"adapter": name, "alias": alias, "deleted": True}


# -- engine --------------------------------------------------------------------------------

@router.get("/engine")
async def engine_status(services: ServicesDep) -> dict[str, Any]:
    process = services.engine_process
    return {
        "url": services.engine.base_url,
        "ready": services.engine_ready,
        "spawned": process is not None,
        "restarts": process.restarts if process else None,
        "adapters": services.residency.snapshot(),
        "store": services.store.description,
        "disk_cache": (services.store.cache.snapshot()
                       if isinstance(services.store, S3Store) else None),
    }


# -- helpers -------------------------------------------------------------------------------

def _retire(services: Services, deleted: DeletedVersions) -> None:
    """Unload deleted versions once idle, then erase their files (the engine reads them)."""
    services.gateway.forget_resolutions()

    async def retire() -> None:
        for engine_name, key in zip(deleted.engine_names, deleted.store_keys, strict=True):
            await services.residency.retire(engine_name)
            await services.store.delete(key)

    services.spawn(retire())


@asynccontextmanager
async def _staging(services: Services) -> AsyncIterator[Path]:
    folder = services.settings.home / "tmp" / secrets.token_hex(8)
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        await asyncio.to_thread(shutil.rmtree, folder, True)


async def _receive_upload(request: Request, folder: Path) -> None:
    form = await request.form(max_files=8, max_fields=8)
    try:
        parts: list[tuple[str, UploadFile]] = []
        for field_name, value in form.multi_items():
            if not isinstance(value, UploadFile):
                raise InvalidInput(f"form field {field_name!r} is not a file; send one file "
                                   "part per adapter file", param=field_name)
            known = ADAPTER_FILES + IGNORED_FILES
            parts.append((field_name if field_name in known else (value.filename or field_name),
                          value))
        names = [n for n, _ in parts]
        problems = check_file_names(names)
        problems += [f"file {n!r} sent twice" for n in sorted(set(names)) if names.count(n) > 1]
        if problems:
            raise AdapterInvalid(problems)
        for name, upload in parts:
            if name in ADAPTER_FILES:
                await asyncio.to_thread(_save_upload, upload, folder / name)
    finally:
        await form.close()


def _save_upload(upload: UploadFile, target: Path) -> None:
    upload.file.seek(0)
    with target.open("wb") as out:
        shutil.copyfileobj(upload.file, out, 1 << 20)


async def _copy_from_source(services: Services, body: VersionSource, folder: Path) -> str:
    if body.source is not None:
        if not isinstance(services.store, S3Store):
            raise InvalidInput("registration from s3:// needs an S3 store (LORAPLEX_STORE=s3://...)",
                               param="source", code="unsupported_source")
        await services.store.download_source(body.source, folder,
                                              services.settings.s3_source_allowlist,
                                              max_bytes=services.settings.max_adapter_bytes)
        return body.source
    if body.path is None:
        raise InvalidInput("send the adapter files as multipart/form-data, or JSON with "
                           "'path' (a local folder)", param="path")
    path = Path(body.path).resolve()
    roots = [root.resolve() for root in services.settings.local_source_allowlist]
    if not any(path.is_relative_to(root) for root in roots):
        raise Forbidden(f"{body.path!r} is not under a folder in LORAPLEX_LOCAL_SOURCE_ALLOWLIST",
                        param="path", code="source_not_allowed")
    if not path.is_dir():
        raise InvalidInput(f"{body.path!r} is not a folder", param="path")
    names = [p.name for p in path.iterdir()
             if p.name in ADAPTER_FILES or (p.name.startswith("adapter_model")
                                            and p.name.endswith(PICKLE_SUFFIXES))]
    problems = check_file_names(names)
    # A symlinked file could pull in a file from outside the allow-listed folder.
    problems += [f"{n} is a symbolic link; copy the file itself" for n in names
                 if (path / n).is_symlink()]
    if problems:
        raise AdapterInvalid(problems)
    for name in ADAPTER_FILES:
        await asyncio.to_thread(shutil.copyfile, path / name, folder / name)
    return f"file://{path}"


def _tenant(t: Tenant) -> dict[str, Any]:
    return {"id": t.id, "object": "tenant", "created_at": timestamp(t.created_at)}


def _key(k: ApiKey) -> dict[str, Any]:
    return {"id": k.id, "object": "api_key", "tenant": k.tenant_id, "name": k.name,
            "prefix": k.prefix, "created_at": timestamp(k.created_at),
            "revoked_at": timestamp(k.revoked_at) if k.revoked_at else None}


def _version(v: AdapterVersion, tenant: str, name: str) -> dict[str, Any]:
    return {"object": "adapter_version", "tenant": tenant, "adapter": name, "version": v.version,
            "model": f"{name}@{v.version}", "engine_name": v.engine_name,
            "store_key": v.store_key, "rank": v.rank,
            "alpha": v.alpha, "target_modules": v.target_modules, "base_model": v.base_model,
            "size_bytes": v.size_bytes, "sha256": v.sha256, "source": v.source,
            "pinned": v.pinned, "created_at": timestamp(v.created_at),
            "warnings": (v.meta or {}).get("warnings", [])}


def _adapter(a: Adapter, tenant: str) -> dict[str, Any]:
    return {"object": "adapter", "tenant": tenant, "name": a.name,
            "created_at": timestamp(a.created_at),
            "latest_version": a.versions[-1].version if a.versions else None,
            "versions": [_version(v, tenant, a.name) for v in a.versions],
            "aliases": {al.alias: al.version for al in a.aliases}}
