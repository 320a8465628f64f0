"""Training files, fine-tuning jobs, their events and checkpoints, in the registry database.

Job life (`JobStatus`):

    validating_files -> queued -> running -> succeeded
          |               |         |------> failed
          |               |         '------> cancelled
          '---> failed    '---> cancelled
          '---> cancelled

A job is created in validating_files (its files exist, the recipe is within bounds); the
dataset check that needs the tokenizer runs after the answer and moves it to queued or failed.
A worker claims a queued job (or a running one whose lease ran out: its worker died) with a
compare-and-set update, so two workers never both win it, and renews the lease while it
trains. Losing the lease (or the job being cancelled) tells the worker to stop. Every status
change is a compare-and-set on the status it leaves, so a cancel that lands in between wins.

The bytes live in the store (adapters/store.py blobs), not on the unit that took them, so any
unit and any worker reads them: a training file at `files/<tenant>/<file-id>.jsonl` (its row's
`path` holds that key; rows written before keep an absolute local path, still read), a job's
checkpoints at `checkpoints/<job-id>/step-N/`. The blob is written before its row and deleted
after it, so a row never names a missing blob (a blob without a row is harmless garbage).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Collection
from datetime import datetime, timedelta, timezone
from enum import Enum
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, Result, func, or_, select, update

from adapters.errors import Conflict, InvalidInput, NotFound
from adapters.registry import Registry
from adapters.registry.models import FineTuneJob, JobCheckpoint, JobEvent, TrainingFile, utcnow
from adapters.store import AdapterStore
from adapters.training.recipe import TrainingRecipe

log = logging.getLogger(__name__)


class JobStatus(str, Enum):
    """A fine-tuning job's status, as OpenAI names them (stored as the value)."""

    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:  # the value, also in f-strings and metric labels
        return self.value


ACTIVE: tuple[JobStatus, ...] = (JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.RUNNING)
FINAL: tuple[JobStatus, ...] = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
STATUSES: tuple[JobStatus, ...] = tuple(JobStatus)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def file_key(tenant: str, file_id: str) -> str:
    return f"files/{tenant}/{file_id}.jsonl"


def checkpoints_prefix(job_id: str) -> str:
    return f"checkpoints/{job_id}"


