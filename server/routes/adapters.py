"""Admin: a tenant's adapters, their versions, pins and aliases."""

from __future__ import annotations

import json
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import UploadFile

from adapters.errors import InvalidInput
from adapters.sources import AdapterSources, UploadedFile
from adapters.training.evaluation import EvaluationReport
from server.adapter_jobs import AdapterJobService
from server.deps import AdminDep, AdminServiceDep, ServicesDep, parse_json
from server.protocol.admin import (
    AdapterList,
    AdapterObject,
    AdapterVersionObject,
    AliasDeleted,
    AliasObject,
    AliasSet,
    VersionSource,
)
from server.protocol.common import ERROR_RESPONSES, Deleted
from server.protocol.fine_tuning import (
    EvaluationCreate,
    ExportCreate,
    ExportDtype,
    ExportObject,
    FineTuningJob,
    MergeCreate,
)
from server.routes.jobs import EvaluationsDep
from server.routes.json_body import JSONBody, JSONBodyRoute


async def get_adapter_jobs(services: ServicesDep) -> AdapterJobService:
    return AdapterJobService(services.registry, services.jobs, services.store,
                             services.settings.model_name, services.settings.max_lora_rank)


AdapterJobsDep = Annotated[AdapterJobService, Depends(get_adapter_jobs)]

router = APIRouter(prefix="/admin", tags=["admin: adapters"], dependencies=[AdminDep],
                   responses=ERROR_RESPONSES, route_class=JSONBodyRoute)

def _inline(schema: Any, defs: dict[str, Any]) -> Any:
    """`schema` with its local `$defs` references replaced by what they name."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            return _inline(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
        return {k: _inline(v, defs) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [_inline(v, defs) for v in schema]
    return schema


def _json_version_body() -> dict[str, Any]:
    """The JSON body: a folder to copy (`path` or `source`), or `merge`; one at a time."""
    copy, merge = VersionSource.model_json_schema(), MergeCreate.model_json_schema()
    return {"type": "object", "additionalProperties": False,
            "description": "One of: 'path' or 'source' (copy an adapter folder; "
                           f"{copy.get('description', '')}), or 'merge' (a new version merged "
                           "from several of the tenant's versions, by a worker job: 202)",
            "properties": {**_inline(copy, copy.get("$defs", {}))["properties"],
                           **_inline(merge, merge.get("$defs", {}))["properties"]}}


# One endpoint takes either the files (multipart) or a folder to copy them from (JSON), so
# its body is read by hand and described here for /openapi.json.
_VERSION_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {
        "type": "object",
        "description": "One file part per adapter file, named after the file "
                       "(curl -F adapter_config.json=@... -F adapter_model.safetensors=@...).",
        "properties": {"adapter_config.json": {"type": "string", "format": "binary"},
                       "adapter_model.safetensors": {"type": "string", "format": "binary"}},
        "required": ["adapter_config.json", "adapter_model.safetensors"]}},
    "application/json": {"schema": _json_version_body()},
}}}


@router.post("/tenants/{tenant}/adapters/{name}/versions", status_code=201,
             response_model=AdapterVersionObject, openapi_extra=_VERSION_BODY,
             responses={202: {"model": FineTuningJob, "description": "a merge job"}})
async def create_version(tenant: str, name: str, request: Request, admin: AdminServiceDep,
                         adapter_jobs: AdapterJobsDep) -> AdapterVersionObject | JSONResponse:
    """Register a new version of the adapter (created with its first version): from files
    (multipart), a folder (`path`, `source`), or merged from several of the tenant's versions
    (`merge`: answered 202 with the merge job; its `fine_tuned_model` names the version)."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form(max_files=8, max_fields=8)
        try:
            return await admin.register_upload(tenant, name, _uploaded_files(form.multi_items()))
        finally:
            await form.close()
    if await _asks_to_merge(request):
        body = await parse_json(request, MergeCreate)
        job = await adapter_jobs.merge(tenant, name, body.merge)
        return JSONResponse(job.model_dump(mode="json"), status_code=202)
    return await admin.register_from(tenant, name, await parse_json(request, VersionSource))


async def _asks_to_merge(request: Request) -> bool:
    try:
        data = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False  # parse_json says what is wrong
    return isinstance(data, dict) and "merge" in data


def _uploaded_files(items: list[tuple[str, UploadFile | str]]) -> list[UploadedFile]:
    files = []
    for field_name, value in items:
        if not isinstance(value, UploadFile):
            raise InvalidInput(f"form field {field_name!r} is not a file; send one file "
                               "part per adapter file", param=field_name)
        files.append(UploadedFile(AdapterSources.upload_name(field_name, value.filename),
                                  value.file))
    return files


