"""HTTP client for the vLLM OpenAI server: inference, health and the runtime LoRA API.

Transport failures become `Unavailable` (503 with Retry-After); engine error answers become
`EngineError`, which keeps the engine's status and OpenAI-shaped body.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from httpx_aiohttp import AiohttpTransport

from adapters.errors import LoraplexError, Unavailable


class EngineError(LoraplexError):
    """The engine answered with an error status; its message is relayed to the caller."""

    def __init__(self, status: int, body: bytes) -> None:
        message, param, code = f"engine error {status}", None, None
        try:
            err = json.loads(body).get("error", {})
            message = err.get("message") or message
            param = err.get("param")
        except (ValueError, AttributeError):
            pass
        super().__init__(message, param=param, code=code)
        self.status = status


def _unavailable(exc: Exception) -> Unavailable:
    # Only a request that never reached the engine may be run again elsewhere: a read
    # timeout or a connection lost mid-answer means the engine may have done the work.
    return Unavailable(f"the inference engine is unavailable ({type(exc).__name__})",
                       code="engine_unavailable", retry_after_s=5,
                       retryable=isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)))


class EngineClient:
    def __init__(self, base_url: str, timeout_s: float,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        # One pooled client for the gateway's life, sized for many concurrent streams. Its
        # transport is aiohttp's: per streamed token it costs about half of httpcore's (measured
        # with py-spy under loadtest/bench.py), and every token of every stream passes here.
        limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, transport=transport or AiohttpTransport(limits=limits),
            timeout=httpx.Timeout(timeout_s, connect=5.0), limits=limits)
        self._urls: dict[str, httpx.URL] = {}

    async def aclose(self) -> None:
        await self._http.aclose()

    async def healthy(self) -> bool:
        try:
            resp = await self._http.get("/health", timeout=5.0)
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    async def load_adapter(self, engine_name: str, path: Path) -> None:
        await self._post_admin("/v1/load_lora_adapter",
                               {"lora_name": engine_name, "lora_path": str(path)})

    async def unload_adapter(self, engine_name: str) -> None:
        await self._post_admin("/v1/unload_lora_adapter", {"lora_name": engine_name})

    async def loaded_adapters(self) -> list[str]:
        try:
            resp = await self._http.get("/v1/models", timeout=10.0)
        except httpx.HTTPError as exc:
            raise _unavailable(exc) from exc
        if resp.status_code != 200:
            raise EngineError(resp.status_code, resp.content)
        return [m["id"] for m in resp.json().get("data", []) if m.get("parent")]

    async def metrics(self) -> str:
        try:
            resp = await self._http.get("/metrics", timeout=10.0)
        except httpx.HTTPError as exc:
            raise _unavailable(exc) from exc
        return resp.text

    async def _post_admin(self, path: str, body: dict[str, Any]) -> None:
        try:
            resp = await self._http.post(path, json=body, timeout=120.0)
        except httpx.HTTPError as exc:
            raise _unavailable(exc) from exc
        if resp.status_code != 200:
            raise EngineError(resp.status_code, resp.content)

    def _url(self, path: str) -> httpx.URL:
        """The engine URL of `path`, parsed once: httpx parses a relative path on every call."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self.base_url + path)
        return url

    async def post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A non-streaming inference call."""
        try:
            resp = await self._http.post(self._url(path), json=body)
        except httpx.HTTPError as exc:
            raise _unavailable(exc) from exc
        if resp.status_code != 200:
            raise EngineError(resp.status_code, resp.content)
        return resp.json()  # type: ignore[no-any-return]

    @asynccontextmanager
    async def stream_events(self, path: str,
                            body: dict[str, Any]) -> AsyncIterator[AsyncIterator[list[bytes]]]:
        """A streaming inference call, as server-sent events in the bursts they arrive in.

        The status is checked before the first event is given, and leaving the context closes
        the connection, which makes vLLM abort the request."""
        # identity: the raw body is the event stream itself, never compressed.
        request = self._http.build_request("POST", self._url(path), json=body,
                                           headers={"Accept-Encoding": "identity"})
        try:
            resp = await self._http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise _unavailable(exc) from exc
        try:
            if resp.status_code != 200:
                raise EngineError(resp.status_code, await resp.aread())
            yield _events(resp)
        finally:
            await resp.aclose()


async def _events(resp: httpx.Response) -> AsyncIterator[list[bytes]]:
    """Complete events (without their blank-line terminator), a list per network read.

    Whole events are passed on as bytes instead of being split into decoded lines: the
    gateway's per-token cost is what the engine's token rate is multiplied by. vLLM ends every
    event with a blank line ("\n\n").

    A stream the engine breaks off (killed, connection reset, read timeout) raises
    `Unavailable` after the complete events that did arrive; an incomplete one is dropped.
    """
    pending = b""
    try:
        async for data in resp.aiter_raw():
            *events, pending = (pending + data).split(b"\n\n")
            if events:
                yield events
    except httpx.HTTPError as exc:
        raise _broken(exc) from exc
    if pending.strip():
        yield [pending]


def _broken(exc: Exception) -> Unavailable:
    return Unavailable(f"the inference engine broke off the stream ({type(exc).__name__}); "
                       "retry shortly", code="engine_unavailable", retry_after_s=5)
