"""Admin jobs on a tenant's adapter versions that the training worker runs: skill merging (a
new version from several, adapters/training/merging.py) and merged-model export
(adapters/training/export.py). No FastAPI here; server/routes/adapters.py calls it.

What can be checked from the registry is checked here, so that a request that cannot succeed
gets a 400 (or 404) at once: the sources exist, are of one base model, have ranks the method
can combine, and the result fits `max_lora_rank`. The job then runs like a fine-tuning job
(lease, events, cancel) and is seen through the job APIs.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import quote, urlencode

from adapters.errors import Conflict, InvalidInput, NotFound
from adapters.names import check_name, parse_model_ref
from adapters.registry import Registry, timestamp
from adapters.registry.models import FineTuneJob
from adapters.store import AdapterStore, FolderFile, LocalStore
from adapters.training.jobs import JobStatus, JobStore
from adapters.training.merging import Source, check_merge
from adapters.validation import CONFIG_FILE
from server.fine_tuning import job_object
from server.protocol.fine_tuning import ExportObject, FineTuningJob, JobError, MergeSpec

REUSED = (JobStatus.QUEUED.value, JobStatus.RUNNING.value, JobStatus.SUCCEEDED.value)


class AdapterJobService:
    def __init__(self, registry: Registry, jobs: JobStore, store: AdapterStore,
                 model_name: str, max_lora_rank: int) -> None:
        self.registry = registry
        self.jobs = jobs
        self.store = store
        self.model_name = model_name
        self.max_lora_rank = max_lora_rank

    async def merge(self, tenant: str, name: str, spec: MergeSpec) -> FineTuningJob:
        """Check the merge, queue its job; `fine_tuned_model` names the version once done."""
        check_name(name, "adapter")
        await self.registry.get_tenant(tenant)
        sources, keys = [], []
        for i, source in enumerate(spec.sources):
            param = f"merge.sources.{i}.model"
            try:
                ref = parse_model_ref(source.model)
                version = await self.registry.resolve(tenant, ref)
            except (InvalidInput, NotFound) as exc:
                raise InvalidInput(f"source {source.model!r} is not a version of an adapter of "
                                   f"{tenant}: {exc.message}", param=param,
                                   code="unknown_source") from exc
            if await self._uses_rslora(version.store_key):
                # add_weighted_adapter folds each source's scale into its weights and gives
                # the result alpha = r; an rsLoRA source would be scaled again when served.
                raise InvalidInput(f"source {source.model!r} is an rsLoRA adapter "
                                   "(use_rslora), which cannot be merged", param=param,
                                   code="rslora_not_mergeable")
            sources.append(Source(model=f"{ref.adapter}@{version.version}",
                                  weight=source.weight, rank=version.rank,
                                  target_modules=tuple(version.target_modules),
                                  base_model=version.base_model))
            keys.append(version.store_key)
        rank = check_merge(spec.method, sources, spec.density, self.max_lora_rank)
        params = {"method": spec.method, "density": spec.density,
                  "majority_sign_method": spec.majority_sign_method, "rank": rank,
                  "sources": [{"model": s.model, "weight": s.weight, "store_key": key}
                              for s, key in zip(sources, keys, strict=True)]}
        job = await self.jobs.create_task(
            tenant, "merge", model=self.model_name, adapter_name=name, params=params,
            message=f"Merge of {', '.join(s.model for s in sources)} ({spec.method}) queued")
        return job_object(job)

    async def _uses_rslora(self, key: str) -> bool:
        folder = await self.store.checkout(key)
        try:
            raw = await asyncio.to_thread((folder / CONFIG_FILE).read_bytes)
        finally:
            self.store.release(key)
        config = json.loads(raw)  # checked at registration: a JSON object
        return bool(config.get("use_rslora"))

    async def export(self, tenant: str, name: str, version: int,
                     dtype: str = "auto") -> ExportObject:
        """Queue the export of a version (one of that dtype already queued, running or done
        is reused)."""
        row = await self.registry.get_version(tenant, name, version)
        # Matched on the version's sha256 too: an adapter deleted and made again reuses its
        # version numbers, never the exports of the old one.
        job = await self.jobs.latest_task(tenant, "export", name, version=version, dtype=dtype,
                                          sha256=row.sha256)
        if job is None or job.status not in REUSED:
            job = await self.jobs.create_task(
                tenant, "export", model=self.model_name, adapter_name=name,
                params={"version": version, "dtype": dtype, "store_key": row.store_key,
                        "sha256": row.sha256},
                message=f"Export of {name}@{version} merged into the base model queued")
        return self._export_object(job)

    async def get_export(self, tenant: str, name: str, version: int,
                         dtype: str | None = None) -> ExportObject:
        """The latest export of the version (of that dtype, if given)."""
        return self._export_object(await self._latest_export(tenant, name, version, dtype))

    async def open_export_file(self, tenant: str, name: str, version: int, rel: str,
                               dtype: str | None = None) -> FolderFile:
        """One file of the version's latest export (of that dtype, if given), to download;
        checked against the export's marker as it is read."""
        export = self._export_object(await self._latest_export(tenant, name, version, dtype))
        if export.status != JobStatus.SUCCEEDED or export.store_key is None:
            raise Conflict(f"the export of {name}@{version} is {export.status.value}, not "
                           f"succeeded; its files can be downloaded once it is done",
                           code="export_not_ready")
        if rel not in (export.files or {}):
            raise NotFound(f"the export of {name}@{version} has no file {rel!r}; GET the export "
                           "for its list of files", code="export_file_not_found")
        return await self.store.open_folder_file(export.store_key, rel)

    async def _latest_export(self, tenant: str, name: str, version: int,
                             dtype: str | None) -> FineTuneJob:
        row = await self.registry.get_version(tenant, name, version)
        same = {"dtype": dtype} if dtype is not None else {}
        job = await self.jobs.latest_task(tenant, "export", name, version=version,
                                          sha256=row.sha256, **same)
        if job is None:
            of = f" as {dtype}" if dtype is not None else ""
            raise NotFound(f"{name}@{version} has not been exported{of}; POST to export it",
                           code="export_not_found")
        return job

    def _export_object(self, job: FineTuneJob) -> ExportObject:
        params = job.params or {}
        done = ((job.result or {}).get("export") or {}) if job.status == "succeeded" else {}
        key = done.get("store_key")
        return ExportObject(
            adapter=job.adapter_name, version=int(params["version"]),
            dtype=params.get("dtype", "auto"), job_id=job.id,
            status=JobStatus(job.status), created_at=timestamp(job.created_at),
            finished_at=timestamp(job.finished_at) if job.finished_at else None,
            store_key=key, location=self._location(key) if key else None,
            files=self._with_urls(job, done.get("files")),
            error=JobError.model_validate(job.error) if job.error else None)

    @staticmethod
    def _with_urls(job: FineTuneJob, files: dict[str, dict[str, Any]] | None
                   ) -> dict[str, dict[str, Any]] | None:
        """Each file's entry with the admin API path that downloads it (from this export)."""
        if files is None:
            return None
        params = job.params or {}
        base = "/" + "/".join(quote(str(part), safe="") for part in (
            "admin", "tenants", job.tenant_id, "adapters", job.adapter_name, "versions",
            params["version"], "export", "files"))
        query = "?" + urlencode({"dtype": params.get("dtype", "auto")})
        return {rel: {**meta, "url": f"{base}/{quote(rel)}{query}"}
                for rel, meta in files.items()}

    def _location(self, key: str) -> str:
        if isinstance(self.store, LocalStore):
            return str(self.store.blob_path(key))
        return f"{self.store.description}/{key}"
