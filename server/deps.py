"""FastAPI dependencies, as `Annotated` aliases the routes declare."""

from __future__ import annotations

import json
from typing import Annotated, TypeVar

from fastapi import Depends, Header, Request
from pydantic import BaseModel, ValidationError

from adapters.errors import InvalidInput
from adapters.registry import KeyOwner
from server.admin import AdminService
from server.auth import check_admin
from server.fine_tuning import FineTuningService
from server.gateway import Gateway
from server.services import Services

M = TypeVar("M", bound=BaseModel)


# Dependencies are `async def` even when they do not await: FastAPI runs a plain `def`
# dependency in a worker thread, a thread hop on every request.
async def get_services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


ServicesDep = Annotated[Services, Depends(get_services)]


async def current_caller(
    request: Request,
    services: ServicesDep,
    x_tenant_id: Annotated[str | None, Header()] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> KeyOwner:
    caller = await services.auth.caller(x_tenant_id, authorization)
    record = request.state.record
    record.tenant, record.key_id = caller.tenant_id, caller.key_id
    return caller


CallerDep = Annotated[KeyOwner, Depends(current_caller)]


async def current_tenant(caller: CallerDep) -> str:
    return caller.tenant_id


async def report_limits(request: Request, caller: CallerDep, services: ServicesDep) -> None:
    """The caller's x-ratelimit-* headers on an answer that uses no limit (tenant API calls
    other than generation, which reports what it took)."""
    await services.gateway.limiter.report(caller, request.state.record)


ReportLimits = Depends(report_limits)


async def require_admin(services: ServicesDep,
                  authorization: Annotated[str | None, Header()] = None) -> None:
    check_admin(services.admin_token, authorization)


async def get_gateway(services: ServicesDep) -> Gateway:
    return services.gateway


async def get_admin(services: ServicesDep) -> AdminService:
    return services.admin


async def get_fine_tuning(services: ServicesDep) -> FineTuningService:
    return services.fine_tuning


TenantDep = Annotated[str, Depends(current_tenant)]
AdminDep = Depends(require_admin)
GatewayDep = Annotated[Gateway, Depends(get_gateway)]
AdminServiceDep = Annotated[AdminService, Depends(get_admin)]
FineTuningDep = Annotated[FineTuningService, Depends(get_fine_tuning)]


async def parse_json(request: Request, model: type[M]) -> M:
    """Parse a JSON body into `model`, turning every failure into a 400 naming the field."""
    return parse_json_bytes(await request.body(), model)


def parse_json_bytes(raw: bytes, model: type[M]) -> M:
    """`raw` as `model`; every failure is a 400 naming the field."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise InvalidInput("request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or None
        raise InvalidInput(f"{where}: {first['msg']}" if where else first["msg"], param=where,
                           code="invalid_value") from exc
