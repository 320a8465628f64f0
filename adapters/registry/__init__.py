"""The registry: tenants, keys, adapters, versions and aliases in one SQL database.

SQLAlchemy 2 async; a SQLite file by default, PostgreSQL by URL when several gateways share it.
Each public method is one transaction: a row is either fully written or not at all.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import event, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import selectinload

from adapters.errors import Conflict, NotFound
from adapters.names import ModelRef, check_alias, check_name
from adapters.registry import migrate
from adapters.registry.migrate import SchemaError, SchemaState
from adapters.registry.models import (
    Adapter,
    AdapterVersion,
    Alias,
    ApiKey,
    RegistryState,
    Tenant,
    utcnow,
)
from adapters.spec import AdapterSpec

__all__ = ["Registry", "VersionSpec", "Adapter", "AdapterVersion", "Alias", "ApiKey", "Tenant",
           "SchemaError", "SchemaState", "Limits", "KeyOwner"]

KEY_PREFIX = "lpx-"


def hash_key(key: str) -> str:
    # Keys are 256-bit random tokens, so a plain SHA-256 is enough (no password stretching).
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class VersionSpec:
    """What registration learned about an adapter, written with its new version row."""

    store_key: str
    source: str
    spec: AdapterSpec
    meta: dict[str, Any]


@dataclass(frozen=True)
class Limits:
    """A tenant's (or a key's) limits; None is unlimited. See server/quotas."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_in_flight: int | None = None
    max_tokens: int | None = None

    @classmethod
    def of(cls, row: Tenant | ApiKey) -> Limits:
        return cls(row.requests_per_minute, row.tokens_per_minute, row.max_in_flight,
                   row.max_tokens)

    @property
    def any(self) -> bool:
        return any(v is not None for v in asdict(self).values())


@dataclass(frozen=True)
class KeyOwner:
    """Who a valid API key acts for, with everything admission needs to know about them."""

    tenant_id: str
    key_id: str
    tenant_limits: Limits
    key_limits: Limits
    weight: float = 1.0


@dataclass(frozen=True)
class DeletedVersions:
    """What a delete removed from the registry, so the caller can unload and erase it."""

    engine_names: list[str]
    store_keys: list[str]


