"""Admin: every tenant's fine-tuning jobs (what the `loraplex jobs` commands and the console
read, and cancel). The objects are the tenant API's (`/v1/fine_tuning/jobs`), built by the
same code; only the scope differs: all tenants, filtered by `?tenant=` and `?status=`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import and_, or_, select

from adapters.errors import InvalidInput
from adapters.registry.models import FineTuneJob
from adapters.training.jobs import JobStatus
from server.deps import AdminDep, AdminServiceDep, FineTuningDep
from server.fine_tuning import FineTuningService, job_object
from server.protocol.common import ERROR_RESPONSES
from server.protocol.fine_tuning import EventList, FineTuningJob, JobList
from server.routes.json_body import JSONBodyRoute

router = APIRouter(prefix="/admin", tags=["admin: fine-tuning"], dependencies=[AdminDep],
                   responses=ERROR_RESPONSES, route_class=JSONBodyRoute)

Limit = Annotated[int, Query(ge=1, le=100, description="Jobs per page (1-100).")]
EventLimit = Annotated[int, Query(ge=1, le=1000, description="Events per page (1-1000).")]


async def list_all_jobs(service: FineTuningService, tenant: str | None,
                        status: JobStatus | None, after: str | None,
                        limit: int) -> JobList:
    """Newest first across tenants; `after` is the last job id of the previous page. Ties on
    created_at are broken by id, so a page boundary never skips or repeats a job."""
    async with service.jobs.registry.transaction() as s:
        q = select(FineTuneJob)
        if tenant is not None:
            q = q.where(FineTuneJob.tenant_id == tenant)
        if status is not None:
            q = q.where(FineTuneJob.status == status.value)
        if after:
            anchor = await s.get(FineTuneJob, after)
            if anchor is None:
                raise InvalidInput(f"after: no fine-tuning job with id {after!r}",
                                   param="after", code="invalid_value")
            q = q.where(or_(FineTuneJob.created_at < anchor.created_at,
                            and_(FineTuneJob.created_at == anchor.created_at,
                                 FineTuneJob.id < anchor.id)))
        q = q.order_by(FineTuneJob.created_at.desc(), FineTuneJob.id.desc()).limit(limit + 1)
        rows = list((await s.scalars(q)).all())
    return JobList(data=[job_object(j) for j in rows[:limit]], has_more=len(rows) > limit)


@router.get("/fine_tuning/jobs")
async def list_jobs(fine_tuning: FineTuningDep, admin: AdminServiceDep,
                    tenant: str | None = None, status: JobStatus | None = None,
                    after: str | None = None, limit: Limit = 20) -> JobList:
    """Every tenant's jobs, newest first; `tenant` must exist (404 otherwise)."""
    if tenant is not None:
        await admin.get_tenant(tenant)
    return await list_all_jobs(fine_tuning, tenant, status, after, limit)


@router.get("/fine_tuning/jobs/{job_id}")
async def retrieve_job(job_id: str, fine_tuning: FineTuningDep) -> FineTuningJob:
    return job_object(await fine_tuning.jobs.get_job(None, job_id))


@router.get("/fine_tuning/jobs/{job_id}/events")
async def list_events(job_id: str, fine_tuning: FineTuningDep, after: str | None = None,
                      limit: EventLimit = 20) -> EventList:
    """Newest first, like the tenant API; `after` is the last event id of the previous page."""
    job = await fine_tuning.jobs.get_job(None, job_id)
    return await fine_tuning.list_events(job.tenant_id, job_id, after, limit)


@router.post("/fine_tuning/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, fine_tuning: FineTuningDep) -> FineTuningJob:
    """Cancel any tenant's job (fine-tuning, merge or export) as its tenant can: a queued one
    never runs, a running one stops at its worker's next step and registers nothing; 409 once
    it has ended."""
    job = await fine_tuning.jobs.get_job(None, job_id)
    return await fine_tuning.cancel_job(job.tenant_id, job_id)
