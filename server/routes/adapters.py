"""Admin: a tenant's adapters, their versions, pins and aliases."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile

from adapters.errors import InvalidInput
from adapters.sources import AdapterSources, UploadedFile
from adapters.training.evaluation import EvaluationReport
from server.deps import AdminDep, AdminServiceDep, parse_json
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
from server.protocol.fine_tuning import EvaluationCreate
from server.routes.jobs import EvaluationsDep
from server.routes.json_body import JSONBody, JSONBodyRoute

router = APIRouter(prefix="/admin", tags=["admin: adapters"], dependencies=[AdminDep],
                   responses=ERROR_RESPONSES, route_class=JSONBodyRoute)

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
    "application/json": {"schema": VersionSource.model_json_schema()},
}}}


@router.post("/tenants/{tenant}/adapters/{name}/versions", status_code=201,
             openapi_extra=_VERSION_BODY)
async def create_version(tenant: str, name: str, request: Request,
                         admin: AdminServiceDep) -> AdapterVersionObject:
    """Register a new version of the adapter (created with its first version)."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form(max_files=8, max_fields=8)
        try:
            return await admin.register_upload(tenant, name, _uploaded_files(form.multi_items()))
        finally:
            await form.close()
    return await admin.register_from(tenant, name, await parse_json(request, VersionSource))


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
