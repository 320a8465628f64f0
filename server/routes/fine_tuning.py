"""Files and fine-tuning jobs, shaped like OpenAI's so the official SDK works unchanged.

LoRA settings beyond OpenAI's `hyperparameters` go in a top-level `lora` object (see
`LoraSettings`); the base model must be the one this server serves.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from adapters.errors import InvalidInput
from adapters.names import check_name
from adapters.registry import timestamp
from adapters.registry.models import FineTuneJob, JobCheckpoint, JobEvent, TrainingFile
from adapters.training.dataset import validate_jsonl
from adapters.training.jobs import check_purpose
from server.deps import ServicesDep, TenantDep, parse_json

router = APIRouter(prefix="/v1", tags=["fine-tuning"])

DEFAULT_LEARNING_RATE = 2e-4
DEFAULT_EPOCHS = 3
DEFAULT_BATCH_SIZE = 4


class LoraSettings(BaseModel):
    """loraplex's extension of the job body: the LoRA recipe. Every field is optional."""

    model_config = ConfigDict(extra="forbid")
    r: int = Field(default=16, ge=1, le=256)
    alpha: float = Field(default=32, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default=["q_proj", "k_proj", "v_proj", "o_proj"],
                                      min_length=1)
    learning_rate: float | None = Field(default=None, gt=0, le=1)
    use_dora: bool = False
    use_rslora: bool = False
    loraplus_lr_ratio: float | None = Field(default=None, gt=0, le=64)
    load_in_4bit: bool = False
    modules_to_save: list[str] | None = None
    max_seq_len: int = Field(default=512, ge=16, le=8192)
    general_data_ratio: float = Field(default=0.0, ge=0, le=4)
    """Share of general instruction examples mixed in, against catastrophic forgetting."""
    require_improvement: bool = False
    """Register the adapter only if its held-out loss beats the base model's."""


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: int | Literal["auto"] = "auto"
    batch_size: int | Literal["auto"] = "auto"
    learning_rate_multiplier: float | Literal["auto"] = "auto"


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    suffix: str | None = Field(default=None, max_length=40)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    method: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    integrations: list[Any] | None = None
    lora: LoraSettings = Field(default_factory=LoraSettings)


# -- files ---------------------------------------------------------------------------------

@router.post("/files")
async def create_file(request: Request, tenant: TenantDep, services: ServicesDep) -> dict[str, Any]:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidInput("upload the file as multipart/form-data with 'file' and 'purpose'")
    form = await request.form(max_files=1, max_fields=4)
    try:
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise InvalidInput("missing the 'file' part", param="file")
        if not isinstance(purpose, str):
            raise InvalidInput("missing 'purpose'", param="purpose")
        check_purpose(purpose)
        data = await upload.read()
        filename = upload.filename or "upload.jsonl"
    finally:
        await form.close()
    report = await asyncio.to_thread(validate_jsonl, data, min_examples=0)
    _raise_for_report(report, "file")
    row = await services.jobs.create_file(tenant, filename, purpose, data)
    return _file(row)


@router.get("/files")
async def list_files(tenant: TenantDep, services: ServicesDep,
                     purpose: str | None = None) -> dict[str, Any]:
    return {"object": "list", "data": [_file(f) for f in
                                       await services.jobs.list_files(tenant, purpose)],
            "has_more": False}


@router.get("/files/{file_id}")
async def retrieve_file(file_id: str, tenant: TenantDep, services: ServicesDep) -> dict[str, Any]:
    return _file(await services.jobs.get_file(tenant, file_id))


@router.delete("/files/{file_id}")
async def delete_file(file_id: str, tenant: TenantDep, services: ServicesDep) -> dict[str, Any]:
    await services.jobs.delete_file(tenant, file_id)
    return {"id": file_id, "object": "file", "deleted": True}


# -- jobs ----------------------------------------------------------------------------------

