"""Admin: a tenant's limits and its keys' limits (enforced by server/quotas on every unit)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter

from server.deps import AdminDep, AdminServiceDep
from server.protocol.admin import KeyLimitsObject, KeyLimitsSet, TenantLimitsObject, TenantLimitsSet
from server.protocol.common import ERROR_RESPONSES
from server.routes.json_body import JSONBody, JSONBodyRoute

router = APIRouter(prefix="/admin", tags=["admin: limits"], dependencies=[AdminDep],
                   responses=ERROR_RESPONSES, route_class=JSONBodyRoute)


@router.get("/tenants/{tenant}/limits")
async def get_tenant_limits(tenant: str, admin: AdminServiceDep) -> TenantLimitsObject:
    return await admin.get_tenant_limits(tenant)


@router.put("/tenants/{tenant}/limits")
async def set_tenant_limits(tenant: str, admin: AdminServiceDep,
                            body: Annotated[TenantLimitsSet, JSONBody(TenantLimitsSet)],
                            ) -> TenantLimitsObject:
    """Replace the tenant's limits (absent fields are unlimited). Every unit applies them
    within `LORAPLEX_REGISTRY_POLL_S`, this one at once."""
    return await admin.set_tenant_limits(tenant, body)


@router.get("/tenants/{tenant}/keys/{key_id}/limits")
async def get_key_limits(tenant: str, key_id: str, admin: AdminServiceDep) -> KeyLimitsObject:
    return await admin.get_key_limits(tenant, key_id)


@router.put("/tenants/{tenant}/keys/{key_id}/limits")
async def set_key_limits(tenant: str, key_id: str, admin: AdminServiceDep,
                         body: Annotated[KeyLimitsSet, JSONBody(KeyLimitsSet)],
                         ) -> KeyLimitsObject:
    """Replace one key's limits, which apply inside its tenant's."""
    return await admin.set_key_limits(tenant, key_id, body)
