"""`server.limits.BodyLimit` on its own: which limit applies where, by header and by stream."""

from __future__ import annotations

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from adapters.errors import LoraplexError
from server.errors import response_for
from server.limits import BodyLimit


async def _echo_size(request: Request) -> JSONResponse:
    return JSONResponse({"size": len(await request.body())})


def _client(default_limit: int = 100, upload_limit: int = 1000) -> httpx.AsyncClient:
    app = Starlette(routes=[Route("/v1/x", _echo_size, methods=["POST"]),
                            Route("/admin/x", _echo_size, methods=["POST"])],
                    exception_handlers={LoraplexError: lambda _r, exc: response_for(exc)})
    app.add_middleware(BodyLimit, default_limit=default_limit, upload_limit=upload_limit)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def _chunks(total: int, size: int = 64):
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        sent += n
        yield b"a" * n


async def test_limits_by_path_and_content_length():
    async with _client() as client:
        assert (await client.post("/v1/x", content=b"a" * 100)).json() == {"size": 100}
        resp = await client.post("/v1/x", content=b"a" * 101)
        assert resp.status_code == 413
        assert resp.json()["error"]["code"] == "request_too_large"
        assert "100 bytes" in resp.json()["error"]["message"]
        # The admin API takes uploads up to the larger limit.
        assert (await client.post("/admin/x", content=b"a" * 1000)).json() == {"size": 1000}
        resp = await client.post("/admin/x", content=b"a" * 1001)
        assert resp.status_code == 413 and "1000 bytes" in resp.json()["error"]["message"]


async def test_limits_without_content_length():
    async with _client() as client:
        resp = await client.post("/v1/x", content=_chunks(100))
        assert "content-length" not in resp.request.headers
        assert resp.json() == {"size": 100}
        resp = await client.post("/v1/x", content=_chunks(101))
        assert resp.status_code == 413
        assert resp.json()["error"]["type"] == "invalid_request_error"
        assert (await client.post("/admin/x", content=_chunks(1000))).json() == {"size": 1000}
        assert (await client.post("/admin/x", content=_chunks(1001))).status_code == 413


async def test_lying_content_length_is_still_caught_while_streaming():
    async with _client() as client:
        request = client.build_request("POST", "/v1/x", content=_chunks(500),
                                       headers={"Content-Length": "50"})
        resp = await client.send(request)
        assert resp.status_code == 413
