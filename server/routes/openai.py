"""The tenant API, OpenAI-compatible: chat completions, completions, models."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from adapters.errors import NotFound, Unavailable
from server.deps import ServicesDep, TenantDep, parse_json
from server.protocol.openai import ChatCompletionRequest, CompletionRequest, GenerationRequest
from server.services import Services

router = APIRouter(prefix="/v1", tags=["tenant"])
T = TypeVar("T")


@router.post("/chat/completions")
async def chat_completions(request: Request, tenant: TenantDep, services: ServicesDep) -> Response:
    req = await parse_json(request, ChatCompletionRequest)
    return await _generate(request, services, tenant, "/v1/chat/completions", req)


@router.post("/completions")
async def completions(request: Request, tenant: TenantDep, services: ServicesDep) -> Response:
    req = await parse_json(request, CompletionRequest)
    return await _generate(request, services, tenant, "/v1/completions", req)


@router.get("/models")
async def list_models(tenant: TenantDep, services: ServicesDep) -> dict[str, Any]:
    return {"object": "list", "data": await services.gateway.models(tenant)}


@router.get("/models/{model:path}")
async def retrieve_model(model: str, tenant: TenantDep, services: ServicesDep) -> dict[str, Any]:
    for entry in await services.gateway.models(tenant):
        if entry["id"] == model:
            return entry
    raise NotFound(f"model {model!r} does not exist", param="model", code="model_not_found")


async def _generate(request: Request, services: Services, tenant: str, path: str,
                    req: GenerationRequest) -> Response:
    if not services.engine_ready:
        raise Unavailable("the inference engine is not ready", code="engine_unavailable",
                          retry_after_s=5)
    record = request.state.record
    if req.stream:
        events = services.gateway.stream(tenant, path, req, record)
        await anext(events)  # errors before the first event become HTTP errors here
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    answer = await _cancel_on_disconnect(request,
                                         services.gateway.complete(tenant, path, req, record))
    return JSONResponse(answer)


class ClientGone(Exception):
    """The client went away before its answer was ready; nobody reads the response."""


async def _cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work` unless the client disconnects first; then cancel it, which closes the engine
    connection and makes vLLM abort the request (as vLLM's own `with_cancellation` does)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        raise ClientGone()
    return task.result()
