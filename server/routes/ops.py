"""Operations: health for load balancers, Prometheus metrics (the gateway's and vLLM's)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from adapters.errors import Unavailable
from server.deps import ServicesDep
from server.protocol.common import ErrorResponse

router = APIRouter(tags=["ops"])


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str


@router.get("/healthz", responses={503: {"model": ErrorResponse}})
async def healthz(services: ServicesDep) -> Health:
    """200 once the engine can take requests; 503 (with Retry-After) while it cannot."""
    if not services.readiness.ready:
        raise Unavailable("engine not ready", code="engine_unavailable", retry_after_s=5,
                          retryable=True)  # another unit may be ready
    return Health(model=services.settings.model_name)


_PROMETHEUS = {200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}}


@router.get("/metrics", response_class=Response, responses=_PROMETHEUS)  # type: ignore[arg-type]
async def metrics(services: ServicesDep) -> Response:
    return Response(services.metrics.exposition() + await services.residency_metrics(),
                    media_type=CONTENT_TYPE_LATEST)


@router.get("/metrics/engine", response_class=Response,
            responses={**_PROMETHEUS, 503: {"model": ErrorResponse}})  # type: ignore[dict-item]
async def engine_metrics(services: ServicesDep) -> Response:
    """vLLM's own metrics, passed through (the engine itself listens on loopback only)."""
    return Response(await services.engine.metrics(), media_type=CONTENT_TYPE_LATEST)