class Registry:
    def __init__(self, url: str) -> None:
        self.engine = create_async_engine(url)
        if url.startswith("sqlite"):
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._listeners: list[Callable[[int], None]] = []

    def on_change(self, listener: Callable[[int], None]) -> None:
        """Call `listener(generation)` after every committed change that moves the generation,
        so this process drops its cached lookups at once (others see the generation move)."""
        self._listeners.append(listener)

    async def create_schema(self) -> SchemaState:
        """Upgrade the database to the newest schema revision (see `migrate`): creates it
        when empty, recognises one made before migrations; safe when several processes
        start at once. Raises `SchemaError` for a schema it must not touch."""
        state = await migrate.upgrade(self.engine)
        try:
            async with self._tx() as s:
                if await s.get(RegistryState, 1) is None:
                    s.add(RegistryState(id=1, generation=0))
        except IntegrityError:
            pass  # another gateway sharing the database made the row first
        return state

    async def schema_state(self) -> SchemaState:
        """The database's schema revision, without changing anything."""
        return await migrate.current(self.engine)

    async def generation(self) -> int:
        """A number that changes whenever a key is revoked or a model name may resolve
        differently (versions, aliases, deletes). Cheap to poll."""
        async with self.engine.connect() as conn:  # Core, no ORM session: half the CPU
            generation = await conn.scalar(
                select(RegistryState.generation).where(RegistryState.id == 1))
        return generation or 0

    async def close(self) -> None:
        await self.engine.dispose()

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[AsyncSession]:
        async with self._sessions() as session:
            async with session.begin():
                yield session
            generation = session.info.get("generation")
            if generation is not None:  # committed: now nobody may act on the old state
                for listener in self._listeners:
                    listener(generation)

    def transaction(self) -> AbstractAsyncContextManager[AsyncSession]:
        """One transaction, for repositories that share this database (training jobs)."""
        return self._tx()

    # -- tenants ---------------------------------------------------------------------------

    async def create_tenant(self, tenant_id: str) -> Tenant:
        check_name(tenant_id, "tenant")
        try:
            async with self._tx() as s:
                tenant = Tenant(id=tenant_id)
                s.add(tenant)
        except IntegrityError as exc:
            raise Conflict(f"tenant {tenant_id!r} already exists", code="tenant_exists") from exc
        return tenant

    async def list_tenants(self) -> list[Tenant]:
        async with self._tx() as s:
            return list((await s.scalars(select(Tenant).order_by(Tenant.id))).all())

    async def get_tenant(self, tenant_id: str) -> Tenant:
        async with self._tx() as s:
            return await _tenant(s, tenant_id)

    async def set_tenant_limits(self, tenant_id: str, limits: Limits,
                                weight: float | None) -> Tenant:
        async with self._tx() as s:
            tenant = await _tenant(s, tenant_id)
            await _changed(s)  # every gateway drops its cached key owners (and their limits)
            _write_limits(tenant, limits)
            tenant.weight = weight
            return tenant

    async def delete_tenant(self, tenant_id: str) -> DeletedVersions:
        async with self._tx() as s:
            tenant = await _tenant(s, tenant_id)
            await _changed(s)
            versions = (await s.scalars(
                select(AdapterVersion).join(Adapter).where(Adapter.tenant_id == tenant_id))).all()
            await s.delete(tenant)
            return _deleted(versions)

    # -- keys ------------------------------------------------------------------------------

    async def create_key(self, tenant_id: str, name: str | None = None) -> tuple[ApiKey, str]:
        """Make a key for the tenant; returns the row and the key, which is never stored."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        async with self._tx() as s:
            await _tenant(s, tenant_id)
            row = ApiKey(id=secrets.token_hex(8), tenant_id=tenant_id, key_hash=hash_key(key),
                         prefix=key[:10], name=name)
            s.add(row)
        return row, key

    async def list_keys(self, tenant_id: str) -> list[ApiKey]:
        async with self._tx() as s:
            await _tenant(s, tenant_id)
            rows = await s.scalars(
                select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.created_at))
            return list(rows.all())

    async def revoke_key(self, tenant_id: str, key_id: str) -> ApiKey:
        async with self._tx() as s:
            row = await _key(s, tenant_id, key_id)
            await _changed(s)
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            return row

    async def get_key(self, tenant_id: str, key_id: str) -> ApiKey:
        async with self._tx() as s:
            return await _key(s, tenant_id, key_id)

    async def set_key_limits(self, tenant_id: str, key_id: str, limits: Limits) -> ApiKey:
        async with self._tx() as s:
            row = await _key(s, tenant_id, key_id)
            await _changed(s)
            _write_limits(row, limits)
            return row

    async def tenant_for_key(self, key: str) -> str | None:
        """The tenant that owns this (unrevoked) key, or None."""
        owner = await self.key_owner(key)
        return owner.tenant_id if owner else None

    async def key_owner(self, key: str) -> KeyOwner | None:
        """Who this (unrevoked) key acts for, with the tenant's and the key's limits."""
        async with self._tx() as s:
            row = (await s.execute(
                select(ApiKey, Tenant).join(Tenant, Tenant.id == ApiKey.tenant_id)
                .where(ApiKey.key_hash == hash_key(key)))).first()
            if row is None or row[0].revoked_at is not None:
                return None
            key_row, tenant = row
            return KeyOwner(tenant.id, key_row.id, Limits.of(tenant), Limits.of(key_row),
                            tenant.weight or 1.0)

    # -- adapters and versions ---------------------------------------------------------------

    async def reserve_version(self, tenant_id: str, name: str) -> tuple[int, bool]:
        """Take the next version number of an adapter, creating the adapter if needed.

        Returns (version, created). The number is consumed even if registration fails later,
        so a version number never names two different sets of weights.
        """
        check_name(name, "adapter")
        try:
            return await self._reserve_version(tenant_id, name)
        except IntegrityError:
            # A concurrent first registration created the adapter row: use it.
            return await self._reserve_version(tenant_id, name)

    async def _reserve_version(self, tenant_id: str, name: str) -> tuple[int, bool]:
        async with self._tx() as s:
            await _tenant(s, tenant_id)
            adapter = await _adapter_or_none(s, tenant_id, name)
            created = adapter is None
            if adapter is None:
                s.add(Adapter(tenant_id=tenant_id, name=name, next_version=1))
                await s.flush()
            # One atomic increment: on PostgreSQL the UPDATE takes the row lock and a
            # concurrent one (another unit) waits, then increments what this one committed.
            # Reading next_version and writing it back would hand one number out twice.
            taken = await s.scalar(
                update(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name)
                .values(next_version=Adapter.next_version + 1)
                .returning(Adapter.next_version - 1))
            if taken is None:  # deleted by a concurrent call since we read it
                raise NotFound(f"adapter {name!r} not found for tenant {tenant_id!r}",
                               code="adapter_not_found")
            return taken, created

    async def add_version(self, tenant_id: str, name: str, version: int,
                          spec: VersionSpec) -> AdapterVersion:
        async with self._tx() as s:
            adapter = await _adapter(s, tenant_id, name)
            await _changed(s)
            row = AdapterVersion(
                adapter_id=adapter.id, version=version,
                engine_name=f"{tenant_id}/{name}@{version}.{secrets.token_hex(4)}",
                store_key=spec.store_key, source=spec.source, meta=spec.meta,
                **asdict(spec.spec))
            s.add(row)
        return row

    async def abandon_reservation(self, tenant_id: str, name: str) -> None:
        """Remove an adapter that a failed first registration created and left empty."""
        async with self._tx() as s:
            adapter = await _adapter_or_none(s, tenant_id, name)
            if adapter is not None and not adapter.versions:
                await s.delete(adapter)

    async def list_adapters(self, tenant_id: str) -> list[Adapter]:
        async with self._tx() as s:
            await _tenant(s, tenant_id)
            rows = await s.scalars(
                select(Adapter).where(Adapter.tenant_id == tenant_id).order_by(Adapter.name)
                .options(selectinload(Adapter.versions), selectinload(Adapter.aliases)))
            return list(rows.all())

    async def get_adapter(self, tenant_id: str, name: str) -> Adapter:
        async with self._tx() as s:
            return await _adapter(s, tenant_id, name)

    async def delete_adapter(self, tenant_id: str, name: str) -> DeletedVersions:
        async with self._tx() as s:
            adapter = await _adapter(s, tenant_id, name)
            await _changed(s)
            deleted = _deleted(adapter.versions)
            await s.delete(adapter)
            return deleted

    async def get_version(self, tenant_id: str, name: str, version: int) -> AdapterVersion:
        async with self._tx() as s:
            adapter = await _adapter(s, tenant_id, name)
            return _version_of(adapter, version)

    async def delete_version(self, tenant_id: str, name: str, version: int) -> DeletedVersions:
        async with self._tx() as s:
            adapter = await _adapter(s, tenant_id, name)
            await _changed(s)
            row = _version_of(adapter, version)
            pointing = sorted(a.alias for a in adapter.aliases if a.version == version)
            if pointing:
                raise Conflict(
                    f"version {version} of {name!r} is the target of alias(es) "
                    f"{', '.join(pointing)}; move or delete them first", code="version_in_use")
            await s.delete(row)
            return _deleted([row])

    async def set_pinned(self, tenant_id: str, name: str, version: int,
                         pinned: bool) -> AdapterVersion:
        async with self._tx() as s:
            row = _version_of(await _adapter(s, tenant_id, name), version)
            row.pinned = pinned
            return row

    async def pinned_versions(self) -> list[AdapterVersion]:
        async with self._tx() as s:
            return list((await s.scalars(
                select(AdapterVersion).where(AdapterVersion.pinned.is_(True)))).all())

    async def set_alias(self, tenant_id: str, name: str, alias: str, version: int) -> Alias:
        check_alias(alias)
        try:
            return await self._set_alias(tenant_id, name, alias, version)
        except IntegrityError:  # a concurrent first set of the same alias: update it
            return await self._set_alias(tenant_id, name, alias, version)

    async def _set_alias(self, tenant_id: str, name: str, alias: str, version: int) -> Alias:
        async with self._tx() as s:
            adapter = await _adapter(s, tenant_id, name)
            await _changed(s)
            _version_of(adapter, version)
            row = next((a for a in adapter.aliases if a.alias == alias), None)
            if row is None:
                row = Alias(adapter_id=adapter.id, alias=alias, version=version)
                s.add(row)
            row.version = version
            return row

    async def delete_alias(self, tenant_id: str, name: str, alias: str) -> None:
        async with self._tx() as s:
            adapter = await _adapter(s, tenant_id, name)
            await _changed(s)
            row = next((a for a in adapter.aliases if a.alias == alias), None)
            if row is None:
                raise NotFound(f"alias {alias!r} not found on adapter {name!r}")
            await s.delete(row)

    async def resolve(self, tenant_id: str, ref: ModelRef) -> AdapterVersion:
        """The version a tenant's `model` names: `name` is the latest, `name@N`, `name@alias`."""
        async with self._tx() as s:
            adapter = await _adapter_or_none(s, tenant_id, ref.adapter)
            if adapter is None:
                raise NotFound(f"model {ref.adapter!r} does not exist", param="model",
                               code="model_not_found")
            if ref.alias is not None:
                alias = next((a for a in adapter.aliases if a.alias == ref.alias), None)
                if alias is None:
                    raise NotFound(f"alias {ref.alias!r} does not exist on model {ref.adapter!r}",
                                   param="model", code="model_not_found")
                return _version_of(adapter, alias.version)
            if ref.version is not None:
                return _version_of(adapter, ref.version)
            if not adapter.versions:
                raise NotFound(f"model {ref.adapter!r} has no versions", param="model",
                               code="model_not_found")
            return adapter.versions[-1]


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


