"""Tenant API: fine-tuning jobs (OpenAI-compatible, plus the `lora` recipe)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from adapters.training.evaluation import EvaluationReport
from server.deps import CallerDep, FineTuningDep, ReportLimits, ServicesDep, TenantDep
from server.evaluation import EvaluationService
from server.protocol.common import ERROR_RESPONSES
from server.protocol.fine_tuning import (
    CheckpointList,
    EvaluationCreate,
    EventList,
    FineTuningJob,
    JobCreate,
    JobList,
)
from server.routes.json_body import JSONBody, JSONBodyRoute


async def get_evaluations(services: ServicesDep) -> EvaluationService:
    return EvaluationService(services.gateway, services.jobs,
                             services.settings.evaluation_concurrency, services.usage)


EvaluationsDep = Annotated[EvaluationService, Depends(get_evaluations)]

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


@router.post("/fine_tuning/evaluations")
async def create_evaluation(caller: CallerDep, evaluations: EvaluationsDep,
                            body: Annotated[EvaluationCreate, JSONBody(EvaluationCreate)]
                            ) -> EvaluationReport:
    """Answer held-out examples (`validation_file` or inline `examples`) greedily with each of
    `models` and, unless `prompted_baseline` is false, the base model well prompted (system
    prompt + `few_shot` examples of `training_file`), through the serving engine; exact match,
    token F1, ROUGE-L and output length per model, and a few examples side by side. Answered
    when done (minutes for a large file)."""
    return await evaluations.run(caller, body)
