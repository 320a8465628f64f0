"""Admin: a tenant's API keys."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter

from server.deps import AdminDep, AdminServiceDep
from server.protocol.admin import CreatedKey, KeyCreate, KeyList, KeyObject
from server.protocol.common import ERROR_RESPONSES
from server.routes.json_body import JSONBody, JSONBodyRoute

router = APIRouter(prefix="/admin", tags=["admin: keys"], dependencies=[AdminDep],
                   responses=ERROR_RESPONSES, route_class=JSONBodyRoute)


@router.post("/tenants/{tenant}/keys", status_code=201)
async def create_key(tenant: str, admin: AdminServiceDep,
                     body: Annotated[KeyCreate, JSONBody(KeyCreate, optional=True)]) -> CreatedKey:
    """A new key; the secret is in this answer only. The body is optional."""
    return await admin.create_key(tenant, body.name)


@router.get("/tenants/{tenant}/keys")
async def list_keys(tenant: str, admin: AdminServiceDep) -> KeyList:
    return await admin.list_keys(tenant)


@router.delete("/tenants/{tenant}/keys/{key_id}")
async def revoke_key(tenant: str, key_id: str, admin: AdminServiceDep) -> KeyObject:
    return await admin.revoke_key(tenant, key_id)
