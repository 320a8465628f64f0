"""The tenant API, OpenAI-compatible: chat completions, completions, models."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter
from fastapi.responses import Response

from adapters.errors import NotFound
from server.deps import CallerDep, GatewayDep, ReportLimits
from server.protocol.common import ERROR_RESPONSES
from server.protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    ModelList,
    ModelObject,
)
from server.routes.json_body import JSONBody, JSONBodyRoute
from server.routes.raw_generation import GenerationEndpoint

router = APIRouter(prefix="/v1", tags=["tenant"], route_class=JSONBodyRoute,
                   responses=ERROR_RESPONSES)

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


class _RawRoute(JSONBodyRoute):
    """A route documented by its endpoint's signature (OpenAPI) and served by a raw ASGI
    handler (`server.routes.raw_generation`): the signature is never called."""

    def __init__(self, path: str, endpoint: Callable[..., Coroutine[Any, Any, Any]],
                 **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        body_model = self.body_model
        assert body_model is not None and issubclass(body_model, GenerationRequest)
        self.app = GenerationEndpoint(self.path_format, body_model)


async def chat_completions(caller: CallerDep,
                           req: Annotated[ChatCompletionRequest, JSONBody(ChatCompletionRequest)],
                           ) -> Response:
    """Chat completion through the tenant's adapter or the base model; streams with `stream`."""
    raise NotImplementedError  # served by GenerationEndpoint


async def completions(caller: CallerDep,
                      req: Annotated[CompletionRequest, JSONBody(CompletionRequest)]) -> Response:
    """Text completion through the tenant's adapter or the base model; streams with `stream`."""
    raise NotImplementedError  # served by GenerationEndpoint


for _path, _endpoint in (("/chat/completions", chat_completions), ("/completions", completions)):
    router.add_api_route(_path, _endpoint, methods=["POST"], response_class=Response,
                         responses=_GENERATION_RESPONSES, route_class_override=_RawRoute)


@router.get("/models", dependencies=[ReportLimits])
async def list_models(caller: CallerDep, gateway: GatewayDep) -> ModelList:
    return ModelList(data=await gateway.models(caller.tenant_id))


@router.get("/models/{model:path}", dependencies=[ReportLimits])
async def retrieve_model(model: str, caller: CallerDep, gateway: GatewayDep) -> ModelObject:
    for entry in await gateway.models(caller.tenant_id):
        if entry.id == model:
            return entry
    raise NotFound(f"model {model!r} does not exist", param="model", code="model_not_found")

