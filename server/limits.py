"""Body-size limits, enforced while the body is read, before any handler buffers it."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters.errors import TooLarge
from server.errors import response_for


class BodyLimit:
    """ASGI middleware: 413 when a body is over its limit (by Content-Length, or as it streams)."""

    def __init__(self, app: ASGIApp, default_limit: int, upload_limit: int,
                 upload_prefixes: tuple[str, ...] = ("/admin/", "/v1/files")) -> None:
        self.app = app
        self.default_limit = default_limit
        self.upload_limit = upload_limit
        self.upload_prefixes = upload_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = (self.upload_limit if scope["path"].startswith(self.upload_prefixes)
                 else self.default_limit)
        too_large = TooLarge(f"request body is over the limit of {limit} bytes",
                             code="request_too_large")
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await response_for(too_large)(scope, receive, send)
                return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise too_large
            return message

        await self.app(scope, limited_receive, send)
