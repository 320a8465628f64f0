"""The engine dies (an OOM kill, a crash): only what needs it degrades, and it comes back.

A server of its own, so that killing its vLLM cannot disturb the other integration tests.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.integration.conftest import (
    BASE,
    Server,
    make_tenant,
    running_server,
    scrape_metric,
    upload_adapter,
)

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def own_server(base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(base_model, tmp_path_factory.mktemp("failhome")) as srv:
        yield srv


def _engine_processes(server: Server) -> list[psutil.Process]:
    return [p for p in psutil.Process(server.proc.pid).children(recursive=True)
            if "vllm" in " ".join(p.cmdline())]


def _chat(server: Server, tenant: str, key: str, model: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", timeout=300,
                      headers={"X-Tenant-ID": tenant, "Authorization": f"Bearer {key}"},
                      json={"model": model, "messages": QUESTION, "temperature": 0,
                            "max_tokens": 8})


def _wait_for(predicate, what: str, limit_s: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_engine_killed_degrades_only_generation_and_recovers(own_server: Server,
                                                             adapter_dirs: list[Path]) -> None:
    server = own_server
    tenant = make_tenant(server, "acme")
    pinned = upload_adapter(server, "acme", "pinned-bot", adapter_dirs[0])
    upload_adapter(server, "acme", "plain-bot", adapter_dirs[1])
    with server.admin() as admin:
        assert admin.put("/admin/tenants/acme/adapters/pinned-bot/versions/1/pin").status_code == 200
    before = {}
    for model in ("pinned-bot", "plain-bot", BASE):
        r = _chat(server, "acme", tenant.key, model)
        assert r.status_code == 200, r.text
        before[model] = r.json()["choices"][0]["message"]["content"]

    engines = _engine_processes(server)
    assert engines, "no vLLM process found under loraplex up"
    # Two long streams are under way when the engine dies, one read by the official SDK and
    # one raw; both get the error in-band (as vLLM sends its own mid-stream errors).
    sdk_stream = tenant.client.chat.completions.create(
        model=BASE, messages=QUESTION, stream=True, max_tokens=1500,
        extra_body={"ignore_eos": True})
    sdk_chunks = iter(sdk_stream)
    assert next(sdk_chunks).model == BASE
    with httpx.Client(timeout=300) as raw_client, raw_client.stream(
            "POST", f"{server.url}/v1/chat/completions",
            headers={"X-Tenant-ID": "acme", "Authorization": f"Bearer {tenant.key}"},
            json={"model": "plain-bot", "messages": QUESTION, "stream": True,
                  "max_tokens": 1500, "ignore_eos": True}) as raw:
        assert raw.status_code == 200
        raw_lines = raw.iter_lines()
        assert next(line for line in raw_lines if line).startswith("data: {")

        os.killpg(os.getpgid(engines[0].pid), signal.SIGKILL)  # what the OOM killer does

        # The rest of the raw stream ends cleanly (no incomplete chunked read) with
        # OpenAI's error object, then [DONE].
        rest = [line[len("data: "):] for line in raw_lines if line]
    # What came after the kill, in the message: a failure here must say which way it went.
    assert rest[-1] == "[DONE]", (len(rest), rest[-3:])
    assert "error" in json.loads(rest[-2]), (len(rest), rest[-3:], server.log.read_text()[-3000:])
    error = json.loads(rest[-2])["error"]
    assert error["code"] == "engine_unavailable", error
    assert error["type"] == "service_unavailable_error" and error["param"] is None
    assert all("error" not in json.loads(e) for e in rest[:-2])
    with pytest.raises(openai.APIError) as raised:
        for _chunk in sdk_chunks:
            pass
    assert not isinstance(raised.value, openai.APIConnectionError), raised.value
    assert raised.value.code == "engine_unavailable" and "engine" in raised.value.message

    # The gateway notices at once (it supervises the process), not at its next health poll.
    def engine_status() -> dict:
        with server.admin() as admin:
            return admin.get("/admin/engine").json()

    _wait_for(lambda: engine_status()["restarts"] == 1, "the engine exit to be noticed", 30)
    assert httpx.get(f"{server.url}/healthz").status_code == 503
    # Generation fails fast and clearly, in OpenAI's error shape, and says when to retry.
    for model in ("plain-bot", "pinned-bot", BASE):
        r = _chat(server, "acme", tenant.key, model)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "engine_unavailable" and r.headers["retry-after"]
    # What does not need the engine keeps working: the registry, the admin API, listings.
    with server.admin() as admin:
        assert admin.post("/admin/tenants", json={"id": "during-outage"}).status_code == 201
        upload_adapter(server, "acme", "late-bot", adapter_dirs[2])
    models = httpx.get(f"{server.url}/v1/models", headers={
        "X-Tenant-ID": "acme", "Authorization": f"Bearer {tenant.key}"})
    assert models.status_code == 200
    assert {"pinned-bot", "plain-bot", "late-bot"} <= {m["id"] for m in models.json()["data"]}

    # The gateway restarts the engine; adapters come back without anyone re-registering them.
    _wait_for(lambda: httpx.get(f"{server.url}/healthz").status_code == 200,
              "the engine to be restarted", 600)
    status = engine_status()
    assert status["ready"] is True and status["restarts"] == 1
    resident = {a["engine_name"]: a for a in status["adapters"]["resident"]}
    assert resident[pinned["engine_name"]]["pinned"], "the pinned adapter is preloaded again"
    assert scrape_metric(server.url, "loraplex_engine_restarts_total") == 1
    for model in ("pinned-bot", "plain-bot", BASE):
        r = _chat(server, "acme", tenant.key, model)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == before[model], model
    assert _chat(server, "acme", tenant.key, "late-bot").status_code == 200
