"""One structured line and one set of metrics per request, written when the answer is done.

An `X-Request-ID` is accepted (if it is short and plain) or generated, and returned; every
answer, errors included, names the unit that served it in `X-Loraplex-Unit` (the setting
`unit_name`: behind Envoy, which of the units answered). Handlers
add what they learn (tenant, adapter, tokens, time to first token) to the request's
`RequestRecord` (`request.state.record`). No prompt or completion text is ever logged.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.metrics import BASE_LABEL, Metrics
from server.quotas.usage import UsageMeter

log = logging.getLogger("loraplex.access")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Tenant API endpoints measured in request metrics (fixed set: bounded `endpoint` label).
TENANT_ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions",
                    "/v1/models": "models"}
METERED = {"chat", "completions"}  # endpoints whose requests are billed (usage metering)


@dataclass
class RequestRecord:
    request_id: str
    method: str
    path: str
    status: int = 0
    tenant: str | None = None
    key_id: str | None = None
    model: str | None = None
    adapter: str | None = None  # adapter name, or None for the base model
    stream: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_s: float | None = None
    latency_s: float = 0.0
    # Code of an error reported in-band after the status was sent (a stream the engine broke).
    error: str | None = None
    # Headers to add to the answer, whatever it is (the x-ratelimit-* of the tenant's limits).
    headers: list[tuple[bytes, bytes]] | None = None

    def meter(self, meter: UsageMeter, error: bool) -> None:
        """Count this request in the tenant's usage if it was for a model the tenant has
        (`model` is set once resolved); refused ones (429s, engine errors) as errors."""
        if self.model is not None:
            meter.record(self.tenant or "", self.adapter, self.key_id, self.prompt_tokens or 0,
                         self.completion_tokens or 0, error=error)


class RequestObserver:
    """ASGI middleware: request id, unit name, access log line, request metrics and usage
    metering. `unit` is the X-Loraplex-Unit value (the setting `unit_name`)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, unit: str,
                 meter: UsageMeter | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.meter = meter
        self._unit = unit.encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers", ())).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        record = RequestRecord(request_id, scope["method"], scope["path"])
        scope.setdefault("state", {})["record"] = record
        endpoint = TENANT_ENDPOINTS.get(scope["path"])
        started = time.perf_counter()
        added = [(b"x-request-id", request_id.encode())]
        if self._unit:
            added.append((b"x-loraplex-unit", self._unit))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message["headers"] = [*message.get("headers", []), *added,
                                      *(record.headers or ())]
            await send(message)

        if endpoint:
            self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            record.latency_s = time.perf_counter() - started
            if endpoint:
                self.metrics.in_flight.dec()
                self._observe(endpoint, record)
            # vars(), not dataclasses.asdict: no deep copy, on every request.
            log.info(json.dumps({k: v for k, v in vars(record).items()
                                 if v is not None and k != "headers"}))

    def _observe(self, endpoint: str, r: RequestRecord) -> None:
        m = self.metrics
        tenant = r.tenant or "unauthenticated"
        tenant, adapter = m.pair(tenant, r.adapter or BASE_LABEL)
        m.requests.labels(tenant, adapter, endpoint, str(r.status or 499)).inc()
        m.latency.labels(endpoint, "true" if r.stream else "false").observe(r.latency_s)
        if r.ttft_s is not None:
            m.ttft.labels(tenant).observe(r.ttft_s)
        if r.prompt_tokens:
            m.prompt_tokens.labels(tenant, adapter).inc(r.prompt_tokens)
        if r.completion_tokens:
            m.completion_tokens.labels(tenant, adapter).inc(r.completion_tokens)
        if self.meter is not None and endpoint in METERED:
            r.meter(self.meter, error=r.status >= 400 or r.status == 0 or r.error is not None)
