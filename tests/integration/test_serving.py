"""The serving core end to end: real vLLM (CPU), the real default model, the official SDK."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import AsyncOpenAI

from server.cli import EXAMPLE_TENANT, example_chat_request
from tests.integration.conftest import (
    ADMIN_TOKEN,
    BASE,
    RESIDENT_SLOTS,
    Server,
    TenantHandle,
    make_tenant,
    scrape_metric,
    upload_adapter,
)

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def greedy(tenant: TenantHandle, model: str, messages=QUESTION, max_tokens: int = 24) -> str:
    r = tenant.client.chat.completions.create(model=model, messages=messages, temperature=0,
                                              max_tokens=max_tokens)
    assert r.model == model
    return r.choices[0].message.content or ""


@pytest.fixture(scope="module")
def acme(server: Server, adapter_dirs: list[Path]) -> TenantHandle:
    t = make_tenant(server, "acme")
    upload_adapter(server, "acme", "support-bot", adapter_dirs[0])
    return t


@pytest.fixture(scope="module")
def globex(server: Server, adapter_dirs: list[Path]) -> TenantHandle:
    t = make_tenant(server, "globex")
    upload_adapter(server, "globex", "legal-bot", adapter_dirs[1])
    return t


def test_base_model_answers_a_factual_question(acme: TenantHandle) -> None:
    r = acme.client.chat.completions.create(model=BASE, messages=QUESTION, temperature=0,
                                            max_tokens=24)
    assert "Paris" in r.choices[0].message.content
    assert r.model == BASE
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0


def test_the_example_loraplex_up_prints_answers_on_topic(server: Server,
                                                         acme: TenantHandle) -> None:
    """The first request a newcomer sends is the printed example, with no sampling parameters,
    so the model's generation_config.json defaults (temperature 0.2, top_p 0.9, as its model
    card recommends) apply.

    The answer is sampled (the example sets no seed), so the exact request is sent 10 times.
    Measured on 80 tries with these defaults, 85% answer "The capital of France is Paris."
    and the rest answer "L'Étoile ..." (off topic); at vLLM's own default temperature 1.0,
    only ~30% give a short answer naming Paris (65% mention Paris somewhere, mostly inside
    rambles of thousands of characters: a bare "mentions Paris" would not tell the two
    apart). Requiring 5 short answers naming Paris out of 10 fails a sound default about once
    in 700 runs and catches temperature 1.0 about 85% of the time; the engine's own report
    of the defaults it applies is checked too, deterministically.
    """
    engine_log = (server.home / "logs" / "engine.log").read_text(errors="replace")
    applied = [line for line in engine_log.splitlines()
               if "sampling parameters have been overridden" in line]
    assert applied and "'temperature': 0.2" in applied[-1] and "'top_p': 0.9" in applied[-1], \
        applied
    body = example_chat_request(BASE)
    assert acme.id == EXAMPLE_TENANT
    headers = {"X-Tenant-ID": acme.id, "Authorization": f"Bearer {acme.key}",
               "Content-Type": "application/json"}

    async def ask_all() -> list[str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=600) as client:
            answers = await asyncio.gather(*[
                client.post("/v1/chat/completions", content=json.dumps(body), headers=headers)
                for _ in range(10)])
        for r in answers:
            assert r.status_code == 200, r.text
        return [r.json()["choices"][0]["message"]["content"] for r in answers]

    answers = asyncio.run(ask_all())
    on_topic = [a for a in answers if "Paris" in a and len(a) < 200]
    assert len(on_topic) >= 5, answers


def test_each_tenant_adapter_changes_greedy_output(acme: TenantHandle,
                                                    globex: TenantHandle) -> None:
    base = greedy(acme, BASE)
    acme_out = greedy(acme, "support-bot")
    globex_out = greedy(globex, "legal-bot")
    assert acme_out != base
    assert globex_out != base
    assert acme_out != globex_out
    # The same adapter by version and by alias gives the same greedy text.
    assert greedy(acme, "support-bot@1") == acme_out


def test_alias_selects_its_version(server: Server, acme: TenantHandle,
                                   adapter_dirs: list[Path]) -> None:
    v2 = upload_adapter(server, "acme", "support-bot", adapter_dirs[2])
    assert v2["version"] == 2
    with server.admin() as c:
        r = c.put("/admin/tenants/acme/adapters/support-bot/aliases/prod", json={"version": 1})
        assert r.status_code == 200, r.text
    assert greedy(acme, "support-bot@prod") == greedy(acme, "support-bot@1")
    assert greedy(acme, "support-bot") == greedy(acme, "support-bot@2")
    assert greedy(acme, "support-bot@2") != greedy(acme, "support-bot@1")


def test_tenant_cannot_see_or_use_another_tenants_adapter(acme: TenantHandle,
                                                          globex: TenantHandle) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        globex.client.chat.completions.create(model="support-bot", messages=QUESTION,
                                              max_tokens=4)
    assert err.value.status_code == 404
    assert err.value.body["type"] == "not_found_error"
    ids = {m.id for m in globex.client.models.list()}
    assert "support-bot" not in ids and "legal-bot" in ids and BASE in ids
    # A key of acme with globex's header is refused outright.
    forged = openai.OpenAI(base_url=str(globex.client.base_url), api_key=acme.key,
                           default_headers={"X-Tenant-ID": "globex"}, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        forged.models.list()


def test_streaming_ends_with_done_and_usage(server: Server, acme: TenantHandle) -> None:
    stream = acme.client.chat.completions.create(
        model="support-bot", messages=QUESTION, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert len(chunks) > 3
    assert all(c.model == "support-bot" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy(acme, "support-bot", max_tokens=12)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    # On the wire: SSE events, the last one `[DONE]`, no engine name anywhere.
    body = {"model": "support-bot", "messages": QUESTION, "max_tokens": 5, "stream": True}
    headers = {"X-Tenant-ID": "acme", "Authorization": f"Bearer {acme.key}"}
    raw = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers,
                     timeout=120).text
    events = [e for e in raw.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert "acme/support-bot@" not in raw


def test_completions_endpoint_with_adapter(acme: TenantHandle) -> None:
    r = acme.client.completions.create(model="support-bot@1", prompt="The capital of France is",
                                       max_tokens=8, temperature=0)
    assert r.model == "support-bot@1"
    assert r.choices[0].text
    s = list(acme.client.completions.create(model=BASE, prompt="Once upon a time",
                                            max_tokens=6, stream=True))
    assert "".join(c.choices[0].text for c in s if c.choices)


def test_more_adapters_than_slots_all_succeed_and_evict(server: Server,
                                                         adapter_dirs: list[Path]) -> None:
    t = make_tenant(server, "churn")
    names = [f"a{i}" for i in range(RESIDENT_SLOTS + 2)]
    for name, folder in zip(names, adapter_dirs[2:], strict=False):
        upload_adapter(server, "churn", name, folder)
    with server.admin() as c:
        before = c.get("/admin/engine").json()["adapters"]["stats"]

    async def run() -> list[str]:
        client = AsyncOpenAI(base_url=str(t.client.base_url), api_key=t.key, max_retries=0,
                             default_headers={"X-Tenant-ID": "churn"}, timeout=300)
        calls = [client.chat.completions.create(model=n, messages=QUESTION, max_tokens=6,
                                                temperature=0) for n in names * 2]
        results = await asyncio.gather(*calls)
        await client.close()
        return [r.model for r in results]

    assert asyncio.run(run()) == names * 2
    with server.admin() as c:
        status = c.get("/admin/engine").json()["adapters"]
    assert status["stats"]["evictions"] > before["evictions"]
    assert len(status["resident"]) <= RESIDENT_SLOTS
    loaded = _engine_adapters(server)
    assert len(loaded) <= RESIDENT_SLOTS


def test_deleting_an_adapter_unloads_it(server: Server, adapter_dirs: list[Path]) -> None:
    t = make_tenant(server, "shortlived")
    v = upload_adapter(server, "shortlived", "tmp", adapter_dirs[5])
    greedy(t, "tmp", max_tokens=2)
    assert v["engine_name"] in _engine_adapters(server)
    with server.admin() as c:
        assert c.delete("/admin/tenants/shortlived/adapters/tmp").status_code == 200
    deadline = time.monotonic() + 30
    while v["engine_name"] in _engine_adapters(server) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert v["engine_name"] not in _engine_adapters(server)
    with pytest.raises(openai.NotFoundError):
        greedy(t, "tmp", max_tokens=2)


def test_cache_salt_keeps_prefix_cache_per_tenant(server: Server, acme: TenantHandle,
                                                  globex: TenantHandle) -> None:
    engine = server.engine_url()
    prompt = [{"role": "user", "content": "Summarize this. " + "The quick brown fox. " * 60}]

    def hits_after(tenant: TenantHandle) -> float:
        before = scrape_metric(engine, "vllm:prefix_cache_hits_total")
        greedy(tenant, BASE, messages=prompt, max_tokens=1)
        return scrape_metric(engine, "vllm:prefix_cache_hits_total") - before

    hits_after(acme)  # fills the cache with acme's blocks
    assert hits_after(acme) > 0, "the same tenant should reuse its own prefix"
    assert hits_after(globex) == 0, "another tenant must not hit acme's prefix blocks"


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_the_engine_request(server: Server, acme: TenantHandle,
                                                      stream: bool) -> None:
    engine = server.engine_url()
    tokens_before = scrape_metric(engine, "vllm:generation_tokens_total")
    # 1500 forced tokens take the CPU engine a minute; an abort ends the request in seconds.
    body = {"model": BASE, "messages": QUESTION, "max_tokens": 1500, "stream": stream,
            "ignore_eos": True}
    headers = {"X-Tenant-ID": "acme", "Authorization": f"Bearer {acme.key}"}
    if stream:
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body,
                          headers=headers, timeout=60) as r:
            assert r.status_code == 200
            for i, _ in enumerate(r.iter_lines()):
                if i > 3:
                    break
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers,
                       timeout=3)
    deadline = time.monotonic() + 15
    while scrape_metric(engine, "vllm:num_requests_running") > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert scrape_metric(engine, "vllm:num_requests_running") == 0
    assert scrape_metric(engine, "vllm:generation_tokens_total") - tokens_before < 1500


def test_engine_internal_routes_are_not_exposed(server: Server, acme: TenantHandle) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/tokenize", "/metrics"):
        r = httpx.post(f"{server.url}{path}", json={"lora_name": "x", "lora_path": "/tmp"},
                       headers=headers)
        assert r.status_code in (404, 405), (path, r.status_code)
        assert "error" in r.json()


def test_engine_errors_are_relayed_as_client_errors(acme: TenantHandle) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        acme.client.chat.completions.create(model=BASE, messages=QUESTION, max_tokens=100_000)
    assert err.value.status_code == 400
    assert err.value.body["message"]


def test_register_from_allowlisted_local_path(server: Server, adapter_dirs: list[Path]) -> None:
    make_tenant(server, "localreg")
    with server.admin() as c:
        r = c.post("/admin/tenants/localreg/adapters/fromdisk/versions",
                   json={"path": str(adapter_dirs[3])})
        assert r.status_code == 201, r.text
        r = c.post("/admin/tenants/localreg/adapters/fromdisk/versions",
                   json={"path": "/etc"})
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "source_not_allowed"


def _engine_adapters(server: Server) -> list[str]:
    data = httpx.get(f"{server.engine_url()}/v1/models").json()["data"]
    return [m["id"] for m in data if m.get("parent")]


def test_pinned_adapter_is_preloaded_and_never_evicted(server: Server,
                                                        adapter_dirs: list[Path]) -> None:
    t = make_tenant(server, "pinner")
    v = upload_adapter(server, "pinner", "vip", adapter_dirs[1])
    with server.admin() as c:
        r = c.put("/admin/tenants/pinner/adapters/vip/versions/1/pin")
        assert r.status_code == 200 and r.json()["pinned"] is True, r.text
    assert v["engine_name"] in _engine_adapters(server), "pinning loads it at once"
    # Churn through more adapters than the one slot left unpinned.
    for i, folder in enumerate(adapter_dirs[2:5]):
        upload_adapter(server, "pinner", f"other{i}", folder)
        greedy(t, f"other{i}", max_tokens=2)
        assert v["engine_name"] in _engine_adapters(server)
    with server.admin() as c:
        # With two slots, a second pin would leave no slot for anything else.
        upload_adapter(server, "pinner", "vip2", adapter_dirs[5])
        r = c.put("/admin/tenants/pinner/adapters/vip2/versions/1/pin")
        assert r.status_code == 409 and r.json()["error"]["code"] == "too_many_pinned"
        assert c.get("/admin/tenants/pinner/adapters/vip2").json()["versions"][0]["pinned"] is False
        assert c.delete("/admin/tenants/pinner/adapters/vip/versions/1/pin").status_code == 200
    for i in range(3):
        greedy(t, f"other{i}", max_tokens=2)
    assert v["engine_name"] not in _engine_adapters(server), "unpinned: LRU may evict it"
