"""The two generation endpoints as raw ASGI handlers: the gateway's hot path.

Every streamed token of every tenant passes here, so it skips what a forwarder does not need
per request and per chunk: FastAPI's dependency solving, Starlette's `Request` and
`StreamingResponse` (a task group per request and several `send` wrappers per chunk). The
behaviour is the documented route's (`server.routes.openai`), which declares these endpoints
for OpenAPI and is served by this handler: same authentication, same 400s for the body, same
errors in OpenAI's shape (`server.errors.response_for`), same disconnect handling.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, Awaitable
from typing import TypeVar

from starlette.types import Receive, Scope, Send

from adapters.errors import LoraplexError
from server.deps import parse_json_bytes
from server.errors import response_for
from server.protocol.openai import GenerationRequest
from server.request_log import RequestRecord
from server.services import Services

T = TypeVar("T")

_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache")]
_DONE = b"data: [DONE]\n\n"  # the last event of every stream, vLLM's and the gateway's
# Status for a request whose client left before its answer (nginx's "client closed request").
CLIENT_GONE = 499


class GenerationEndpoint:
    """POST `path` (chat completions or completions), with the body parsed as `model`."""

    def __init__(self, path: str, model: type[GenerationRequest]) -> None:
        self.path = path
        self.model = model

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        services: Services = scope["app"].state.services
        record: RequestRecord = scope["state"]["record"]
        tenant_header = authorization = None
        for name, value in scope["headers"]:
            if name == b"x-tenant-id":
                tenant_header = value.decode("latin-1")
            elif name == b"authorization":
                authorization = value.decode("latin-1")
        try:
            # The key is checked before the body is read: nothing is parsed for strangers.
            caller = await services.auth.caller(tenant_header, authorization)
            record.tenant, record.key_id = caller.tenant_id, caller.key_id
            req = parse_json_bytes(await _read_body(receive), self.model)
            gateway = services.gateway
            if req.stream:
                events = gateway.stream(caller, self.path, req, record)
                await anext(events)  # errors before the first event are HTTP errors
            else:
                answer = await unless_disconnected(
                    receive, gateway.complete(caller, self.path, req, record))
        except LoraplexError as exc:
            await response_for(exc)(scope, receive, send)
            return
        except ClientGone:
            record.status = CLIENT_GONE
            return
        if req.stream:
            await _send_events(events, receive, send, record)
        else:
            body = json.dumps(answer, ensure_ascii=False, separators=(",", ":")).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [*_JSON_HEADERS, (b"content-length", b"%d" % len(body))]})
            await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _send_events(events: AsyncGenerator[bytes, None], receive: Receive, send: Send,
                       record: RequestRecord) -> None:
    """Relay the stream; a client that leaves cancels it, which closes the engine connection
    and makes vLLM abort the request."""
    # Once the last event is handed to `send`, a disconnect is the answer ending, not the
    # client leaving early: clients close as soon as they read `[DONE]` (the OpenAI SDK does),
    # and uvicorn answers `receive` with http.disconnect once the response is complete, while
    # the stream's own end (closing the engine connection, settling usage) may still await.
    ended = False

    async def relay() -> None:
        nonlocal ended
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        async for chunk in events:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            ended = ended or chunk.endswith(_DONE)
        ended = True
        await send({"type": "http.response.body", "body": b""})

    try:
        await unless_disconnected(receive, relay())
    except (ClientGone, OSError):  # OSError: a write found the client gone
        if not ended:
            record.status = CLIENT_GONE
    finally:
        await events.aclose()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class ClientGone(Exception):
    """The client went away before its answer was ready; nobody reads the response."""


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Run `work` unless the client disconnects first; then cancel it, which closes the engine
    connection and makes vLLM abort the request (as vLLM's own `with_cancellation` does)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            # Let it unwind before going on: its engine connection is closed on return.
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientGone()
    return task.result()