async def _changed(s: AsyncSession) -> None:
    """Bump the registry generation in the caller's transaction (committed with the change)."""
    s.info["generation"] = await s.scalar(
        update(RegistryState).where(RegistryState.id == 1)
        .values(generation=RegistryState.generation + 1).returning(RegistryState.generation))


async def _tenant(s: AsyncSession, tenant_id: str) -> Tenant:
    tenant = await s.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound(f"tenant {tenant_id!r} not found", code="tenant_not_found")
    return tenant


async def _key(s: AsyncSession, tenant_id: str, key_id: str) -> ApiKey:
    row = await s.get(ApiKey, key_id)
    if row is None or row.tenant_id != tenant_id:
        await _tenant(s, tenant_id)  # an unknown tenant is named as such
        raise NotFound(f"key {key_id!r} not found for tenant {tenant_id!r}",
                       code="key_not_found")
    return row


def _write_limits(row: Tenant | ApiKey, limits: Limits) -> None:
    for name, value in asdict(limits).items():
        setattr(row, name, value)


async def _adapter_or_none(s: AsyncSession, tenant_id: str, name: str) -> Adapter | None:
    return await s.scalar(
        select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name)
        .options(selectinload(Adapter.versions), selectinload(Adapter.aliases)))


async def _adapter(s: AsyncSession, tenant_id: str, name: str) -> Adapter:
    await _tenant(s, tenant_id)
    adapter = await _adapter_or_none(s, tenant_id, name)
    if adapter is None:
        raise NotFound(f"adapter {name!r} not found for tenant {tenant_id!r}",
                       code="adapter_not_found")
    return adapter


def _version_of(adapter: Adapter, version: int) -> AdapterVersion:
    row = next((v for v in adapter.versions if v.version == version), None)
    if row is None:
        raise NotFound(f"version {version} of {adapter.name!r} does not exist", param="model",
                       code="version_not_found")
    return row


def _deleted(versions: Sequence[AdapterVersion]) -> DeletedVersions:
    return DeletedVersions([v.engine_name for v in versions], [v.store_key for v in versions])


def timestamp(value: datetime) -> int:
    """Unix seconds, as OpenAI objects carry them. Registry datetimes are aware UTC on every
    database (models.UTCDateTime); a naive one is taken as UTC, never as local time."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return int(value.timestamp())
