"""The tenant API, OpenAI-compatible: chat completions, completions, models."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from adapters.errors import NotFound
from adapters.registry import KeyOwner
from server.deps import CallerDep, GatewayDep, ReportLimits
from server.gateway import Gateway
from server.protocol.common import ERROR_RESPONSES
from server.protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    ModelList,
    ModelObject,
)
from server.routes.json_body import JSONBody, JSONBodyRoute

router = APIRouter(prefix="/v1", tags=["tenant"], route_class=JSONBodyRoute,
                   responses=ERROR_RESPONSES)
T = TypeVar("T")

# The answers are vLLM's, relayed (model renamed): documented as objects, not re-validated.
_GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {200: {
    "description": "The engine's completion object, or with `stream: true` server-sent events "
                   "(`data: {chunk}` ... `data: [DONE]`).",
    "content": {"application/json": {"schema": {"type": "object"}},
                # One server-sent event; `data` is a chunk object as JSON, or `[DONE]`.
                "text/event-stream": {"schema": {
                    "type": "object", "required": ["data"],
                    "properties": {"data": {"type": "string"}, "event": {"type": "string"},
                                   "id": {"type": "string"}, "retry": {"type": "integer"}}}}}}}


@router.post("/chat/completions", response_class=Response, responses=_GENERATION_RESPONSES)
async def chat_completions(request: Request, caller: CallerDep, gateway: GatewayDep,
                           req: Annotated[ChatCompletionRequest, JSONBody(ChatCompletionRequest)],
                           ) -> Response:
    return await _generate(request, gateway, caller, "/v1/chat/completions", req)


@router.post("/completions", response_class=Response, responses=_GENERATION_RESPONSES)
async def completions(request: Request, caller: CallerDep, gateway: GatewayDep,
                      req: Annotated[CompletionRequest, JSONBody(CompletionRequest)]) -> Response:
    return await _generate(request, gateway, caller, "/v1/completions", req)


@router.get("/models", dependencies=[ReportLimits])
async def list_models(caller: CallerDep, gateway: GatewayDep) -> ModelList:
    return ModelList(data=await gateway.models(caller.tenant_id))


@router.get("/models/{model:path}", dependencies=[ReportLimits])
async def retrieve_model(model: str, caller: CallerDep, gateway: GatewayDep) -> ModelObject:
    for entry in await gateway.models(caller.tenant_id):
        if entry.id == model:
            return entry
    raise NotFound(f"model {model!r} does not exist", param="model", code="model_not_found")


async def _generate(request: Request, gateway: Gateway, caller: KeyOwner, path: str,
                    req: GenerationRequest) -> Response:
    record = request.state.record
    if req.stream:
        events = gateway.stream(caller, path, req, record)
        await anext(events)  # errors before the first event become HTTP errors here
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    answer = await _cancel_on_disconnect(request, gateway.complete(caller, path, req, record))
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
