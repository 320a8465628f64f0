"""Tenants as customers across a fleet, for real: two gateways sharing one real vLLM engine,
one registry and one real Redis server (started by the tests).

- A request limit used up through one gateway is refused by the other, and the `openai` SDK's
  own retry (it honours `retry-after-ms`) gets through once the bucket refills.
- A concurrency limit is global: a stream held open on one gateway fills the tenant's only
  slot on the other.
- Usage read from the admin API equals the sum of `usage` in the answers the client got,
  streamed or not, through either gateway.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import (
    ADMIN_TOKEN,
    BASE,
    Server,
    start_up,
    stop_up,
    wait_healthy,
)

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def gateways(base_model: Path, redis_url: str,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    """Gateway A runs the engine; gateway B serves from A's engine. Both on one data folder
    (one SQLite registry) and one Redis."""
    home = tmp_path_factory.mktemp("quota-home")
    common = {"LORAPLEX_REDIS_URL": redis_url, "LORAPLEX_USAGE_FLUSH_S": "0.5",
              "LORAPLEX_WORKERS": "0", "LORAPLEX_REGISTRY_POLL_S": "0.5"}
    a = start_up(base_model, home, log_name="gateway-a.log", **common)
    try:
        wait_healthy(a)
        b = start_up(base_model, home, log_name="gateway-b.log",
                     LORAPLEX_ENGINE_URL=a.engine_url(), **common)
        try:
            wait_healthy(b, 120)
            yield a, b
        finally:
            stop_up(b)
    finally:
        stop_up(a)


def new_tenant(server: Server, tenant: str, **limits: Any) -> str:
    with server.admin() as c:
        assert c.post("/admin/tenants", json={"id": tenant}).status_code == 201
        key = str(c.post(f"/admin/tenants/{tenant}/keys").json()["key"])
        if limits:
            assert c.put(f"/admin/tenants/{tenant}/limits", json=limits).status_code == 200
    return key


def sdk(server: Server, tenant: str, key: str, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=retries,
                         timeout=300, default_headers={"X-Tenant-ID": tenant})


def test_a_request_limit_is_shared_by_the_gateways(gateways: tuple[Server, Server]) -> None:
    a, b = gateways
    key = new_tenant(a, "rpm-shared", requests_per_minute=6)  # one back every 10 s
    time.sleep(1.5)  # B sees the new tenant's limits at its next registry poll at the latest
    remaining = []
    for server in (a, b, a, b, a, b):
        raw = sdk(server, "rpm-shared", key).chat.completions.with_raw_response.create(
            model=BASE, messages=QUESTION, max_tokens=2)  # type: ignore[arg-type]
        assert raw.headers["x-ratelimit-limit-requests"] == "6"
        remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
    # one bucket for both gateways: it went down with every request, whichever took it
    # (a refill of at most one request while six short answers ran)
    assert remaining[0] == 5 and remaining[-1] <= 1 and remaining == sorted(remaining, reverse=True)
    drained_on = b if remaining[-1] == 0 else a
    with pytest.raises(openai.RateLimitError) as refused:
        for _ in range(2):  # the second, if one request refilled meanwhile
            sdk(drained_on, "rpm-shared", key).chat.completions.create(
                model=BASE, messages=QUESTION, max_tokens=2)  # type: ignore[arg-type]
    error = refused.value.body
    assert isinstance(error, dict) and error["code"] == "rate_limit_exceeded", error
    assert error["type"] == "requests"
    headers = refused.value.response.headers
    assert 0 < int(headers["retry-after-ms"]) <= 10_000 and headers["retry-after"]
    # The SDK's own retry waits retry-after-ms and then gets through, on either gateway.
    started = time.monotonic()
    answer = sdk(a, "rpm-shared", key, retries=2).chat.completions.create(
        model=BASE, messages=QUESTION, max_tokens=2)  # type: ignore[arg-type]
    assert answer.choices and time.monotonic() - started > 0.5


def test_a_concurrency_limit_is_global(gateways: tuple[Server, Server]) -> None:
    a, b = gateways
    key = new_tenant(a, "one-at-a-time", max_in_flight=1)
    time.sleep(1.5)
    headers = {"X-Tenant-ID": "one-at-a-time", "Authorization": f"Bearer {key}"}
    # long enough to be still running when B is asked (the CPU engine makes ~100 tokens/s)
    body = {"model": BASE, "messages": QUESTION, "max_tokens": 1500, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{a.url}/v1/chat/completions", json=body, headers=headers,
                      timeout=300) as held:
        assert held.status_code == 200
        lines = held.iter_lines()  # kept: a dropped iterator would close the stream
        assert next(lines)  # the stream is running on A
        refused = httpx.post(f"{b.url}/v1/chat/completions", headers=headers, timeout=300,
                             json={**body, "stream": False, "max_tokens": 2})
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["type"] == "concurrency"
        assert next(lines) is not None  # A's stream is still going
    # the client went away: A stops the stream and frees the slot
    deadline = time.monotonic() + 10
    while True:  # the slot is released in the background as the answer ends
        ok = httpx.post(f"{b.url}/v1/chat/completions", headers=headers, timeout=300,
                        json={**body, "stream": False, "max_tokens": 2})
        if ok.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert ok.status_code == 200, ok.text


def test_metered_usage_equals_the_usage_the_client_was_given(
        gateways: tuple[Server, Server]) -> None:
    a, b = gateways
    key = new_tenant(a, "metered")
    time.sleep(1.5)
    prompt = completion = requests = 0
    for server in (a, b):
        client = sdk(server, "metered", key)
        answer = client.chat.completions.create(model=BASE, messages=QUESTION,  # type: ignore[arg-type]
                                                max_tokens=5)
        assert answer.usage is not None
        prompt += answer.usage.prompt_tokens
        completion += answer.usage.completion_tokens
        text = client.completions.create(model=BASE, prompt="The sky is", max_tokens=3)
        assert text.usage is not None
        prompt += text.usage.prompt_tokens
        completion += text.usage.completion_tokens
        stream = client.chat.completions.create(
            model=BASE, messages=QUESTION, max_tokens=4, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True})
        usage = [chunk.usage for chunk in stream if chunk.usage is not None]
        assert len(usage) == 1
        prompt += usage[0].prompt_tokens
        completion += usage[0].completion_tokens
        requests += 3
    today = datetime.now(timezone.utc).date().isoformat()
    expected = {"requests": requests, "prompt_tokens": prompt, "completion_tokens": completion}
    deadline = time.monotonic() + 15
    while True:  # each gateway adds its counts at its next flush (0.5 s)
        resp = httpx.get(f"{b.url}/admin/tenants/metered/usage",
                         params={"start": today, "end": today, "group_by": "adapter,day"},
                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert resp.status_code == 200, resp.text
        rows = resp.json()["data"]
        got = {k: rows[0][k] for k in expected} if len(rows) == 1 else rows
        if got == expected or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert got == expected
    assert rows[0]["adapter"] is None and rows[0]["day"] == today and rows[0]["errors"] == 0
    csv_text = httpx.get(f"{a.url}/admin/tenants/metered/usage",
                         params={"start": today, "end": today, "group_by": "adapter,day",
                                 "format": "csv"},
                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).text
    assert f"{prompt}" in csv_text and f"{completion}" in csv_text
