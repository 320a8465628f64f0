"""Admin: tenants."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter

from server.deps import AdminDep, AdminServiceDep
from server.protocol.admin import TenantCreate, TenantList, TenantObject
from server.protocol.common import ERROR_RESPONSES, Deleted
from server.routes.json_body import JSONBody, JSONBodyRoute

router = APIRouter(prefix="/admin", tags=["admin: tenants"], dependencies=[AdminDep],
                   responses=ERROR_RESPONSES, route_class=JSONBodyRoute)


@router.post("/tenants", status_code=201)
async def create_tenant(admin: AdminServiceDep,
                        body: Annotated[TenantCreate, JSONBody(TenantCreate)]) -> TenantObject:
    return await admin.create_tenant(body.id)


@router.get("/tenants")
async def list_tenants(admin: AdminServiceDep) -> TenantList:
    return await admin.list_tenants()


@router.get("/tenants/{tenant}")
async def get_tenant(tenant: str, admin: AdminServiceDep) -> TenantObject:
    return await admin.get_tenant(tenant)


@router.delete("/tenants/{tenant}")
async def delete_tenant(tenant: str, admin: AdminServiceDep) -> Deleted:
    """Delete the tenant, its keys and its adapters (unloaded once idle, files erased)."""
    return await admin.delete_tenant(tenant)