@router.get("/tenants/{tenant}/adapters")
async def list_adapters(tenant: str, admin: AdminServiceDep) -> AdapterList:
    return await admin.list_adapters(tenant)


@router.get("/tenants/{tenant}/adapters/{name}")
async def get_adapter(tenant: str, name: str, admin: AdminServiceDep) -> AdapterObject:
    return await admin.get_adapter(tenant, name)


@router.delete("/tenants/{tenant}/adapters/{name}")
async def delete_adapter(tenant: str, name: str, admin: AdminServiceDep) -> Deleted:
    """Delete the adapter with every version and alias (unloaded once idle, files erased)."""
    return await admin.delete_adapter(tenant, name)


@router.get("/tenants/{tenant}/adapters/{name}/versions/{version}")
async def get_version(tenant: str, name: str, version: int,
                      admin: AdminServiceDep) -> AdapterVersionObject:
    return await admin.get_version(tenant, name, version)


@router.delete("/tenants/{tenant}/adapters/{name}/versions/{version}")
async def delete_version(tenant: str, name: str, version: int, admin: AdminServiceDep) -> Deleted:
    return await admin.delete_version(tenant, name, version)


@router.put("/tenants/{tenant}/adapters/{name}/versions/{version}/pin")
async def pin_version(tenant: str, name: str, version: int,
                      admin: AdminServiceDep) -> AdapterVersionObject:
    """Preload this version now and at every engine start, and keep it resident."""
    return await admin.pin(tenant, name, version)


@router.delete("/tenants/{tenant}/adapters/{name}/versions/{version}/pin")
async def unpin_version(tenant: str, name: str, version: int,
                        admin: AdminServiceDep) -> AdapterVersionObject:
    return await admin.unpin(tenant, name, version)


@router.put("/tenants/{tenant}/adapters/{name}/aliases/{alias}")
async def set_alias(tenant: str, name: str, alias: str, admin: AdminServiceDep,
                    body: Annotated[AliasSet, JSONBody(AliasSet)]) -> AliasObject:
    return await admin.set_alias(tenant, name, alias, body.version)


@router.delete("/tenants/{tenant}/adapters/{name}/aliases/{alias}")
async def delete_alias(tenant: str, name: str, alias: str, admin: AdminServiceDep) -> AliasDeleted:
    return await admin.delete_alias(tenant, name, alias)


@router.post("/tenants/{tenant}/evaluations")
async def create_evaluation(tenant: str, evaluations: EvaluationsDep,
                            body: Annotated[EvaluationCreate, JSONBody(EvaluationCreate)]
                            ) -> EvaluationReport:
    """POST /v1/fine_tuning/evaluations on the tenant's behalf (its limits and fair share);
    the training worker's end-of-job evaluation."""
    return await evaluations.run(await evaluations.caller_for(tenant), body)


@router.post("/tenants/{tenant}/adapters/{name}/versions/{version}/export", status_code=202)
async def export_version(tenant: str, name: str, version: int, adapter_jobs: AdapterJobsDep,
                         body: Annotated[ExportCreate, JSONBody(ExportCreate, optional=True)]
                         ) -> ExportObject:
    """Start exporting the base model with this version merged in (a job of the training
    worker); an export of the same dtype already queued, running or done is answered again."""
    return await adapter_jobs.export(tenant, name, version, body.dtype)


@router.get("/tenants/{tenant}/adapters/{name}/versions/{version}/export")
async def get_export(tenant: str, name: str, version: int, adapter_jobs: AdapterJobsDep,
                     dtype: ExportDtype | None = None) -> ExportObject:
    """The latest export of this version (of that `dtype`, if given): its status, and once
    done the folder in the store with each file's size, sha256 and download URL."""
    return await adapter_jobs.get_export(tenant, name, version, dtype)


@router.get("/tenants/{tenant}/adapters/{name}/versions/{version}/export/files/{file_path:path}",
            response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}},
                             "description": "the file's bytes"}})
async def download_export_file(tenant: str, name: str, version: int, file_path: str,
                               adapter_jobs: AdapterJobsDep,
                               dtype: ExportDtype | None = None) -> StreamingResponse:
    """One file of the finished export (a path from its `files`), streamed from the store.
    Its sha256 is in the ETag and `X-Loraplex-Sha256`; the bytes are checked against it as
    they are read, and a stream that does not match is cut short, never completed."""
    file = await adapter_jobs.open_export_file(tenant, name, version, file_path, dtype)
    filename = quote(file_path.rsplit("/", 1)[-1], safe="")
    return StreamingResponse(file.chunks, media_type="application/octet-stream", headers={
        "content-length": str(file.size), "etag": f'"{file.sha256}"',
        "x-loraplex-sha256": file.sha256,
        "content-disposition": f"attachment; filename*=UTF-8''{filename}"})