@router.post("/fine_tuning/jobs")
async def create_job(request: Request, tenant: TenantDep, services: ServicesDep) -> dict[str, Any]:
    body = await parse_json(request, JobCreate)
    if body.model != services.settings.model_name:
        raise InvalidInput(f"model {body.model!r} cannot be fine-tuned here; use "
                           f"{services.settings.model_name!r}", param="model",
                           code="model_not_available")
    if body.method and body.method.get("type", "supervised") != "supervised":
        raise InvalidInput("only supervised fine-tuning is supported", param="method.type")
    lora = body.lora
    if lora.use_dora:
        raise InvalidInput("use_dora: vLLM cannot serve DoRA magnitude vectors (vLLM #6983), so "
                           "such an adapter could not be used here", param="lora.use_dora",
                           code="unservable_adapter")
    if lora.modules_to_save:
        raise InvalidInput("modules_to_save: vLLM cannot serve fully trained extra modules "
                           "(vLLM #9280)", param="lora.modules_to_save", code="unservable_adapter")
    if lora.r > services.settings.max_lora_rank:
        raise InvalidInput(f"lora.r {lora.r} is over the server's max_lora_rank "
                           f"{services.settings.max_lora_rank}", param="lora.r")
    unknown = [t for t in lora.target_modules if t not in services.base_info.module_suffixes()]
    if unknown:
        raise InvalidInput(f"target modules {unknown} do not exist in the base model",
                           param="lora.target_modules")
    adapter_name = check_name(body.suffix, "suffix") if body.suffix else None
    tokenizer = await services.tokenizer()
    for param, file_id in (("training_file", body.training_file),
                           ("validation_file", body.validation_file)):
        if file_id is None:
            continue
        data = await services.jobs.read_file(tenant, file_id)
        report = await asyncio.to_thread(validate_jsonl, data, tokenizer=tokenizer,
                                         max_tokens=lora.max_seq_len,
                                         min_examples=10 if param == "training_file" else 1)
        _raise_for_report(report, param)
    hp = body.hyperparameters
    resolved = {
        "n_epochs": DEFAULT_EPOCHS if hp.n_epochs == "auto" else hp.n_epochs,
        "batch_size": DEFAULT_BATCH_SIZE if hp.batch_size == "auto" else hp.batch_size,
        "learning_rate_multiplier": 1.0 if hp.learning_rate_multiplier == "auto"
        else hp.learning_rate_multiplier,
    }
    job = await services.jobs.create_job(
        tenant, model=body.model, training_file=body.training_file,
        validation_file=body.validation_file, suffix=body.suffix,
        adapter_name=adapter_name or "pending", hyperparameters=resolved,
        lora=lora.model_dump(), seed=body.seed if body.seed is not None else 42)
    if adapter_name is None:
        job.adapter_name = "ft-" + job.id.removeprefix("ftjob-")[:12]
        await services.jobs.update_job(job.id, adapter_name=job.adapter_name)
    return _job(job)


@router.get("/fine_tuning/jobs")
async def list_jobs(tenant: TenantDep, services: ServicesDep, after: str | None = None,
                    limit: int = 20) -> dict[str, Any]:
    rows, more = await services.jobs.list_jobs(tenant, after, max(1, min(limit, 100)))
    return {"object": "list", "data": [_job(j) for j in rows], "has_more": more}


@router.get("/fine_tuning/jobs/{job_id}")
async def retrieve_job(job_id: str, tenant: TenantDep, services: ServicesDep) -> dict[str, Any]:
    return _job(await services.jobs.get_job(tenant, job_id))


@router.post("/fine_tuning/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, tenant: TenantDep, services: ServicesDep) -> dict[str, Any]:
    return _job(await services.jobs.cancel_job(tenant, job_id))


@router.get("/fine_tuning/jobs/{job_id}/events")
async def list_events(job_id: str, tenant: TenantDep, services: ServicesDep,
                      after: str | None = None, limit: int = 20) -> dict[str, Any]:
    rows, more = await services.jobs.list_events(tenant, job_id, after, max(1, min(limit, 1000)))
    return {"object": "list", "data": [_event(e) for e in rows], "has_more": more}


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
async def list_checkpoints(job_id: str, tenant: TenantDep, services: ServicesDep) -> dict[str, Any]:
    job = await services.jobs.get_job(tenant, job_id)
    rows = await services.jobs.list_checkpoints(tenant, job_id)
    return {"object": "list", "data": [_checkpoint(c, job) for c in rows], "has_more": False}


# -- wire objects --------------------------------------------------------------------------

def _raise_for_report(report: Any, param: str) -> None:
    if report.errors:
        shown = "; ".join(f"line {e.line}: {e.message}" if e.line else e.message
                          for e in report.errors[:20])
        raise InvalidInput(f"invalid {param}: {shown}", param=param, code="invalid_dataset")


def _file(f: TrainingFile) -> dict[str, Any]:
    return {"id": f.id, "object": "file", "bytes": f.bytes, "created_at": timestamp(f.created_at),
            "filename": f.filename, "purpose": f.purpose, "status": "processed",
            "status_details": None}


def _job(j: FineTuneJob) -> dict[str, Any]:
    return {
        "id": j.id, "object": "fine_tuning.job", "created_at": timestamp(j.created_at),
        "finished_at": timestamp(j.finished_at) if j.finished_at else None,
        "model": j.model, "fine_tuned_model": j.fine_tuned_model, "organization_id": j.tenant_id,
        "status": j.status, "training_file": j.training_file,
        "validation_file": j.validation_file, "hyperparameters": j.hyperparameters,
        "trained_tokens": j.trained_tokens, "result_files": [], "seed": j.seed,
        "error": j.error, "estimated_finish": None, "integrations": [], "metadata": None,
        "suffix": j.suffix, "lora": j.lora, "eval": (j.result or {}).get("eval"),
        "method": {"type": "supervised",
                   "supervised": {"hyperparameters": j.hyperparameters}},
    }


def _event(e: JobEvent) -> dict[str, Any]:
    return {"id": f"ftevent-{e.id}", "object": "fine_tuning.job.event",
            "created_at": timestamp(e.created_at), "level": e.level, "message": e.message,
            "data": e.data or {}, "type": e.type}


def _checkpoint(c: JobCheckpoint, job: FineTuneJob) -> dict[str, Any]:
    return {"id": f"ftckpt-{job.id.removeprefix('ftjob-')}-{c.step}",
            "object": "fine_tuning.job.checkpoint", "created_at": timestamp(c.created_at),
            "fine_tuning_job_id": job.id, "step_number": c.step, "metrics": c.metrics,
            "fine_tuned_model_checkpoint": None}
