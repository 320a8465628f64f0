"""Admin: metered usage, per tenant and across tenants (what bills are made from), as JSON or
CSV. The logic is `server.quotas.usage.UsageService`; this only parses, calls and wraps."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from server.deps import AdminDep
from server.protocol.common import ERROR_RESPONSES
from server.protocol.usage import CSV_FIELDS, UsageList
from server.quotas.usage import UsageReport, UsageService

router = APIRouter(prefix="/admin", tags=["admin: usage"], dependencies=[AdminDep],
                   responses=ERROR_RESPONSES)

CSV_MEDIA_TYPE = "text/csv; charset=utf-8"


async def get_usage(request: Request) -> UsageService:
    return UsageService(request.app.state.services.usage_store)


UsageDep = Annotated[UsageService, Depends(get_usage)]

# Query parameters are plain strings, checked by the service: every bad value is a 400 in
# OpenAI's error shape that names the parameter.
Start = Annotated[str | None, Query(
    description="The first UTC day (YYYY-MM-DD), included. Default: 29 days before `end`.")]
End = Annotated[str | None, Query(
    description="The last UTC day (YYYY-MM-DD), included. Default: today (UTC). At most "
                "366 days from `start`.")]
Format = Annotated[str | None, Query(alias="format", description="`json` (default) or `csv`.")]

_USAGE_RESPONSES: dict[int | str, dict[str, Any]] = {200: {
    "description": "The usage list; with `format=csv` the same entries as CSV (a header row, "
                   "then one row per entry, empty cells for null), as an attachment.",
    "model": UsageList,
    "content": {"text/csv": {"schema": {
        "type": "string", "description": "Columns: " + ", ".join(CSV_FIELDS) + "."}}}}}


@router.get("/tenants/{tenant}/usage", response_class=Response, responses=_USAGE_RESPONSES)
async def tenant_usage(
    tenant: str, usage: UsageDep, start: Start = None, end: End = None,
    group_by: Annotated[str | None, Query(
        description="Comma-separated, any of `day`, `adapter`, `key`; empty for one total. "
                    "Default: `day`.")] = None,
    fmt: Format = None,
) -> Response:
    """A tenant's metered usage over a range of UTC days, summed per group."""
    return _answer(await usage.tenant_usage(tenant, start, end, group_by, fmt))


@router.get("/usage", response_class=Response, responses=_USAGE_RESPONSES)
async def all_usage(
    usage: UsageDep, start: Start = None, end: End = None,
    group_by: Annotated[str | None, Query(
        description="Comma-separated, any of `tenant`, `day`, `adapter`, `key`; empty for "
                    "one total. Default: `tenant,day`.")] = None,
    fmt: Format = None,
) -> Response:
    """Every tenant's metered usage over a range of UTC days (the bill run), summed per group."""
    return _answer(await usage.all_usage(start, end, group_by, fmt))


def _answer(report: UsageReport) -> Response:
    if report.format == "csv":
        return Response(report.csv(), media_type=CSV_MEDIA_TYPE, headers={
            "Content-Disposition": f'attachment; filename="{report.filename}"'})
    return JSONResponse(report.usage.model_dump(mode="json"))
