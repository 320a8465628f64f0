"""The two headers Envoy relies on in front of units (server/cluster/envoy.py):

- `X-Loraplex-Unit: <unit_name>` on every answer, errors and streams included;
- `x-loraplex-retryable: 1` only on 503 engine_unavailable refusals made before any work (Envoy
  retries those on another unit), never on other errors nor on a stream broken mid-way
  (in-band, after the status was sent).
"""

from __future__ import annotations

import httpx
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from adapters.errors import Forbidden, NotFound, Overloaded, Unavailable
from server.errors import response_for
from server.metrics import Metrics
from server.request_log import RequestObserver
from tests.unit.test_gateway_behaviour import BASE, sse_events

UNIT = "x-loraplex-unit"
RETRYABLE = "x-loraplex-retryable"


def _no_retry(resp: httpx.Response) -> None:
    assert RETRYABLE not in resp.headers, (resp.status_code, dict(resp.headers))


async def test_every_answer_names_the_unit(gw, make_adapter):
    assert gw.settings.unit_name == "127.0.0.1:8000"  # default: host:port
    key = await gw.new_tenant("acme")
    await gw.register("acme", "support", make_adapter())
    stream = {"model": "support", "stream": True,
              "messages": [{"role": "user", "content": "Hi"}]}
    answers = [
        await gw.client.get("/healthz"),
        await gw.chat("acme", key, "support"),
        await gw.client.get("/v1/models", headers=gw.headers("acme", key)),
        await gw.admin("GET", "/admin/tenants"),
        await gw.chat("acme", "lpx-wrong", "support"),  # 401
        await gw.chat("acme", key, "nope"),  # 404
        await gw.client.post("/v1/chat/completions", content=b"x" * (5 * 1024 * 1024),
                             headers=gw.headers("acme", key)),  # 413, from the body limit
        await gw.client.get("/no/such/path"),  # 404 from routing
    ]
    async with gw.client.stream("POST", "/v1/chat/completions", json=stream,
                                headers=gw.headers("acme", key)) as resp:
        await resp.aread()
    answers.append(resp)
    assert [a.status_code for a in answers] == [200, 200, 200, 200, 401, 404, 413, 404, 200]
    for answer in answers:
        assert answer.headers.get(UNIT) == "127.0.0.1:8000", (answer.request.url, answer.headers)
        assert answer.headers.get("x-request-id")
        if answer.status_code != 503:
            _no_retry(answer)


async def test_unit_name_setting_and_explicit_name():
    from server.settings import Settings

    assert Settings(unit_name="unit1:8000").unit_name == "unit1:8000"
    assert Settings(host="::1", port=8101).unit_name == "[::1]:8101"

    async def hello(_request):
        return PlainTextResponse("hi")

    app = RequestObserver(Starlette(routes=[Route("/", hello)]), Metrics(), unit="10.0.0.7:8000")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as client:
        resp = await client.get("/")
    assert resp.headers[UNIT] == "10.0.0.7:8000"


async def test_engine_down_refusals_are_retryable(gw):
    key = await gw.new_tenant("acme")
    gw.transport.down = True  # connections to the engine are refused
    refused = [await gw.chat("acme", key, BASE)]
    async with gw.client.stream("POST", "/v1/chat/completions", headers=gw.headers("acme", key),
                                json={"model": BASE, "stream": True,
                                      "messages": [{"role": "user", "content": "Hi"}]}) as resp:
        await resp.aread()
    refused.append(resp)
    gw.transport.down = False
    gw.services.readiness.mark_down("test: the engine restarts")  # not ready yet
    refused += [await gw.chat("acme", key, BASE), await gw.client.get("/healthz")]
    for resp in refused:
        gw.expect_error(resp, 503, code="engine_unavailable")
        assert resp.headers[RETRYABLE] == "1", resp.headers
        assert int(resp.headers["retry-after"]) >= 1
        assert resp.headers[UNIT] == "127.0.0.1:8000"
    gw.services.readiness.mark_up()
    ok = await gw.chat("acme", key, BASE)
    assert ok.status_code == 200
    _no_retry(ok)


async def test_an_engine_that_fails_mid_answer_is_not_retryable(gw):
    """A read timeout or a connection lost after the request reached the engine: the engine
    may have done the work, so Envoy must not run it again on another unit."""
    key = await gw.new_tenant("acme")

    gw.transport.fail_inference = httpx.ReadTimeout("the engine took too long")
    resp = await gw.chat("acme", key, BASE)
    gw.expect_error(resp, 503, code="engine_unavailable")
    _no_retry(resp)


async def test_a_stream_broken_mid_way_is_not_retryable(gw):
    key = await gw.new_tenant("acme")
    gw.transport.break_streams = (2, httpx.ReadError("connection reset by peer"))
    async with gw.client.stream("POST", "/v1/chat/completions", headers=gw.headers("acme", key),
                                json={"model": BASE, "stream": True,
                                      "messages": [{"role": "user", "content": "Hi"}]}) as resp:
        text = (await resp.aread()).decode()
    assert resp.status_code == 200
    assert '"engine_unavailable"' in sse_events(text)[2]  # reported in-band
    _no_retry(resp)
    assert resp.headers[UNIT] == "127.0.0.1:8000"


def test_only_refusals_before_any_work_are_retryable():
    retryable = response_for(Unavailable("engine down", code="engine_unavailable",
                                         retry_after_s=5, retryable=True))
    assert retryable.status_code == 503 and retryable.headers[RETRYABLE] == "1"
    for exc, status in [
        # The engine was reached and failed mid-answer (read timeout): the work may be done.
        (Unavailable("engine timed out", code="engine_unavailable", retry_after_s=5), 503),
        (Unavailable("the store is unreachable", code="store_unavailable", retry_after_s=5), 503),
        (Unavailable("no code"), 503),
        (Overloaded("every slot busy", code="adapter_slots_busy", retry_after_s=1), 429),
        (NotFound("no such model"), 404),
        (Forbidden("not yours"), 403),
    ]:
        resp = response_for(exc)
        assert resp.status_code == status
        assert RETRYABLE not in resp.headers, exc
