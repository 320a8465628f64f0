"""Tenant API: files (OpenAI-compatible; datasets for fine-tuning)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from server.deps import FineTuningDep, TenantDep
from server.protocol.common import ERROR_RESPONSES
from server.protocol.fine_tuning import FileDeleted, FileList, FileObject

router = APIRouter(prefix="/v1", tags=["files"], responses=ERROR_RESPONSES)


@router.post("/files")
async def create_file(file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()],
                      tenant: TenantDep, fine_tuning: FineTuningDep) -> FileObject:
    """Upload a JSONL dataset (purpose `fine-tune`); every line is checked (400 naming them)."""
    return await fine_tuning.create_file(tenant, file.filename, await file.read(), purpose)


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
