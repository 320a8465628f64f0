"""The gateway application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server.errors import install_error_handlers
from server.limits import BodyLimit
from server.request_log import RequestObserver
from server.routes import (
    adapters,
    admin_jobs,
    console,
    engine,
    files,
    jobs,
    keys,
    limits,
    openai,
    ops,
    tenants,
    usage,
)
from server.routes.json_body import install_openapi
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
    install_openapi(app)

    # The tenant API and fine-tuning (OpenAI's shapes), the admin API by resource, operations,
    # the web console.
    for module in (openai, files, jobs, tenants, keys, limits, adapters, engine, admin_jobs,
                   usage, ops, console):
        app.include_router(module.router)

    app.add_middleware(BodyLimit, default_limit=services.settings.max_request_bytes,
                       upload_limit=services.settings.max_upload_bytes)
    # Added last, so it is outermost: it sees every answer, 413s included.
    app.add_middleware(RequestObserver, metrics=services.metrics,
                       unit=services.settings.unit_name, meter=services.usage)
    return app
