"""Tenant API: files (OpenAI-compatible; datasets for fine-tuning)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile

from adapters.errors import InvalidInput
from server.deps import FineTuningDep, ReportLimits, TenantDep
from server.protocol.common import ERROR_RESPONSES
from server.protocol.fine_tuning import FileDeleted, FileList, FileObject

router = APIRouter(prefix="/v1", tags=["files"], responses=ERROR_RESPONSES,
                   dependencies=[ReportLimits])

# The form is read by hand, after the key is checked (nothing is buffered for strangers), so
# its shape is described here for /openapi.json.
_UPLOAD_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {
        "type": "object", "required": ["file", "purpose"],
        "properties": {"file": {"type": "string", "format": "binary",
                                "description": "A JSONL dataset: chat or prompt/completion."},
                       "purpose": {"type": "string", "enum": ["fine-tune"]}}}}}}}


@router.post("/files", openapi_extra=_UPLOAD_BODY)
async def create_file(tenant: TenantDep, fine_tuning: FineTuningDep,
                      request: Request) -> FileObject:
    """Upload a JSONL dataset (purpose `fine-tune`); every line is checked (400 naming them)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidInput("upload the file as multipart/form-data with 'file' and 'purpose'")
    form = await request.form(max_files=1, max_fields=4)
    try:
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise InvalidInput("missing the 'file' part", param="file")
        if not isinstance(purpose, str):
            raise InvalidInput("missing 'purpose'", param="purpose")
        return await fine_tuning.create_file(tenant, upload.filename, await upload.read(),
                                             purpose)
    finally:
        await form.close()


@router.get("/files")
async def list_files(tenant: TenantDep, fine_tuning: FineTuningDep,
                     purpose: str | None = None) -> FileList:
    return await fine_tuning.list_files(tenant, purpose)


@router.get("/files/{file_id}")
async def retrieve_file(file_id: str, tenant: TenantDep, fine_tuning: FineTuningDep) -> FileObject:
    return await fine_tuning.retrieve_file(tenant, file_id)


@router.delete("/files/{file_id}")
async def delete_file(file_id: str, tenant: TenantDep, fine_tuning: FineTuningDep) -> FileDeleted:
    return await fine_tuning.delete_file(tenant, file_id)
