"""Wire models of the admin API: request bodies (strict: an unknown field is a 400) and the
objects it answers with, each built from its registry row by `from_row`."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from adapters.registry import Adapter, AdapterVersion, ApiKey, Limits, Tenant, timestamp


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- requests ----------------------------------------------------------------------------------

class TenantCreate(_Body):
    id: str = Field(min_length=1, max_length=64, description="Tenant id: letters, digits, '-', '_'.")


class KeyCreate(_Body):
    name: str | None = Field(default=None, max_length=128, description="A label for the key.")


class VersionSource(_Body):
    """Register from a folder instead of an upload: exactly one of `path` or `source`."""

    path: str | None = Field(default=None, max_length=4096,
                             description="A local folder under LORAPLEX_LOCAL_SOURCE_ALLOWLIST.")
    source: str | None = Field(default=None, max_length=4096,
                               description="An s3:// folder under LORAPLEX_S3_SOURCE_ALLOWLIST.")


class AliasSet(_Body):
    version: int = Field(ge=1)


def _limit(most: int, what: str) -> Any:
    # strict: 1.5, "10" and true are refused, not coerced
    return Field(default=None, ge=1, le=most, strict=True,
                 description=f"{what}; null (or absent) is unlimited.")


class KeyLimitsSet(_Body):
    """A key's limits, applied inside its tenant's (both must have room). PUT replaces them
    all: an absent field is null, unlimited."""

    requests_per_minute: int | None = _limit(10**8, "Requests per minute")
    tokens_per_minute: int | None = _limit(10**11, "Prompt + completion tokens per minute")
    max_in_flight: int | None = _limit(10**6, "Requests answered at once")
    max_tokens: int | None = _limit(10**7, "Cap on one request's max_tokens (the default "
                                    "when a request sets none)")

    def limits(self) -> Limits:
        return Limits(self.requests_per_minute, self.tokens_per_minute, self.max_in_flight,
                      self.max_tokens)


class TenantLimitsSet(KeyLimitsSet):
    weight: float | None = Field(
        default=None, gt=0, le=1000,
        description="Share of a saturated engine relative to other tenants (token-fair "
                    "admission: a tenant of weight 2 is served twice the tokens of one of "
                    "weight 1 while both wait); null is 1.")


# -- answers -----------------------------------------------------------------------------------

class TenantObject(BaseModel):
    id: str
    object: Literal["tenant"] = "tenant"
    created_at: int

    @classmethod
    def from_row(cls, t: Tenant) -> TenantObject:
        return cls(id=t.id, created_at=timestamp(t.created_at))


class TenantLimitsObject(BaseModel):
    object: Literal["tenant.limits"] = "tenant.limits"
    tenant: str
    requests_per_minute: int | None
    tokens_per_minute: int | None
    max_in_flight: int | None
    max_tokens: int | None
    weight: float | None

    @classmethod
    def from_row(cls, t: Tenant) -> TenantLimitsObject:
        return cls(tenant=t.id, weight=t.weight, **asdict(Limits.of(t)))


class KeyLimitsObject(BaseModel):
    object: Literal["api_key.limits"] = "api_key.limits"
    tenant: str
    key_id: str
    requests_per_minute: int | None
    tokens_per_minute: int | None
    max_in_flight: int | None
    max_tokens: int | None

    @classmethod
    def from_row(cls, k: ApiKey) -> KeyLimitsObject:
        return cls(tenant=k.tenant_id, key_id=k.id, **asdict(Limits.of(k)))


class TenantList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TenantObject]


class KeyObject(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    tenant: str
    name: str | None
    prefix: str = Field(description="The key's first characters, to tell keys apart.")
    created_at: int
    revoked_at: int | None

    @classmethod
    def from_row(cls, k: ApiKey) -> KeyObject:
        return cls(id=k.id, tenant=k.tenant_id, name=k.name, prefix=k.prefix,
                   created_at=timestamp(k.created_at),
                   revoked_at=timestamp(k.revoked_at) if k.revoked_at else None)


class CreatedKey(KeyObject):
    key: str = Field(description="The secret key. Shown once, here; only its hash is kept.")


class KeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[KeyObject]


class AdapterVersionObject(BaseModel):
    object: Literal["adapter_version"] = "adapter_version"
    tenant: str
    adapter: str
    version: int
    model: str = Field(description="What a tenant sends as `model` to call this version.")
    engine_name: str
    store_key: str
    rank: int
    alpha: float
    target_modules: list[str]
    base_model: str | None
    size_bytes: int
    sha256: str
    source: str
    pinned: bool
    created_at: int
    warnings: list[str]

    @classmethod
    def from_row(cls, v: AdapterVersion, tenant: str, name: str) -> AdapterVersionObject:
        return cls(tenant=tenant, adapter=name, version=v.version, model=f"{name}@{v.version}",
                   engine_name=v.engine_name, store_key=v.store_key, source=v.source,
                   pinned=v.pinned, created_at=timestamp(v.created_at),
                   warnings=(v.meta or {}).get("warnings", []), **asdict(v.spec))


class AdapterObject(BaseModel):
    object: Literal["adapter"] = "adapter"
    tenant: str
    name: str
    created_at: int
    latest_version: int | None
    versions: list[AdapterVersionObject]
    aliases: dict[str, int]

    @classmethod
    def from_row(cls, a: Adapter, tenant: str) -> AdapterObject:
        return cls(tenant=tenant, name=a.name, created_at=timestamp(a.created_at),
                   latest_version=a.versions[-1].version if a.versions else None,
                   versions=[AdapterVersionObject.from_row(v, tenant, a.name) for v in a.versions],
                   aliases={al.alias: al.version for al in a.aliases})


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterObject]


class AliasObject(BaseModel):
    adapter: str
    alias: str
    version: int


class AliasDeleted(BaseModel):
    adapter: str
    alias: str
    deleted: bool = True


class EngineStatus(BaseModel):
    url: str
    ready: bool
    spawned: bool = Field(description="Whether loraplex spawned and supervises the engine.")
    restarts: int | None
    adapters: dict[str, Any] = Field(description="Engine residency: capacity, resident adapters, "
                                                 "loads, hits and evictions.")
    store: str
    disk_cache: dict[str, Any] | None = Field(description="The S3 store's local disk cache.")
