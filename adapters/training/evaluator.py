"""How a training worker has its adapter evaluated through the serving engine: it asks a
gateway (`POST /admin/tenants/{t}/evaluations`, the admin token), which answers with the
report. The worker runs without a gateway of its own (on any machine sharing the registry
and the store), so the gateway is reached over HTTP: LORAPLEX_GATEWAY_URL, by default the
host and port `loraplex up` serves on.

A gateway that is starting or restarting gets a few tries; one that stays unreachable, or
refuses the request, raises `EvaluationUnavailable` (the worker then reports what it measured
itself, the held-out losses).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import httpx

from adapters.errors import LoraplexError

log = logging.getLogger(__name__)

RETRY_PAUSES_S = (2.0, 5.0, 10.0)
RETRY_STATUSES = frozenset({502, 503, 504})


class EvaluationUnavailable(LoraplexError):
    """The serving engine's evaluation could not be had."""

    code = "evaluation_unavailable"


class Evaluator(Protocol):
    async def evaluate(self, tenant: str, body: dict[str, Any]) -> dict[str, Any]:
        """The evaluation report (EvaluationReport's JSON) of `body` (EvaluationCreate's)."""
        ...


class GatewayEvaluator:
    def __init__(self, base_url: str, admin_token: str, timeout_s: float, *,
                 transport: httpx.AsyncBaseTransport | None = None,
                 retry_pauses_s: tuple[float, ...] = RETRY_PAUSES_S) -> None:
        self.base_url = base_url.rstrip("/")
        self.admin_token = admin_token
        self.timeout = httpx.Timeout(timeout_s, connect=10.0)
        self.transport = transport
        self.retry_pauses_s = retry_pauses_s

    async def evaluate(self, tenant: str, body: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.base_url}/admin/tenants/{tenant}/evaluations"
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        problem = ""
        async with httpx.AsyncClient(timeout=self.timeout, transport=self.transport) as client:
            for attempt, pause in enumerate((0.0, *self.retry_pauses_s)):
                await asyncio.sleep(pause)
                try:
                    r = await client.post(url, json=body, headers=headers)
                except httpx.TransportError as exc:  # not up (yet), reset, timed out
                    problem = f"the gateway at {self.base_url} is unreachable ({exc!r})"
                    log.warning("evaluation attempt %d: %s", attempt + 1, problem)
                    continue
                if r.status_code == 200:
                    report: dict[str, Any] = r.json()
                    return report
                problem = f"the gateway answered {r.status_code}: {_message(r)}"
                if r.status_code not in RETRY_STATUSES:
                    break
                log.warning("evaluation attempt %d: %s", attempt + 1, problem)
        raise EvaluationUnavailable(problem[:1000])


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:300]
