"""Tenant API: fine-tuning jobs (OpenAI-compatible, plus the `lora` recipe)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter

from server.deps import FineTuningDep, ReportLimits, TenantDep
from server.protocol.common import ERROR_RESPONSES
from server.protocol.fine_tuning import CheckpointList, EventList, FineTuningJob, JobCreate, JobList
from server.routes.json_body import JSONBody, JSONBodyRoute

router = APIRouter(prefix="/v1", tags=["fine-tuning"], responses=ERROR_RESPONSES,
                   route_class=JSONBodyRoute, dependencies=[ReportLimits])


@router.post("/fine_tuning/jobs")
async def create_job(tenant: TenantDep, fine_tuning: FineTuningDep,
                     body: Annotated[JobCreate, JSONBody(JobCreate)]) -> FineTuningJob:
    """Create a job. It is answered in `validating_files`; the datasets are checked in the
    background, and the job moves to `queued`, or to `failed` with `invalid_training_file`."""
    return await fine_tuning.create_job(tenant, body)


@router.get("/fine_tuning/jobs")
async def list_jobs(tenant: TenantDep, fine_tuning: FineTuningDep, after: str | None = None,
                    limit: int = 20) -> JobList:
    return await fine_tuning.list_jobs(tenant, after, limit)


@router.get("/fine_tuning/jobs/{job_id}")
async def retrieve_job(job_id: str, tenant: TenantDep, fine_tuning: FineTuningDep) -> FineTuningJob:
    return await fine_tuning.retrieve_job(tenant, job_id)


@router.post("/fine_tuning/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, tenant: TenantDep, fine_tuning: FineTuningDep) -> FineTuningJob:
    return await fine_tuning.cancel_job(tenant, job_id)


@router.get("/fine_tuning/jobs/{job_id}/events")
async def list_events(job_id: str, tenant: TenantDep, fine_tuning: FineTuningDep,
                      after: str | None = None, limit: int = 20) -> EventList:
    return await fine_tuning.list_events(tenant, job_id, after, limit)


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
async def list_checkpoints(job_id: str, tenant: TenantDep,
                           fine_tuning: FineTuningDep) -> CheckpointList:
    return await fine_tuning.list_checkpoints(tenant, job_id)
