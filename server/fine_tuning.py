"""Files and fine-tuning jobs: the logic behind `/v1/files` and `/v1/fine_tuning/jobs` (no
FastAPI here; the routers in server/routes/files.py and jobs.py only call this).

Creating a job checks what is cheap at once (model, method, recipe bounds, target modules,
the files exist, belong to the tenant and are fine-tune files): a 400 or 404 answers those.
The job is then committed in `validating_files` and returned so. The dataset check that needs
the tokenizer (every example parses and fits max_seq_len, enough examples) runs in the
background and moves the job to `queued`, or to `failed` with the error
`{"code": "invalid_training_file" | "invalid_validation_file", "param", "message"}`. Both
moves are compare-and-set on `validating_files`, so a cancel in between wins, and
`resume_validation` (at startup) can re-check jobs a dead gateway left behind, any number of
times.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from adapters.base_model import BaseModelInfo
from adapters.errors import InvalidInput, LoraplexError, NotFound
from adapters.names import check_name
from adapters.registry import timestamp
from adapters.registry.models import FineTuneJob, JobCheckpoint, TrainingFile
from adapters.registry.models import JobEvent as JobEventRow
from adapters.training.dataset import DatasetReport, validate_jsonl
from adapters.training.evaluation import EvaluationReport, EvaluationSettings
from adapters.training.guardrails import data_warnings, rank_warnings
from adapters.training.jobs import JobStatus, JobStore, check_purpose
from adapters.training.recipe import DEFAULT_SEED, LoraRecipe, ResolvedHyperparameters, TrainingRecipe
from server.protocol.fine_tuning import (
    Checkpoint,
    CheckpointList,
    EventList,
    FileDeleted,
    FileList,
    FileObject,
    FineTuningJob,
    JobCreate,
    JobError,
    JobEvent,
    JobList,
    JobWarning,
    Method,
    SupervisedMethod,
)
from server.settings import Settings

log = logging.getLogger(__name__)

MIN_TRAINING_EXAMPLES = 10
SHOWN_LINE_ERRORS = 20
DEFAULT_FILENAME = "upload.jsonl"


class FineTuningService:
    """Tenant-scoped files and jobs. `tokenizer` loads the base model's tokenizer (once);
    `spawn` runs a coroutine in the background (and keeps it referenced)."""

    def __init__(self, jobs: JobStore, settings: Settings, base_info: BaseModelInfo,
                 tokenizer: Callable[[], Awaitable[Any]],
                 spawn: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        self.jobs = jobs
        self.settings = settings
        self.base_info = base_info
        self.tokenizer = tokenizer
        self.spawn = spawn

    # -- files -------------------------------------------------------------------------------

    async def create_file(self, tenant: str, filename: str | None, data: bytes,
                          purpose: str) -> FileObject:
        """Store an upload once every line of it is a valid example (400 naming the lines)."""
        check_purpose(purpose)
        report = await asyncio.to_thread(validate_jsonl, data, min_examples=0)
        if report.errors:
            raise InvalidInput(_describe(report, "file"), param="file", code="invalid_dataset")
        row = await self.jobs.create_file(tenant, filename or DEFAULT_FILENAME, purpose, data)
        return _file(row)

    async def list_files(self, tenant: str, purpose: str | None = None) -> FileList:
        return FileList(data=[_file(f) for f in await self.jobs.list_files(tenant, purpose)])

    async def retrieve_file(self, tenant: str, file_id: str) -> FileObject:
        return _file(await self.jobs.get_file(tenant, file_id))

    async def delete_file(self, tenant: str, file_id: str) -> FileDeleted:
        await self.jobs.delete_file(tenant, file_id)
        return FileDeleted(id=file_id)

    # -- jobs --------------------------------------------------------------------------------

    async def create_job(self, tenant: str, body: JobCreate) -> FineTuningJob:
        """Check what is cheap, commit the job in validating_files, validate the files in the
        background (see the module docstring)."""
        settings = self.settings
        if body.model != settings.model_name:
            raise InvalidInput(f"model {body.model!r} cannot be fine-tuned here; use "
                               f"{settings.model_name!r}", param="model",
                               code="model_not_available")
        if body.method and body.method.get("type", "supervised") != "supervised":
            raise InvalidInput("only supervised fine-tuning is supported", param="method.type")
        recipe = TrainingRecipe(lora=body.lora, hyperparameters=body.hyperparameters.resolve(),
                                seed=DEFAULT_SEED if body.seed is None else body.seed)
        recipe.check(settings.max_lora_rank, self.base_info.module_suffixes())
        adapter_name = check_name(body.suffix, "suffix") if body.suffix else None
        for param, file_id in _files_of(body.training_file, body.validation_file):
            row = await self.jobs.get_file(tenant, file_id)
            if row.purpose != "fine-tune":
                raise InvalidInput(f"file {file_id} has purpose {row.purpose!r}, not "
                                   "'fine-tune'", param=param)
        warnings = rank_warnings(recipe) + await self._data_warnings(tenant, body, recipe)
        job = await self.jobs.create_job(
            tenant, model=body.model, training_file=body.training_file,
            validation_file=body.validation_file, suffix=body.suffix,
            adapter_name=adapter_name, recipe=recipe, warnings=warnings,
            evaluation_settings=body.evaluation.model_dump())
        self.spawn(self.validate_files(job.id))
        return _job(job)

    async def _data_warnings(self, tenant: str, body: JobCreate,
                             recipe: TrainingRecipe) -> list[dict[str, Any]]:
        """The guard rails on the files (adapters/training/guardrails.py). They only warn: a
        store that cannot give the files back now skips them (the dataset check reports it)."""
        try:
            training = await self.jobs.read_file(tenant, body.training_file)
            validation = (await self.jobs.read_file(tenant, body.validation_file)
                          if body.validation_file else None)
        except LoraplexError as exc:
            log.warning("guard rails of a job of %s skipped: %s", tenant, exc)
            return []
        return await asyncio.to_thread(data_warnings, recipe, training, validation)

    async def list_jobs(self, tenant: str, after: str | None, limit: int) -> JobList:
        rows, more = await self.jobs.list_jobs(tenant, after, max(1, min(limit, 100)))
        return JobList(data=[_job(j) for j in rows], has_more=more)

    async def retrieve_job(self, tenant: str, job_id: str) -> FineTuningJob:
        return _job(await self.jobs.get_job(tenant, job_id))

    async def cancel_job(self, tenant: str, job_id: str) -> FineTuningJob:
        return _job(await self.jobs.cancel_job(tenant, job_id))

    async def list_events(self, tenant: str, job_id: str, after: str | None,
                          limit: int) -> EventList:
        rows, more = await self.jobs.list_events(tenant, job_id, after, max(1, min(limit, 1000)))
        return EventList(data=[_event(e) for e in rows], has_more=more)

    async def list_checkpoints(self, tenant: str, job_id: str) -> CheckpointList:
        job = await self.jobs.get_job(tenant, job_id)
        rows = await self.jobs.list_checkpoints(tenant, job_id)
        return CheckpointList(data=[_checkpoint(c, job) for c in rows])

    # -- background validation ---------------------------------------------------------------

    async def resume_validation(self) -> None:
        """Validate every job still in validating_files (one whose gateway died before its
        check ended), one after another. Safe to run while other gateways validate the same
        jobs: only one move out of validating_files happens per job."""
        for job_id in await self.jobs.job_ids(JobStatus.VALIDATING_FILES):
            await self.validate_files(job_id)

    async def validate_files(self, job_id: str) -> None:
        """Check a validating_files job's datasets with the tokenizer; move it to queued or
        failed. Never raises: an unexpected error fails the job with code internal_error."""
        try:
            error = await self._dataset_error(job_id)
            if error is None:
                await self.jobs.files_validated(job_id)
            else:
                await self.jobs.files_invalid(job_id, error.model_dump())
        except Exception:  # a background task: fail the job, never the gateway
            log.exception("validating the files of job %s failed", job_id)
            try:
                await self.jobs.files_invalid(job_id, JobError(
                    code="internal_error", param=None,
                    message="the files could not be validated (server error); create the job "
                            "again").model_dump())
            except Exception:  # left in validating_files: resume_validation
                log.exception("could not fail job %s", job_id)

    async def _dataset_error(self, job_id: str) -> JobError | None:
        """What is wrong with the job's files, or None (also None for a job that has left
        validating_files: there is nothing to do)."""
        try:
            job = await self.jobs.get_job(None, job_id)
        except NotFound:  # deleted with its tenant meanwhile
            return None
        if job.status != JobStatus.VALIDATING_FILES:
            return None
        recipe = TrainingRecipe.of_job(job)
        tokenizer = await self.tokenizer()
        for param, file_id in _files_of(job.training_file, job.validation_file):
            code = f"invalid_{param}"
            try:
                data = await self.jobs.read_file(job.tenant_id, file_id)
            except NotFound:
                return JobError(code=code, param=param,
                                message=f"invalid {param}: file {file_id} no longer exists")
            report = await asyncio.to_thread(
                validate_jsonl, data, tokenizer=tokenizer, max_tokens=recipe.lora.max_seq_len,
                min_examples=MIN_TRAINING_EXAMPLES if param == "training_file" else 1)
            if report.errors:
                return JobError(code=code, param=param, message=_describe(report, param))
        return None


# -- wire objects ----------------------------------------------------------------------------

def _files_of(training_file: str, validation_file: str | None) -> list[tuple[str, str]]:
    files = [("training_file", training_file)]
    if validation_file is not None:
        files.append(("validation_file", validation_file))
    return files


def _describe(report: DatasetReport, what: str) -> str:
    shown = "; ".join(str(e) for e in report.errors[:SHOWN_LINE_ERRORS])
    return f"invalid {what}: {shown}"


def _file(f: TrainingFile) -> FileObject:
    return FileObject(id=f.id, bytes=f.bytes, created_at=timestamp(f.created_at),
                      filename=f.filename, purpose=f.purpose)


def _job(j: FineTuneJob) -> FineTuningJob:
    hyperparameters = ResolvedHyperparameters.model_validate(j.hyperparameters)
    return FineTuningJob(
        id=j.id, created_at=timestamp(j.created_at),
        finished_at=timestamp(j.finished_at) if j.finished_at else None,
        model=j.model, fine_tuned_model=j.fine_tuned_model, organization_id=j.tenant_id,
        status=JobStatus(j.status), training_file=j.training_file,
        validation_file=j.validation_file, hyperparameters=hyperparameters,
        trained_tokens=j.trained_tokens, seed=j.seed,
        error=JobError.model_validate(j.error) if j.error else None, suffix=j.suffix,
        method=Method(supervised=SupervisedMethod(hyperparameters=hyperparameters)),
        lora=LoraRecipe.model_validate(j.lora), eval=(j.result or {}).get("eval"),
        warnings=[JobWarning.model_validate(w) for w in j.warnings or []],
        evaluation_settings=(EvaluationSettings.model_validate(j.evaluation_settings)
                             if j.evaluation_settings else None),
        evaluation=EvaluationReport.model_validate(j.evaluation) if j.evaluation else None,
        kind=j.kind,  # type: ignore[arg-type]  # one of the Literal's values, as written
        params=_public(j.params))


job_object = _job  # the job API's object of a job row (the admin and merge routes use it)


def _public(params: dict[str, Any] | None) -> dict[str, Any] | None:
    """A merge or export job's params without the store keys (internal)."""
    if params is None:
        return None
    shown = {k: v for k, v in params.items() if k != "store_key"}
    if "sources" in shown:
        shown["sources"] = [{k: v for k, v in s.items() if k != "store_key"}
                            for s in shown["sources"]]
    return shown


def _event(e: JobEventRow) -> JobEvent:
    return JobEvent.model_validate({
        "id": f"ftevent-{e.id}", "created_at": timestamp(e.created_at), "level": e.level,
        "message": e.message, "data": e.data or {}, "type": e.type})


def _checkpoint(c: JobCheckpoint, job: FineTuneJob) -> Checkpoint:
    return Checkpoint(id=f"ftckpt-{job.id.removeprefix('ftjob-')}-{c.step}",
                      created_at=timestamp(c.created_at), fine_tuning_job_id=job.id,
                      step_number=c.step, metrics=c.metrics)
