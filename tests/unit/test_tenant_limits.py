"""Tenant and key limits through the real gateway (stand-in engine, in-process counters with a
fake clock): the admin API, 429s in OpenAI's shape with its x-ratelimit-* headers, token
reservations settled to usage, the max_tokens cap, concurrency, and Redis outages."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone
from typing import Any

import httpx
import pytest

from server.protocol.openai import ChatCompletionRequest
from server.quotas.counters import Counters, CountersUnavailable, LocalCounters
from server.quotas.limiter import format_reset
from server.quotas.redis_counters import RedisCounters
from server.quotas.tokens import PromptTokens
from tests.redis_server import RedisServer

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
RATE_HEADERS = {f"x-ratelimit-{what}-{kind}" for what in ("limit", "remaining", "reset")
                for kind in ("requests", "tokens")}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(gw: Any) -> Clock:
    clock = Clock()
    gw.services.gateway.limiter.counters = LocalCounters(clock=clock)
    return clock


async def set_limits(gw: Any, tenant: str, key_id: str | None = None,
                     **limits: Any) -> dict[str, Any]:
    path = f"/admin/tenants/{tenant}" + (f"/keys/{key_id}" if key_id else "") + "/limits"
    resp = await gw.admin("PUT", path, json=limits)
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


async def key_id_of(gw: Any, tenant: str) -> str:
    return (await gw.admin("GET", f"/admin/tenants/{tenant}/keys")).json()["data"][0]["id"]  # type: ignore[no-any-return]


# -- the admin API -----------------------------------------------------------------------------

async def test_limits_round_trip_and_absent_fields_are_unlimited(gw: Any) -> None:
    await gw.new_tenant("acme")
    got = (await gw.admin("GET", "/admin/tenants/acme/limits")).json()
    assert got == {"object": "tenant.limits", "tenant": "acme", "requests_per_minute": None,
                   "tokens_per_minute": None, "max_in_flight": None, "max_tokens": None,
                   "weight": None}
    put = await set_limits(gw, "acme", requests_per_minute=60, tokens_per_minute=10_000,
                           max_in_flight=4, max_tokens=256, weight=2.5)
    assert (await gw.admin("GET", "/admin/tenants/acme/limits")).json() == put
    assert put["requests_per_minute"] == 60 and put["weight"] == 2.5
    # PUT replaces: what is absent becomes unlimited
    put = await set_limits(gw, "acme", tokens_per_minute=500)
    assert put["requests_per_minute"] is None and put["tokens_per_minute"] == 500
    key_id = await key_id_of(gw, "acme")
    got = await set_limits(gw, "acme", key_id, requests_per_minute=5)
    assert got == {"object": "api_key.limits", "tenant": "acme", "key_id": key_id,
                   "requests_per_minute": 5, "tokens_per_minute": None, "max_in_flight": None,
                   "max_tokens": None}
    assert (await gw.admin("GET", f"/admin/tenants/acme/keys/{key_id}/limits")).json() == got


@pytest.mark.parametrize("body", [
    {"requests_per_minute": -1}, {"requests_per_minute": 0}, {"tokens_per_minute": 1.5},
    {"max_in_flight": "10"}, {"max_tokens": True}, {"requests_per_minute": 10**12},
    {"tokens_per_minute": 10**30}, {"weight": 0}, {"weight": -2}, {"weight": 10**6},
    {"rpm": 5}, [], "60",
])
async def test_bad_limits_are_400s_and_change_nothing(gw: Any, body: Any) -> None:
    await gw.new_tenant("acme")
    await set_limits(gw, "acme", requests_per_minute=7)
    resp = await gw.admin("PUT", "/admin/tenants/acme/limits", json=body)
    gw.expect_error(resp, 400)
    assert (await gw.admin("GET", "/admin/tenants/acme/limits")).json()[
        "requests_per_minute"] == 7


async def test_limits_of_unknown_tenants_and_keys_are_404s(gw: Any) -> None:
    await gw.new_tenant("acme")
    await gw.new_tenant("other")
    other_key = await key_id_of(gw, "other")
    gw.expect_error(await gw.admin("GET", "/admin/tenants/nobody/limits"), 404,
                    code="tenant_not_found")
    gw.expect_error(await gw.admin("PUT", "/admin/tenants/nobody/limits", json={}), 404)
    gw.expect_error(await gw.admin("GET", "/admin/tenants/acme/keys/nokey/limits"), 404,
                    code="key_not_found")
    # another tenant's key is not found under this one
    gw.expect_error(await gw.admin("PUT", f"/admin/tenants/acme/keys/{other_key}/limits",
                                   json={"max_tokens": 5}), 404, code="key_not_found")
    gw.expect_error(await gw.client.get("/admin/tenants/acme/limits"), 401)


# -- requests per minute -----------------------------------------------------------------------

async def test_requests_per_minute_429_in_openai_shape_then_refills(gw: Any, clock: Clock) -> None:
    key = await gw.new_tenant("acme")
    await set_limits(gw, "acme", requests_per_minute=2)
    first = await gw.chat("acme", key, BASE)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-reset-requests"] == "30s"
    assert "x-ratelimit-limit-tokens" not in first.headers  # no token limit set
    assert (await gw.chat("acme", key, BASE)).headers["x-ratelimit-remaining-requests"] == "0"
    refused = await gw.chat("acme", key, BASE)
    err = gw.expect_error(refused, 429, code="rate_limit_exceeded",
                          contains="requests per min (RPM): Limit 2")
    assert err["type"] == "requests"
    assert refused.headers["retry-after"] == "30" and refused.headers["retry-after-ms"] == "30000"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    clock.now += 30  # one request's worth comes back
    assert (await gw.chat("acme", key, BASE)).status_code == 200
    gw.expect_error(await gw.chat("acme", key, BASE), 429)
    # another tenant is not affected
    other = await gw.new_tenant("other")
    assert (await gw.chat("other", other, BASE)).status_code == 200


async def test_a_key_limit_applies_inside_the_tenant_limit(gw: Any, clock: Clock) -> None:
    key = await gw.new_tenant("acme")
    second_key = (await gw.admin("POST", "/admin/tenants/acme/keys")).json()["key"]
    await set_limits(gw, "acme", requests_per_minute=3)
    await set_limits(gw, "acme", await key_id_of(gw, "acme"), requests_per_minute=1)
    ok = await gw.chat("acme", key, BASE)
    # the tighter of the two is reported
    assert ok.headers["x-ratelimit-limit-requests"] == "1"
    gw.expect_error(await gw.chat("acme", key, BASE), 429, contains="API key")
    assert (await gw.chat("acme", second_key, BASE)).status_code == 200
    assert (await gw.chat("acme", second_key, BASE)).status_code == 200
    gw.expect_error(await gw.chat("acme", second_key, BASE), 429, contains="tenant 'acme'")


async def test_limit_changes_apply_at_once(gw: Any, clock: Clock) -> None:
    key = await gw.new_tenant("acme")
    assert (await gw.chat("acme", key, BASE)).status_code == 200  # owner cached, unlimited
    await set_limits(gw, "acme", requests_per_minute=1)
    assert (await gw.chat("acme", key, BASE)).status_code == 200
    gw.expect_error(await gw.chat("acme", key, BASE), 429)
    await set_limits(gw, "acme")  # all unlimited again
    resp = await gw.chat("acme", key, BASE)
    assert resp.status_code == 200 and not RATE_HEADERS & set(resp.headers)


async def test_models_and_other_tenant_answers_carry_the_headers(gw: Any, clock: Clock) -> None:
    key = await gw.new_tenant("acme")
    await set_limits(gw, "acme", requests_per_minute=10, tokens_per_minute=1000)
    resp = await gw.client.get("/v1/models", headers=gw.headers("acme", key))
    assert resp.status_code == 200 and set(resp.headers) >= RATE_HEADERS
    assert resp.headers["x-ratelimit-remaining-requests"] == "10"  # reading takes nothing
    assert resp.headers["x-ratelimit-reset-tokens"] == "0ms"
    for path in ("/v1/models/" + BASE, "/v1/files", "/v1/fine_tuning/jobs"):
        resp = await gw.client.get(path, headers=gw.headers("acme", key))
        assert resp.status_code == 200 and set(resp.headers) >= RATE_HEADERS, path
    # errors too, once the caller is known
    resp = await gw.client.get("/v1/files/file-nope", headers=gw.headers("acme", key))
    assert resp.status_code == 404 and set(resp.headers) >= RATE_HEADERS


# -- tokens per minute -------------------------------------------------------------------------

async def test_tokens_are_reserved_then_settled_to_usage(gw: Any, clock: Clock) -> None:
    key = await gw.new_tenant("acme")
    await set_limits(gw, "acme", tokens_per_minute=1000)
    resp = await gw.chat("acme", key, BASE, max_tokens=100)
    assert resp.status_code == 200
    usage = resp.json()["usage"]
    # at admission: the prompt (estimated here: the test model has no tokenizer) + max_tokens
    remaining_at_admission = int(resp.headers["x-ratelimit-remaining-tokens"])
    assert remaining_at_admission <= 1000 - 100 - 1
    await gw.settle()  # the reservation is settled in the background
    after = await gw.client.get("/v1/models", headers=gw.headers("acme", key))
    assert int(after.headers["x-ratelimit-remaining-tokens"]) == 1000 - usage["total_tokens"]


async def test_over_the_token_budget_waits_and_too_large_never_fits(gw: Any,
                                                                   clock: Clock) -> None:
    key = await gw.new_tenant("acme")
    await set_limits(gw, "acme", tokens_per_minute=120)
    assert (await gw.chat("acme", key, BASE, max_tokens=100)).status_code == 200
    await gw.settle()  # 7 tokens used: 113 left; a 12-token prompt + 105 does not fit yet
    refused = await gw.chat("acme", key, BASE, max_tokens=105)
    err = gw.expect_error(refused, 429, code="rate_limit_exceeded", contains="TPM")
    assert err["type"] == "tokens" and int(refused.headers["retry-after"]) >= 1
    too_large = await gw.chat("acme", key, BASE, max_tokens=500)
    gw.expect_error(too_large, 429, contains="Request too large")
    assert "retry-after" not in too_large.headers  # waiting would not help


async def test_a_stream_cut_short_is_charged_for_what_was_streamed(gw: Any,
                                                                   clock: Clock) -> None:
    key = await gw.new_tenant("acme")
    await set_limits(gw, "acme", tokens_per_minute=10_000)
    gw.transport.break_streams = (2, httpx.RemoteProtocolError("engine went away"))
    resp = await gw.chat("acme", key, BASE, stream=True, max_tokens=1000)
    assert resp.status_code == 200 and '"error"' in resp.text
    await gw.settle()
    after = await gw.client.get("/v1/models", headers=gw.headers("acme", key))
    used = 10_000 - int(after.headers["x-ratelimit-remaining-tokens"])
    # the prompt plus the two chunks that were streamed, not the 1000 reserved
    prompt = used - 2
    assert 0 < prompt < 50, used


# -- max_tokens cap and concurrency ------------------------------------------------------------

async def test_max_tokens_cap_refuses_more_and_fills_in_the_default(gw: Any) -> None:
    key = await gw.new_tenant("acme")
    await set_limits(gw, "acme", max_tokens=8)
    gw.expect_error(await gw.chat("acme", key, BASE, max_tokens=9), 400,
                    code="max_tokens_exceeded")
    err = gw.expect_error(await gw.chat("acme", key, BASE, max_completion_tokens=50), 400)
    assert err["param"] == "max_completion_tokens"
    assert (await gw.chat("acme", key, BASE, max_tokens=8)).status_code == 200
    assert (await gw.chat("acme", key, BASE)).status_code == 200
    assert gw.engine.bodies[-1]["max_tokens"] == 8  # the cap is the default


async def test_max_in_flight_counts_requests_being_answered(gw: Any, clock: Clock,
                                                            monkeypatch: Any) -> None:
    key = await gw.new_tenant("acme")
    await set_limits(gw, "acme", max_in_flight=2)
    gate = asyncio.Event()
    generate = gw.engine._generate

    async def slow_generate(request: Any, chat: bool) -> Any:
        await gate.wait()
        return await generate(request, chat)

    monkeypatch.setattr(gw.engine, "_generate", slow_generate)
    held = [asyncio.create_task(gw.chat("acme", key, BASE)) for _ in range(2)]
    while gw.services.gateway.admission.in_flight < 2:  # both are with the engine
        await asyncio.sleep(0.01)
    err = gw.expect_error(await gw.chat("acme", key, BASE), 429, code="rate_limit_exceeded",
                          contains="concurrent")
    assert err["type"] == "concurrency"
    gate.set()
    assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
    await gw.settle()  # slots are freed as the answers end
    assert (await gw.chat("acme", key, BASE)).status_code == 200


# -- the counters' home unreachable ------------------------------------------------------------

class DownCounters(LocalCounters):
    async def take(self, *args: Any) -> Any:
        raise CountersUnavailable("connection refused")

    async def acquire(self, *args: Any) -> Any:
        raise CountersUnavailable("connection refused")


def _counter(gw: Any, name: str) -> float:
    value = gw.services.metrics.registry.get_sample_value(name)
    return float(value or 0)


async def test_fail_open_serves_and_counts_the_miss(gw: Any) -> None:
    key = await gw.new_tenant("acme")
    await set_limits(gw, "acme", requests_per_minute=1, max_in_flight=1)
    counters: Counters = DownCounters()
    gw.services.gateway.limiter.counters = counters
    before = _counter(gw, "loraplex_ratelimit_backend_errors_total")
    for _ in range(3):
        resp = await gw.chat("acme", key, BASE)
        assert resp.status_code == 200 and not RATE_HEADERS & set(resp.headers)
    assert _counter(gw, "loraplex_ratelimit_backend_errors_total") == before + 3


async def test_fail_closed_answers_503(gw: Any) -> None:
    key = await gw.new_tenant("acme")
    await set_limits(gw, "acme", requests_per_minute=100)
    limiter = gw.services.gateway.limiter
    limiter.counters, limiter.fail_open = DownCounters(), False
    gw.expect_error(await gw.chat("acme", key, BASE), 503, code="rate_limiter_unavailable")
    # answers that take nothing from the limits are still given (without the headers)
    models = await gw.client.get("/v1/models", headers=gw.headers("acme", key))
    assert models.status_code == 200 and not RATE_HEADERS & set(models.headers)
    # a tenant without limits needs no counters
    free = await gw.new_tenant("free")
    assert (await gw.chat("free", free, BASE)).status_code == 200


def test_reset_durations_are_written_as_openai_does() -> None:
    assert format_reset(0.02) == "20ms"
    assert format_reset(1.5) == "1.5s"
    assert format_reset(360) == "6m0s"
    assert format_reset(61.25) == "1m1.25s"


# -- usage metering through the gateway --------------------------------------------------------

async def test_usage_is_metered_per_adapter_and_key_and_flushed(gw: Any, clock: Clock,
                                                                 make_adapter: Any) -> None:
    key = await gw.new_tenant("acme")
    await gw.register("acme", "support", make_adapter())
    await set_limits(gw, "acme", requests_per_minute=5)
    got: dict[str | None, list[int]] = {None: [0, 0, 0], "support": [0, 0, 0]}
    for model, adapter, extra in [(BASE, None, {}), ("support", "support", {}),
                                  ("support", "support", {"stream": True,
                                                          "stream_options": {"include_usage": True}})]:
        resp = await gw.chat("acme", key, model, **extra)
        assert resp.status_code == 200
        if extra:
            usage = [e for e in resp.text.split("\n\n") if '"usage"' in e][0]
            usage_obj = json.loads(usage[len("data: "):])["usage"]
        else:
            usage_obj = resp.json()["usage"]
        got[adapter][0] += 1
        got[adapter][1] += usage_obj["prompt_tokens"]
        got[adapter][2] += usage_obj["completion_tokens"]
    await gw.chat("acme", key, BASE)
    await gw.chat("acme", key, BASE)
    gw.expect_error(await gw.chat("acme", key, BASE), 429)  # metered as an error
    got[None][0] += 3
    got[None][1] += 2 * 5
    got[None][2] += 2 * 2
    await gw.services.usage.flush()  # what the periodic flush does
    day = datetime.now(timezone.utc).date()
    resp = await gw.admin("GET", "/admin/tenants/acme/usage",
                          params={"start": str(day), "end": str(day), "group_by": "adapter,key"})
    assert resp.status_code == 200, resp.text
    rows = {r["adapter"]: r for r in resp.json()["data"]}
    key_id = await key_id_of(gw, "acme")
    for adapter, (requests, prompt, completion) in got.items():
        row = rows[adapter]
        assert (row["requests"], row["prompt_tokens"], row["completion_tokens"],
                row["key_id"]) == (requests, prompt, completion, key_id), row
    assert rows[None]["errors"] == 1 and rows["support"]["errors"] == 0
    scrape = (await gw.client.get("/metrics")).text
    assert "loraplex_usage_pending_entries 0.0" in scrape


async def test_a_real_redis_outage_fails_open_then_limits_come_back(gw: Any) -> None:
    key = await gw.new_tenant("acme")
    await set_limits(gw, "acme", requests_per_minute=2)
    with RedisServer() as redis_server:
        limiter = gw.services.gateway.limiter
        limiter.counters = RedisCounters(redis_server.url(), timeout_s=0.25)
        try:
            assert (await gw.chat("acme", key, BASE)).headers[
                "x-ratelimit-remaining-requests"] == "1"
            redis_server.stop()
            for _ in range(3):  # fail-open: served, without headers, counted
                resp = await gw.chat("acme", key, BASE)
                assert resp.status_code == 200 and not RATE_HEADERS & set(resp.headers)
            assert _counter(gw, "loraplex_ratelimit_backend_errors_total") >= 3
            redis_server.start()  # back, empty: the limits hold again
            assert (await gw.chat("acme", key, BASE)).status_code == 200
            assert (await gw.chat("acme", key, BASE)).status_code == 200
            gw.expect_error(await gw.chat("acme", key, BASE), 429)
        finally:
            await limiter.counters.close()


async def test_a_request_under_the_cap_reserves_what_it_asked_for(gw: Any, clock: Clock) -> None:
    key = await gw.new_tenant("acme")
    await set_limits(gw, "acme", tokens_per_minute=10_000, max_tokens=500)
    resp = await gw.chat("acme", key, BASE, max_tokens=10)
    assert resp.status_code == 200
    prompt = PromptTokens.estimate(ChatCompletionRequest(
        model=BASE, messages=[{"role": "user", "content": "Capital of France?"}]))
    # its own 10 tokens, not the cap's 500
    assert int(resp.headers["x-ratelimit-remaining-tokens"]) == 10_000 - prompt - 10


class SettleFails(LocalCounters):
    async def adjust(self, *args: Any) -> Any:
        raise CountersUnavailable("connection refused")


async def test_settling_while_redis_is_down_fails_no_background_task(gw: Any) -> None:
    key = await gw.new_tenant("acme")
    await set_limits(gw, "acme", tokens_per_minute=10_000)
    limiter = gw.services.gateway.limiter
    limiter.counters, limiter.fail_open = SettleFails(), False
    settles: list[asyncio.Future[None]] = []
    limiter._spawn = lambda coro: settles.append(asyncio.ensure_future(coro))
    before = _counter(gw, "loraplex_ratelimit_backend_errors_total")
    assert (await gw.chat("acme", key, BASE)).status_code == 200
    results = await asyncio.gather(*settles, return_exceptions=True)
    assert settles and not [r for r in results if isinstance(r, BaseException)]
    assert _counter(gw, "loraplex_ratelimit_backend_errors_total") == before + 1
