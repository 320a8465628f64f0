"""Every error leaves the gateway here, as OpenAI's error object:

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.errors import (
    Conflict,
    Corrupt,
    Forbidden,
    InvalidInput,
    LoraplexError,
    NotFound,
    Overloaded,
    TooLarge,
    Unauthenticated,
    Unavailable,
)
from server.cluster.envoy import RETRYABLE_HEADER
from server.engine.client import EngineError

log = logging.getLogger(__name__)

# Most specific class first: the first match wins.
_STATUS: list[tuple[type[LoraplexError], int, str]] = [
    (InvalidInput, 400, "invalid_request_error"),
    (Unauthenticated, 401, "authentication_error"),
    (Forbidden, 403, "permission_error"),
    (NotFound, 404, "not_found_error"),
    (Conflict, 409, "conflict_error"),
    (TooLarge, 413, "invalid_request_error"),
    (Overloaded, 429, "rate_limit_error"),
    (Unavailable, 503, "service_unavailable_error"),
    (Corrupt, 502, "server_error"),
]
_TYPE_BY_STATUS = {400: "invalid_request_error", 401: "authentication_error",
                   403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
                   409: "conflict_error", 413: "invalid_request_error",
                   422: "invalid_request_error", 429: "rate_limit_error"}


def error_body(message: str, type_: str, param: str | None = None,
               code: str | int | None = None) -> dict[str, object]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str | None = None,
                   param: str | None = None, code: str | int | None = None,
                   retry_after_s: float | None = None) -> JSONResponse:
    type_ = type_ or _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "error")
    headers = {"Retry-After": str(math.ceil(retry_after_s))} if retry_after_s else None
    return JSONResponse(error_body(message, type_, param, code), status_code=status,
                        headers=headers)


def response_for(exc: LoraplexError) -> JSONResponse:
    if isinstance(exc, EngineError):
        # Engine 4xx (bad sampling params, prompt too long) are the caller's; 5xx are ours.
        status = exc.status if 400 <= exc.status < 500 else 502
        return error_response(status, exc.message, param=exc.param,
                              code=None if status < 500 else "engine_error")
    for cls, status, type_ in _STATUS:
        if isinstance(exc, cls):
            response = error_response(status, exc.message, exc.error_type or type_, exc.param,
                                      exc.code, exc.retry_after_s)
            response.headers.update(exc.headers or {})
            if isinstance(exc, Unavailable) and exc.retryable:
                # Refused before any work (engine unreachable, not ready, restarted): Envoy may
                # retry it on another unit. Other 503s (a store outage, an engine that failed
                # mid-answer) are not: the work may have been done, or fail the same everywhere.
                response.headers[RETRYABLE_HEADER] = "1"
            return response
    log.error("unmapped error %r", exc)
    return error_response(500, exc.message, "server_error", exc.param, exc.code)


_LOCATIONS = ("body", "query", "path", "header", "cookie")
# Errors about the body as a whole: not JSON, or not the JSON object expected.
_NOT_A_JSON_OBJECT = {"model_attributes_type", "dict_type", "model_type"}


def validation_error_response(errors: Sequence[Any]) -> JSONResponse:
    """A 400 for FastAPI's request validation errors, naming the first offending field."""
    first = errors[0] if errors else {}
    loc = tuple(first.get("loc", ()))
    kind = first.get("type")
    if kind == "json_invalid":  # loc is ("body", <character offset>): not a field
        reason = (first.get("ctx") or {}).get("error") or first.get("msg", "")
        return error_response(400, f"request body is not valid JSON: {reason}",
                              code="invalid_json")
    if loc == ("body",) and kind in _NOT_A_JSON_OBJECT:
        return error_response(400, "request body must be a JSON object", code="invalid_json")
    if loc == ("body",) and kind == "missing":
        return error_response(400, "a JSON request body is required", code="invalid_json")
    where = ".".join(str(p) for p in loc if p not in _LOCATIONS) or None
    message = first.get("msg", "invalid request")
    return error_response(400, f"{where}: {message}" if where else message,
                          param=where, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LoraplexError)
    async def _loraplex(_req: Request, exc: LoraplexError) -> JSONResponse:
        return response_for(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error_response(exc.errors())

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = error_response(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})  # e.g. a 405's Allow
        return response

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(500, "internal error", "server_error")