class JobStore:
    def __init__(self, registry: Registry, store: AdapterStore) -> None:
        self.registry = registry
        self.store = store

    # -- files -------------------------------------------------------------------------------

    async def create_file(self, tenant: str, filename: str, purpose: str,
                          data: bytes) -> TrainingFile:
        await self.registry.get_tenant(tenant)
        file_id = "file-" + secrets.token_hex(12)
        key = file_key(tenant, file_id)
        await self.store.put_blob(key, data)  # first: a row never names a missing blob
        try:
            async with self.registry.transaction() as s:
                row = TrainingFile(id=file_id, tenant_id=tenant, filename=filename[:256],
                                   purpose=purpose, bytes=len(data), path=key)
                s.add(row)
        except BaseException:
            await self._forget_blob(key)
            raise
        return row

    async def list_files(self, tenant: str, purpose: str | None = None) -> list[TrainingFile]:
        async with self.registry.transaction() as s:
            q = select(TrainingFile).where(TrainingFile.tenant_id == tenant)
            if purpose:
                q = q.where(TrainingFile.purpose == purpose)
            return list((await s.scalars(q.order_by(TrainingFile.created_at.desc()))).all())

    async def get_file(self, tenant: str, file_id: str) -> TrainingFile:
        async with self.registry.transaction() as s:
            row = await s.get(TrainingFile, file_id)
            if row is None or row.tenant_id != tenant:  # another tenant's file does not exist
                raise NotFound(f"no file with id {file_id!r}", param="file_id",
                               code="file_not_found")
            return row

    async def read_file(self, tenant: str, file_id: str) -> bytes:
        row = await self.get_file(tenant, file_id)
        if Path(row.path).is_absolute():  # a row from before files lived in the store
            try:
                return await asyncio.to_thread(Path(row.path).read_bytes)
            except FileNotFoundError as exc:
                raise NotFound(f"the content of file {file_id!r} is missing", param="file_id",
                               code="file_not_found") from exc
        return await self.store.get_blob(row.path, limit=row.bytes)

    async def delete_file(self, tenant: str, file_id: str) -> None:
        row = await self.get_file(tenant, file_id)
        async with self.registry.transaction() as s:
            await s.delete(await s.get(TrainingFile, row.id))
        if Path(row.path).is_absolute():
            Path(row.path).unlink(missing_ok=True)
        else:
            await self._forget_blob(row.path)

    async def _forget_blob(self, key: str) -> None:
        """Delete a blob no row names; if the store fails it stays, as harmless garbage."""
        try:
            await self.store.delete_blob(key)
        except Exception:
            log.warning("could not delete %s from %s; left behind", key,
                        self.store.description, exc_info=True)

    # -- jobs ----------------------------------------------------------------------------------

    async def create_job(self, tenant: str, *, model: str, training_file: str,
                         recipe: TrainingRecipe, validation_file: str | None = None,
                         suffix: str | None = None,
                         adapter_name: str | None = None,
                         warnings: list[dict[str, Any]] | None = None,
                         evaluation_settings: dict[str, Any] | None = None) -> FineTuneJob:
        """A new job in validating_files; `adapter_name` defaults to `ft-<part of the id>`.
        Each of `warnings` ({"code", "param", "message"}) is also a "warn" event. Move it on
        with `files_validated` or `files_invalid`."""
        job_id = "ftjob-" + secrets.token_hex(12)
        job = FineTuneJob(id=job_id, tenant_id=tenant, model=model, training_file=training_file,
                          validation_file=validation_file, suffix=suffix,
                          adapter_name=adapter_name or "ft-" + job_id.removeprefix("ftjob-")[:12],
                          hyperparameters=recipe.hyperparameters.model_dump(),
                          lora=recipe.lora.model_dump(), seed=recipe.seed,
                          status=JobStatus.VALIDATING_FILES.value, warnings=warnings or [],
                          evaluation_settings=evaluation_settings)
        async with self.registry.transaction() as s:
            s.add(job)
            s.add(JobEvent(job_id=job.id, message="Validating training file"))
            await s.flush()  # the events keep this order (ids follow insertion)
            for warning in warnings or []:
                s.add(JobEvent(job_id=job.id, message=f"Warning: {warning['message']}"[:2000],
                               level="warn", data={"warning": warning["code"]}))
        return job

    async def create_task(self, tenant: str, kind: str, *, model: str, adapter_name: str,
                          params: dict[str, Any], message: str) -> FineTuneJob:
        """A queued job of the training queue that trains nothing (`kind` "merge" or
        "export"); a worker runs it like any job (lease, events, final status)."""
        job_id = "ftjob-" + secrets.token_hex(12)
        job = FineTuneJob(id=job_id, tenant_id=tenant, model=model, training_file="",
                          adapter_name=adapter_name, hyperparameters={}, lora={}, kind=kind,
                          params=params, status=JobStatus.QUEUED.value, warnings=[])
        async with self.registry.transaction() as s:
            s.add(job)
            s.add(JobEvent(job_id=job.id, message=message[:2000]))
        return job

    async def latest_task(self, tenant: str, kind: str, adapter_name: str,
                          **params: Any) -> FineTuneJob | None:
        """The newest job of `kind` for this adapter whose params include `params`."""
        async with self.registry.transaction() as s:
            rows = (await s.scalars(select(FineTuneJob).where(
                FineTuneJob.tenant_id == tenant, FineTuneJob.kind == kind,
                FineTuneJob.adapter_name == adapter_name)
                .order_by(FineTuneJob.created_at.desc()))).all()
        for row in rows:
            if all((row.params or {}).get(k) == v for k, v in params.items()):
                return row
        return None

    async def files_validated(self, job_id: str) -> bool:
        """validating_files -> queued; False if the job had left validating_files."""
        return await self._move(job_id, JobStatus.VALIDATING_FILES, JobStatus.QUEUED,
                                "Files validated; job queued")

    async def files_invalid(self, job_id: str, error: dict[str, Any]) -> bool:
        """validating_files -> failed with `error` ({"code", "param", "message"}); False if
        the job had left validating_files."""
        return await self._move(job_id, JobStatus.VALIDATING_FILES, JobStatus.FAILED,
                                f"Job failed: {error['message']}", level="error",
                                error=error, finished_at=utcnow())

    async def job_ids(self, status: JobStatus) -> list[str]:
        """Every job in `status`, oldest first, of every tenant."""
        async with self.registry.transaction() as s:
            return list((await s.scalars(
                select(FineTuneJob.id).where(FineTuneJob.status == status.value)
                .order_by(FineTuneJob.created_at))).all())

    async def _move(self, job_id: str, was: JobStatus, status: JobStatus, message: str, *,
                    level: str = "info", **fields: Any) -> bool:
        """Compare-and-set `was` -> `status`, with an event when it happened."""
        async with self.registry.transaction() as s:
            result = await s.execute(
                update(FineTuneJob).where(FineTuneJob.id == job_id,
                                          FineTuneJob.status == was.value)
                .values(status=status.value, **fields))
            if _rowcount(result):
                s.add(JobEvent(job_id=job_id, message=message[:2000], level=level))
            return bool(_rowcount(result))

    async def list_jobs(self, tenant: str, after: str | None, limit: int) -> tuple[list[FineTuneJob], bool]:
        async with self.registry.transaction() as s:
            q = select(FineTuneJob).where(FineTuneJob.tenant_id == tenant)
            if after:
                anchor = await s.get(FineTuneJob, after)
                if anchor is not None and anchor.tenant_id == tenant:
                    q = q.where(FineTuneJob.created_at < anchor.created_at)
            rows = list((await s.scalars(
                q.order_by(FineTuneJob.created_at.desc()).limit(limit + 1))).all())
        return rows[:limit], len(rows) > limit

    async def get_job(self, tenant: str | None, job_id: str) -> FineTuneJob:
        """A job; with `tenant`, only that tenant's (another tenant's job does not exist)."""
        async with self.registry.transaction() as s:
            job = await s.get(FineTuneJob, job_id)
            if job is None or (tenant is not None and job.tenant_id != tenant):
                raise NotFound(f"no fine-tuning job with id {job_id!r}", param="fine_tuning_job_id",
                               code="job_not_found")
            return job

    async def cancel_job(self, tenant: str, job_id: str) -> FineTuneJob:
        await self.get_job(tenant, job_id)
        async with self.registry.transaction() as s:
            result = await s.execute(
                update(FineTuneJob).where(FineTuneJob.id == job_id,
                                          FineTuneJob.status.in_(_values(ACTIVE)))
                .values(status=JobStatus.CANCELLED.value, finished_at=utcnow()))
            cancelled = bool(_rowcount(result))
            if cancelled:
                s.add(JobEvent(job_id=job_id, message="Job cancelled"))
        if cancelled:  # its worker (if alive) deletes them too, once it has stopped
            await self.delete_checkpoints(job_id)
        job = await self.get_job(tenant, job_id)
        if job.status != JobStatus.CANCELLED:
            raise Conflict(f"job {job_id} has already {job.status}", code="job_finished")
        return job

    # -- events and checkpoints ------------------------------------------------------------------

    async def add_event(self, job_id: str, message: str, *, level: str = "info",
                        type_: str = "message", data: dict[str, Any] | None = None) -> None:
        async with self.registry.transaction() as s:
            s.add(JobEvent(job_id=job_id, message=message[:2000], level=level, type=type_,
                           data=data or {}))

    async def list_events(self, tenant: str, job_id: str, after: str | None,
                          limit: int) -> tuple[list[JobEvent], bool]:
        await self.get_job(tenant, job_id)
        async with self.registry.transaction() as s:
            q = select(JobEvent).where(JobEvent.job_id == job_id)
            if after and after.startswith("ftevent-") and after[8:].isdigit():
                q = q.where(JobEvent.id < int(after[8:]))
            rows = list((await s.scalars(q.order_by(JobEvent.id.desc()).limit(limit + 1))).all())
        return rows[:limit], len(rows) > limit

    async def add_checkpoint(self, job_id: str, step: int, metrics: dict[str, Any]) -> None:
        async with self.registry.transaction() as s:
            existing = await s.scalar(select(JobCheckpoint).where(
                JobCheckpoint.job_id == job_id, JobCheckpoint.step == step))
            if existing is None:
                s.add(JobCheckpoint(job_id=job_id, step=step, metrics=metrics))

    async def list_checkpoints(self, tenant: str, job_id: str) -> list[JobCheckpoint]:
        await self.get_job(tenant, job_id)
        async with self.registry.transaction() as s:
            return list((await s.scalars(select(JobCheckpoint).where(
                JobCheckpoint.job_id == job_id).order_by(JobCheckpoint.step.desc()))).all())

    async def delete_checkpoints(self, job_id: str) -> None:
        """Remove the job's checkpoint files from the store (it has ended); if the store
        fails they stay behind, unread."""
        try:
            await self.store.delete_prefix(checkpoints_prefix(job_id))
        except Exception:
            log.warning("could not delete the checkpoints of %s from %s; left behind", job_id,
                        self.store.description, exc_info=True)

    async def status_counts(self) -> tuple[dict[str, int], dict[str, float]]:
        """Jobs per status, and the progress of each running job (for metrics)."""
        async with self.registry.transaction() as s:
            counts = dict((await s.execute(
                select(FineTuneJob.status, func.count()).group_by(FineTuneJob.status))).all())
            running = (await s.execute(select(FineTuneJob.id, FineTuneJob.result).where(
                FineTuneJob.status == JobStatus.RUNNING.value))).all()
        progress = {job_id: float((result or {}).get("progress", 0.0))
                    for job_id, result in running}
        return counts, progress

    # -- workers -------------------------------------------------------------------------------

    async def claim(self, worker_id: str, lease_s: float) -> FineTuneJob | None:
        """Take the oldest queued job, or a running one whose worker stopped renewing it."""
        now = _now()
        async with self.registry.transaction() as s:
            candidates = (await s.scalars(
                select(FineTuneJob).where(or_(
                    FineTuneJob.status == JobStatus.QUEUED.value,
                    (FineTuneJob.status == JobStatus.RUNNING.value)
                    & (FineTuneJob.lease_expires_at < now)))
                .order_by(FineTuneJob.created_at).limit(5)
                # PostgreSQL: rows another worker is claiming right now are skipped, not
                # waited for (SQLite renders nothing here: its writers are serialized).
                .with_for_update(skip_locked=True))).all()
            for job in candidates:
                was, attempts = job.status, job.attempts  # the update refreshes `job`
                # Compare-and-set on what we read: only one worker's update matches.
                result = await s.execute(
                    update(FineTuneJob).where(
                        FineTuneJob.id == job.id, FineTuneJob.status == was,
                        FineTuneJob.attempts == attempts)
                    .values(status=JobStatus.RUNNING.value, worker_id=worker_id,
                            attempts=attempts + 1,
                            lease_expires_at=now + timedelta(seconds=lease_s)))
                if _rowcount(result) == 1:
                    resumed = was == JobStatus.RUNNING
                    s.add(JobEvent(job_id=job.id, message=(
                        f"Job resumed by worker {worker_id} (previous worker lost its lease)"
                        if resumed else f"Job started by worker {worker_id}")))
                    await s.flush()
                    await s.refresh(job)
                    return job
        return None

    async def renew(self, job_id: str, worker_id: str, lease_s: float) -> bool:
        """Extend the lease; False if the job is no longer this worker's to run."""
        async with self.registry.transaction() as s:
            result = await s.execute(
                update(FineTuneJob).where(FineTuneJob.id == job_id,
                                          FineTuneJob.worker_id == worker_id,
                                          FineTuneJob.status == JobStatus.RUNNING.value)
                .values(lease_expires_at=_now() + timedelta(seconds=lease_s)))
            return bool(_rowcount(result))

    async def finish(self, job_id: str, worker_id: str, status: JobStatus, message: str,
                     **fields: Any) -> bool:
        """Move a running job of this worker to a final status; False if it was not ours."""
        status = JobStatus(status)
        if status not in FINAL:
            raise ValueError(f"{status} is not a final status")
        async with self.registry.transaction() as s:
            result = await s.execute(
                update(FineTuneJob).where(FineTuneJob.id == job_id,
                                          FineTuneJob.worker_id == worker_id,
                                          FineTuneJob.status == JobStatus.RUNNING.value)
                .values(status=status.value, finished_at=utcnow(), lease_expires_at=None,
                        **fields))
            if _rowcount(result):
                s.add(JobEvent(job_id=job_id, message=message[:2000],
                               level="error" if status == JobStatus.FAILED else "info"))
            return bool(_rowcount(result))

    async def update_job(self, job_id: str, **fields: Any) -> None:
        async with self.registry.transaction() as s:
            await s.execute(update(FineTuneJob).where(FineTuneJob.id == job_id).values(**fields))


def _rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE matched (its result is a CursorResult; `execute` is typed for any)."""
    return cast("CursorResult[Any]", result).rowcount


def _values(statuses: Collection[JobStatus]) -> list[str]:
    return [status.value for status in statuses]


def check_purpose(purpose: str) -> str:
    if purpose != "fine-tune":
        raise InvalidInput(f"purpose {purpose!r} is not supported; use 'fine-tune'",
                           param="purpose")
    return purpose
