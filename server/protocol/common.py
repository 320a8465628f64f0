"""Wire models every API shares: OpenAI's error object and the `responses=` that document it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx answer: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorDetail


# For a router's `responses=`: the error shape under every status the API answers with.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse}
    for status in (400, 401, 403, 404, 409, 413, 429, 503)
}


class Deleted(BaseModel):
    """The answer to a DELETE, as OpenAI's `{"id", "object", "deleted": true}`."""

    id: str
    object: str
    deleted: bool = True
