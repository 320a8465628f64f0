"""Who is calling: a tenant (X-Tenant-ID + its bearer key) or the admin (admin bearer token)."""

from __future__ import annotations

import hmac

from adapters.errors import Forbidden, Unauthenticated
from adapters.registry import KeyOwner, Registry, hash_key
from server.lookup_cache import LookupCache

TENANT_HEADER = "x-tenant-id"
# Key lookups are cached. Revocations made by this gateway clear the cache at once, those made
# by another gateway sharing the database within a second (`watchers.watch_registry`); the
# TTL only bounds how long a gateway that cannot read the database keeps trusting its cache.
KEY_CACHE_TTL_S = 60.0


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise Unauthenticated("missing Authorization header; send 'Authorization: Bearer <key>'")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("Authorization must be 'Bearer <key>'")
    return token.strip()


class TenantAuth:
    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        # Keyed by the key's hash, never by the key itself. Limits ride along: a limit change
        # moves the registry generation, which clears this cache like a revocation does.
        self._owners: LookupCache[str, KeyOwner | None] = LookupCache(KEY_CACHE_TTL_S)

    def forget(self) -> None:
        self._owners.clear()

    async def caller(self, tenant_header: str | None, authorization: str | None) -> KeyOwner:
        """Who a request acts for; 401 without a valid key, 403 for another tenant's."""
        key = bearer_token(authorization)
        if not tenant_header:
            raise Unauthenticated("missing X-Tenant-ID header", code="missing_tenant")
        owner = await self._owners.get(hash_key(key), lambda: self._registry.key_owner(key))
        if owner is None:
            raise Unauthenticated("invalid API key")
        if owner.tenant_id != tenant_header:
            raise Forbidden("this API key does not belong to the tenant in X-Tenant-ID",
                            code="tenant_mismatch")
        return owner


def check_admin(expected: str, authorization: str | None) -> None:
    token = bearer_token(authorization)
    if not hmac.compare_digest(token.encode(), expected.encode()):
        raise Unauthenticated("invalid admin token")
