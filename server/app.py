"""The gateway application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.errors import error_response, install_error_handlers
from server.limits import BodyLimit
from server.request_log import RequestObserver
from server.routes import admin, fine_tuning, openai
from server.routes.openai import ClientGone
from server.services import Services


def create_app(services: Services) -> FastAPI:
    """Build the gateway around already-built services; the app's lifespan starts and stops them."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await services.start()
        try:
            yield
        finally:
            await services.stop()

    app = FastAPI(title="loraplex", version="0.1.0", lifespan=lifespan,
                  docs_url="/docs", redoc_url=None)
    app.state.services = services
    install_error_handlers(app)

    @app.exception_handler(ClientGone)
    async def _gone(_req: Request, _exc: ClientGone) -> Response:
        return Response(status_code=499)

    app.include_router(openai.router)
    app.include_router(fine_tuning.router)
    app.include_router(admin.router)

    @app.get("/metrics", tags=["ops"])
    async def metrics() -> Response:
        return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/metrics/engine", tags=["ops"])
    async def engine_metrics() -> Response:
        """vLLM's own metrics, passed through (the engine itself listens on loopback only)."""
        return Response(await services.engine.metrics(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> Any:
        if not services.engine_ready:
            return error_response(503, "engine not ready", "service_unavailable_error",
                                  code="engine_unavailable", retry_after_s=5)
        return JSONResponse({"status": "ok", "model": services.settings.model_name})

    app.add_middleware(BodyLimit, default_limit=services.settings.max_request_bytes,
                       upload_limit=services.settings.max_upload_bytes)
    # Added last, so it is outermost: it sees every answer, 413s included.
    app.add_middleware(RequestObserver, metrics=services.metrics)
    return app
