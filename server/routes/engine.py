"""Admin: the engine's state (residency, loads, hits, evictions, the disk cache)."""

from __future__ import annotations

from fastapi import APIRouter

from server.deps import AdminDep, AdminServiceDep
from server.protocol.admin import EngineStatus
from server.protocol.common import ERROR_RESPONSES
from server.routes.json_body import JSONBodyRoute

router = APIRouter(prefix="/admin", tags=["admin: engine"], dependencies=[AdminDep],
                   responses=ERROR_RESPONSES, route_class=JSONBodyRoute)


@router.get("/engine")
async def engine_status(admin: AdminServiceDep) -> EngineStatus:
    return await admin.engine_status()
