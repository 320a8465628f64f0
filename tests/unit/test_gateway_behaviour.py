"""What the gateway does with good requests, checked against the fake engine's records."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from adapters.registry import Registry, hash_key
from tests.unit.conftest import wait_until

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def sse_events(text: str) -> list[str]:
    """The `data:` payloads of a server-sent event stream, in order."""
    events = []
    for block in text.split("\n\n"):
        lines = [line for line in block.split("\n") if line]
        if not lines:
            continue
        assert all(line.startswith("data: ") for line in lines), block
        events.append("\n".join(line[len("data: "):] for line in lines))
    return events


async def _stream(gw, tenant, key, path, body):
    async with gw.client.stream("POST", path, json=body,
                                headers=gw.headers(tenant, key)) as resp:
        text = (await resp.aread()).decode()
    return resp, text


# -- the model name in and out -------------------------------------------------------------------

async def test_answer_names_the_tenants_model_engine_gets_immutable_name(gw, make_adapter):
    key = await gw.new_tenant("acme")
    version = await gw.register("acme", "support", make_adapter())
    engine_name = version["engine_name"]
    assert "acme" in engine_name and "support" in engine_name and "@1" in engine_name

    resp = await gw.chat("acme", key, "support")
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert answer["model"] == "support"
    assert answer["choices"][0]["message"]["content"] == "Paris."
    assert engine_name not in resp.text
    assert gw.engine.requests[-1]["path"] == "/v1/chat/completions"
    assert gw.engine.bodies[-1]["model"] == engine_name
    # The engine was given the stored folder of this very version.
    load = gw.engine.load_calls[-1]
    assert load["lora_name"] == engine_name
    assert load["lora_path"].startswith(str(gw.settings.store_dir))

    resp = await gw.client.post("/v1/completions", json={"model": "support@1", "prompt": "Hi"},
                                headers=gw.headers("acme", key))
    assert resp.status_code == 200, resp.text
    assert resp.json()["model"] == "support@1"
    assert gw.engine.requests[-1]["path"] == "/v1/completions"
    assert gw.engine.bodies[-1]["model"] == engine_name
    assert len(gw.engine.load_calls) == 1  # resident: not loaded twice


async def test_base_model_passes_through(gw):
    key = await gw.new_tenant("acme")
    resp = await gw.chat("acme", key, BASE)
    assert resp.status_code == 200 and resp.json()["model"] == BASE
    assert gw.engine.bodies[-1]["model"] == BASE
    assert gw.engine.load_calls == []


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_stream_names_the_tenants_model(gw, make_adapter, path):
    key = await gw.new_tenant("acme")
    version = await gw.register("acme", "support", make_adapter())
    body = {"model": "support", "stream": True, "stream_options": {"include_usage": True}}
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": "Capital of France?"}]
    else:
        body["prompt"] = "The capital of France is"
    resp, text = await _stream(gw, "acme", key, path, body)
    assert resp.status_code == 200, text
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert version["engine_name"] not in text
    events = sse_events(text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) == 4
    assert all(c["model"] == "support" for c in chunks)
    assert chunks[-1]["usage"]["total_tokens"] == 8
    sent = gw.engine.bodies[-1]
    assert sent["model"] == version["engine_name"] and sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}


async def test_stream_without_usage_and_on_base_model(gw):
    key = await gw.new_tenant("acme")
    body = {"model": BASE, "stream": True,
            "messages": [{"role": "user", "content": "Capital of France?"}]}
    resp, text = await _stream(gw, "acme", key, "/v1/chat/completions", body)
    assert resp.status_code == 200
    events = sse_events(text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == ["Par", "is", "."]
    assert all(c["model"] == BASE for c in chunks)
    assert all("usage" not in c for c in chunks)  # not asked for: not sent


async def test_stream_for_unknown_model_is_a_plain_404(gw):
    key = await gw.new_tenant("acme")
    body = {"model": "nope", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    resp, _text = await _stream(gw, "acme", key, "/v1/chat/completions", body)
    assert resp.status_code == 404
    gw.expect_error(resp, 404, code="model_not_found")


@pytest.mark.parametrize("break_with", [
    httpx.ReadError("connection reset by peer"),  # what a killed engine's socket gives
    httpx.ReadTimeout("timed out"),
    None,  # the connection just ends, without vLLM's closing [DONE]
], ids=["reset", "timeout", "early-end"])
async def test_stream_the_engine_breaks_ends_with_an_error_event(gw, make_adapter, caplog,
                                                                 break_with):
    key = await gw.new_tenant("acme")
    version = await gw.register("acme", "support", make_adapter())
    caplog.set_level("INFO", logger="loraplex.access")
    gw.transport.break_streams = (2, break_with)
    body = {"model": "support", "stream": True,
            "messages": [{"role": "user", "content": "Capital of France?"}]}
    async with gw.client.stream("POST", "/v1/chat/completions", json=body,
                                headers={**gw.headers("acme", key), "X-Request-ID": "cut-1"}
                                ) as resp:
        raw = await resp.aread()  # the response ends cleanly: no incomplete chunked read
    assert resp.status_code == 200
    text = raw.decode()
    assert text.endswith("\n\n") and version["engine_name"] not in text
    events = sse_events(text)
    # What arrived is passed on (an incomplete event after it is not), then the error in
    # vLLM's in-band shape.
    assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:2]] == ["Par", "is"]
    assert len(events) == 4 and events[3] == "[DONE]"
    error = json.loads(events[2])
    assert set(error) == {"error"}
    assert error["error"]["type"] == "service_unavailable_error"
    assert error["error"]["code"] == "engine_unavailable" and error["error"]["param"] is None
    assert "engine" in error["error"]["message"] and "retry" in error["error"]["message"]
    lines = [json.loads(r.getMessage()) for r in caplog.records
             if r.name == "loraplex.access" and '"cut-1"' in r.getMessage()]
    assert len(lines) == 1 and lines[0]["error"] == "engine_unavailable", lines
    # Nothing stays held: the next requests are served.
    gw.transport.break_streams = None
    resp, text = await _stream(gw, "acme", key, "/v1/chat/completions", body)
    assert resp.status_code == 200 and sse_events(text)[-1] == "[DONE]"
    assert "error" not in text
    assert (await gw.chat("acme", key, "support")).status_code == 200


# -- what is forwarded ---------------------------------------------------------------------------

async def test_cache_salt_is_per_tenant_and_client_salt_is_replaced(gw, make_adapter):
    key_a = await gw.new_tenant("tenant-a")
    key_b = await gw.new_tenant("tenant-b")
    await gw.register("tenant-a", "support", make_adapter())
    await gw.chat("tenant-a", key_a, BASE)
    await gw.chat("tenant-a", key_a, "support", cache_salt="chosen-by-client")
    await gw.chat("tenant-b", key_b, BASE)
    await gw.chat("tenant-b", key_b, BASE, cache_salt="chosen-by-client")
    await gw.client.post("/v1/completions", json={"model": BASE, "prompt": "x",
                                                  "cache_salt": "x"},
                         headers=gw.headers("tenant-a", key_a))
    salts = [b["cache_salt"] for b in gw.engine.bodies]
    assert len(gw.engine.bodies) == 5
    a1, a2, b1, b2, a3 = salts
    assert a1 == a2 == a3
    assert b1 == b2
    assert a1 != b1
    assert "chosen-by-client" not in salts and "x" not in salts
    assert all(isinstance(s, str) and len(s) >= 32 for s in salts)
    assert "tenant-a" not in a1 and "tenant-b" not in b1


async def test_engine_only_fields_are_stripped_others_pass(gw):
    key = await gw.new_tenant("acme")
    engine_only = {
        "kv_transfer_params": {"do_remote_prefill": True}, "vllm_xargs": {"x": 1},
        "priority": -100, "request_id": "steal-me", "lora_request": {"lora_name": "other"},
        "chat_template": "{{ evil }}", "session_id": "s", "mm_processor_kwargs": {},
    }
    passed = {"seed": 7, "top_k": 3, "logprobs": True, "max_tokens": 5, "temperature": 0.5,
              "user": "u1"}
    resp = await gw.chat("acme", key, BASE, **engine_only, **passed)
    assert resp.status_code == 200, resp.text
    sent = gw.engine.bodies[-1]
    for name in engine_only:
        assert name not in sent, name
    for name, value in passed.items():
        assert sent[name] == value, name
    assert sent["messages"] == [{"role": "user", "content": "Capital of France?"}]
    assert set(sent) == {"model", "messages", "cache_salt", *passed}


async def test_prompt_logprobs_never_reach_the_engine(gw):
    # vLLM with LoRA enabled computes them with the wrong LoRA mapping, and 0.32's EngineCore
    # dies on one (found by this project's evaluation work): every tenant would lose the engine.
    key = await gw.new_tenant("acme")
    headers = gw.headers("acme", key)
    chat = {"model": BASE, "messages": [{"role": "user", "content": "x"}]}
    refused = [
        ("/v1/completions", {"model": BASE, "prompt": [1, 2, 3], "prompt_logprobs": 0},
         "prompt_logprobs"),
        ("/v1/completions", {"model": BASE, "prompt": "x", "echo": True, "logprobs": 1}, None),
        ("/v1/chat/completions", {**chat, "prompt_logprobs": 5}, "prompt_logprobs"),
        ("/v1/chat/completions", {**chat, "echo": True, "logprobs": True, "top_logprobs": 2},
         None),
    ]
    sent = len(gw.engine.bodies)
    for path, body, param in refused:
        for stream in (False, True):
            resp = await gw.client.post(path, json={**body, "stream": stream}, headers=headers)
            error = gw.expect_error(resp, 400)
            assert error["param"] == param and "log-probabilities" in error["message"], error
    assert len(gw.engine.bodies) == sent
    for path, body in (("/v1/completions", {"model": BASE, "prompt": "x", "echo": True,
                                            "logprobs": None}),
                       ("/v1/completions", {"model": BASE, "prompt": "x", "logprobs": 2}),
                       ("/v1/chat/completions", {**chat, "prompt_logprobs": None,
                                                 "logprobs": True, "top_logprobs": 2})):
        resp = await gw.client.post(path, json=body, headers=headers)
        assert resp.status_code == 200, resp.text


async def test_unset_fields_are_not_invented(gw):
    key = await gw.new_tenant("acme")
    await gw.client.post("/v1/completions", json={"model": BASE, "prompt": [1, 2, 3]},
                         headers=gw.headers("acme", key))
    assert gw.engine.bodies[-1] == {"model": BASE, "prompt": [1, 2, 3],
                                    "cache_salt": gw.engine.bodies[-1]["cache_salt"]}


# -- names, versions and aliases -----------------------------------------------------------------

async def test_name_version_and_alias_resolve(gw, make_adapter):
    key = await gw.new_tenant("acme")
    v1 = await gw.register("acme", "support", make_adapter(seed=1))
    v2 = await gw.register("acme", "support", make_adapter(seed=2))
    assert (v1["version"], v2["version"]) == (1, 2)
    assert v1["sha256"] != v2["sha256"]
    resp = await gw.admin("PUT", "/admin/tenants/acme/adapters/support/aliases/stable",
                          json={"version": 1})
    assert resp.json() == {"adapter": "support", "alias": "stable", "version": 1}

    expected = {"support": v2, "support@1": v1, "support@2": v2, "support@stable": v1}
    for model, version in expected.items():
        resp = await gw.chat("acme", key, model)
        assert resp.status_code == 200, resp.text
        assert resp.json()["model"] == model
        assert gw.engine.bodies[-1]["model"] == version["engine_name"], model

    # Moving the alias takes effect at once (no stale cached resolution).
    await gw.admin("PUT", "/admin/tenants/acme/adapters/support/aliases/stable",
                   json={"version": 2})
    await gw.chat("acme", key, "support@stable")
    assert gw.engine.bodies[-1]["model"] == v2["engine_name"]
    # Deleting it too.
    resp = await gw.admin("DELETE", "/admin/tenants/acme/adapters/support/aliases/stable")
    assert resp.status_code == 200
    gw.expect_error(await gw.chat("acme", key, "support@stable"), 404)


async def test_versions_increase_and_are_never_reused(gw, make_adapter):
    key = await gw.new_tenant("acme")
    versions = [await gw.register("acme", "support", make_adapter(seed=i)) for i in range(3)]
    assert [v["version"] for v in versions] == [1, 2, 3]
    resp = await gw.admin("DELETE", "/admin/tenants/acme/adapters/support/versions/3")
    assert resp.status_code == 200
    v4 = await gw.register("acme", "support", make_adapter(seed=9))
    assert v4["version"] == 4
    gw.expect_error(await gw.chat("acme", key, "support@3"), 404)
    await gw.chat("acme", key, "support")
    assert gw.engine.bodies[-1]["model"] == v4["engine_name"]
    # Deleting the latest version makes the name resolve to the one before.
    await gw.admin("DELETE", "/admin/tenants/acme/adapters/support/versions/4")
    await gw.chat("acme", key, "support")
    assert gw.engine.bodies[-1]["model"] == versions[1]["engine_name"]

    # Deleting the whole adapter and registering it again never reuses an engine name or a
    # stored folder (vLLM caches by name: a reused name would serve the old weights).
    await gw.admin("DELETE", "/admin/tenants/acme/adapters/support")
    await gw.settle()
    again = await gw.register("acme", "support", make_adapter(seed=10))
    old_names = {v["engine_name"] for v in [*versions, v4]}
    assert again["engine_name"] not in old_names
    resp = await gw.chat("acme", key, "support")
    assert resp.status_code == 200
    assert gw.engine.bodies[-1]["model"] == again["engine_name"]
    assert gw.engine.load_calls[-1]["lora_name"] == again["engine_name"]


async def test_versions_of_one_name_in_two_tenants_are_separate(gw, make_adapter):
    key_a = await gw.new_tenant("tenant-a")
    key_b = await gw.new_tenant("tenant-b")
    va = await gw.register("tenant-a", "support", make_adapter(seed=1))
    vb = await gw.register("tenant-b", "support", make_adapter(seed=2))
    assert va["version"] == vb["version"] == 1
    assert va["engine_name"] != vb["engine_name"]
    await gw.chat("tenant-a", key_a, "support")
    await gw.chat("tenant-b", key_b, "support")
    assert [b["model"] for b in gw.engine.bodies] == [va["engine_name"], vb["engine_name"]]


# -- deletion and residency in the engine --------------------------------------------------------

async def test_deleting_an_adapter_unloads_it_and_erases_its_files(gw, make_adapter):
    key = await gw.new_tenant("acme")
    version = await gw.register("acme", "support", make_adapter())
    assert (await gw.chat("acme", key, "support")).status_code == 200
    name = version["engine_name"]
    stored = gw.engine.loaded[name]
    resp = await gw.admin("DELETE", "/admin/tenants/acme/adapters/support")
    assert resp.json() == {"id": "support", "object": "adapter", "deleted": True}
    await gw.settle()
    assert name not in gw.engine.loaded
    assert gw.engine.unload_calls == [name]
    assert not (gw.settings.store_dir / stored).exists()
    assert [p for p in gw.settings.store_dir.rglob("*") if p.is_file()] == []
    gw.expect_error(await gw.chat("acme", key, "support"), 404)
    snapshot = (await gw.admin("GET", "/admin/engine")).json()
    assert snapshot["adapters"]["resident"] == []


async def test_deleting_a_version_unloads_only_that_version(gw, make_adapter):
    key = await gw.new_tenant("acme")
    v1 = await gw.register("acme", "support", make_adapter(seed=1))
    v2 = await gw.register("acme", "support", make_adapter(seed=2))
    await gw.chat("acme", key, "support@1")
    await gw.chat("acme", key, "support@2")
    assert set(gw.engine.loaded) == {v1["engine_name"], v2["engine_name"]}
    await gw.admin("DELETE", "/admin/tenants/acme/adapters/support/versions/1")
    await gw.settle()
    assert set(gw.engine.loaded) == {v2["engine_name"]}
    assert (await gw.chat("acme", key, "support")).status_code == 200


async def test_deleting_a_tenant_unloads_its_adapters_and_kills_its_keys(gw, make_adapter):
    key = await gw.new_tenant("acme")
    other = await gw.new_tenant("other")
    version = await gw.register("acme", "support", make_adapter())
    mine = await gw.register("other", "support", make_adapter())
    await gw.chat("acme", key, "support")
    await gw.chat("other", other, "support")
    await gw.admin("DELETE", "/admin/tenants/acme")
    await gw.settle()
    assert version["engine_name"] not in gw.engine.loaded
    assert mine["engine_name"] in gw.engine.loaded
    gw.expect_error(await gw.chat("acme", key, BASE), 401)
    assert (await gw.chat("other", other, "support")).status_code == 200


async def test_lru_eviction_through_the_gateway(gw, make_adapter):
    """max_resident_adapters=2: a third adapter evicts the least recently used one."""
    key = await gw.new_tenant("acme")
    names = {}
    for n in ("a", "b", "c"):
        names[n] = (await gw.register("acme", n, make_adapter(seed=ord(n))))["engine_name"]
    for n in ("a", "b", "a", "c"):
        assert (await gw.chat("acme", key, n)).status_code == 200
    assert set(gw.engine.loaded) == {names["a"], names["c"]}
    assert gw.engine.unload_calls == [names["b"]]
    assert (await gw.chat("acme", key, "b")).status_code == 200
    assert set(gw.engine.loaded) == {names["c"], names["b"]}
    assert gw.engine.unload_calls == [names["b"], names["a"]]


async def test_concurrent_first_uses_load_once(gw, make_adapter):
    key = await gw.new_tenant("acme")
    version = await gw.register("acme", "support", make_adapter())
    answers = await asyncio.gather(*(gw.chat("acme", key, "support") for _ in range(6)))
    assert [a.status_code for a in answers] == [200] * 6
    assert [c["lora_name"] for c in gw.engine.load_calls] == [version["engine_name"]]


@pytest.mark.health_poll(0.05)
async def test_engine_restart_clears_leftovers_and_reloads(gw, make_adapter):
    key = await gw.new_tenant("acme")
    version = await gw.register("acme", "support", make_adapter())
    assert (await gw.chat("acme", key, "support")).status_code == 200
    gw.engine.healthy = False
    await wait_until(lambda: not gw.services.readiness.ready, "the engine to be seen down")
    # The engine comes back with an adapter this gateway did not load (and without ours).
    gw.engine.loaded = {"left-over": "/somewhere"}
    gw.engine.healthy = True
    await wait_until(lambda: gw.services.readiness.ready, "the engine to be seen up")
    assert "left-over" in gw.engine.unload_calls
    assert gw.engine.loaded == {}
    assert (await gw.chat("acme", key, "support")).status_code == 200
    assert [c["lora_name"] for c in gw.engine.load_calls] == [version["engine_name"]] * 2




@pytest.mark.health_poll(0.05)
@pytest.mark.parametrize("stream", [False, True])
async def test_engine_restart_between_health_polls_is_caught_by_its_404(gw, make_adapter, stream):
    key = await gw.new_tenant("acme")
    version = await gw.register("acme", "support", make_adapter())
    assert (await gw.chat("acme", key, "support")).status_code == 200
    gw.engine.loaded = {}  # restarted and healthy again before any poll saw it down
    resp = await gw.chat("acme", key, "support", stream=stream)
    gw.expect_error(resp, 503, code="engine_unavailable")  # not the engine's misleading 404
    assert resp.headers["retry-after"]
    await wait_until(lambda: gw.services.readiness.ready, "the engine to be seen up again")
    assert (await gw.chat("acme", key, "support", stream=stream)).status_code == 200
    assert [c["lora_name"] for c in gw.engine.load_calls] == [version["engine_name"]] * 2
    resp = await gw.chat("acme", key, "nope")
    gw.expect_error(resp, 404, code="model_not_found")  # unknown names stay plain 404s

# -- keys and listings ---------------------------------------------------------------------------

async def test_keys_are_stored_hashed(gw):
    key = await gw.new_tenant("acme")
    assert key.startswith("lpx-") and len(key) > 40
    listed = (await gw.admin("GET", "/admin/tenants/acme/keys")).json()["data"]
    assert len(listed) == 1 and "key" not in listed[0]
    assert key.startswith(listed[0]["prefix"]) and len(listed[0]["prefix"]) < len(key) // 2
    await gw.chat("acme", key, BASE)
    files = sorted(gw.settings.home.glob("registry.db*"))
    assert files, "no registry database found"
    data = b"".join(p.read_bytes() for p in files)
    assert hash_key(key).encode() in data  # the right files were searched
    assert key.encode() not in data
    assert key[len(listed[0]["prefix"]):].encode() not in data


async def test_two_keys_revoking_one_keeps_the_other(gw):
    key1 = await gw.new_tenant("acme")
    resp = await gw.admin("POST", "/admin/tenants/acme/keys", json={"name": "second"})
    assert resp.status_code == 201 and resp.json()["name"] == "second"
    key2 = resp.json()["key"]
    assert key2 != key1
    await gw.admin("DELETE", f"/admin/tenants/acme/keys/{resp.json()['id']}")
    gw.expect_error(await gw.chat("acme", key2, BASE), 401)
    assert (await gw.chat("acme", key1, BASE)).status_code == 200


@pytest.mark.registry_poll(0.05)
async def test_changes_made_elsewhere_reach_the_cached_lookups(gw, make_adapter):
    # Another gateway sharing the database, or a training worker, writes to the registry
    # without clearing this gateway's caches: the registry generation tells it.
    elsewhere = Registry(gw.settings.registry_url)
    key = await gw.new_tenant("acme")
    v1 = await gw.register("acme", "support", make_adapter())
    v2 = await gw.register("acme", "support", make_adapter())
    await gw.admin("PUT", "/admin/tenants/acme/adapters/support/aliases/prod", json={"version": 1})
    assert (await gw.chat("acme", key, "support@prod")).status_code == 200
    assert gw.engine.bodies[-1]["model"] == v1["engine_name"]  # now cached

    await elsewhere.set_alias("acme", "support", "prod", 2)

    async def alias_moved() -> bool:
        assert (await gw.chat("acme", key, "support@prod")).status_code == 200
        return gw.engine.bodies[-1]["model"] == v2["engine_name"]

    await wait_until(alias_moved, "the moved alias to be seen")

    key_id = (await gw.admin("GET", "/admin/tenants/acme/keys")).json()["data"][0]["id"]
    await elsewhere.revoke_key("acme", key_id)

    async def key_refused() -> bool:
        return (await gw.chat("acme", key, BASE)).status_code == 401

    await wait_until(key_refused, "the revoked key to be refused")
    await elsewhere.close()


async def test_repeated_and_concurrent_requests_share_lookups(gw, make_adapter, monkeypatch):
    key = await gw.new_tenant("acme")
    await gw.register("acme", "support", make_adapter())
    calls = {"resolve": 0, "key": 0}
    registry = gw.services.registry
    resolve, key_owner = registry.resolve, registry.key_owner

    async def counted_resolve(*args):
        calls["resolve"] += 1
        return await resolve(*args)

    async def counted_key(*args):
        calls["key"] += 1
        return await key_owner(*args)

    monkeypatch.setattr(registry, "resolve", counted_resolve)
    monkeypatch.setattr(registry, "key_owner", counted_key)
    gw.services.forget_lookups()
    answers = await asyncio.gather(*(gw.chat("acme", key, "support") for _ in range(12)))
    answers.append(await gw.chat("acme", key, "support"))
    assert [a.status_code for a in answers] == [200] * 13
    assert calls == {"resolve": 1, "key": 1}


async def test_models_lists_base_and_own_adapters(gw, make_adapter):
    key = await gw.new_tenant("acme")
    other = await gw.new_tenant("other")
    await gw.register("acme", "support", make_adapter(seed=1))
    await gw.register("acme", "support", make_adapter(seed=2))
    await gw.register("acme", "billing", make_adapter(seed=3))
    await gw.register("other", "hidden", make_adapter(seed=4))
    await gw.admin("PUT", "/admin/tenants/acme/adapters/support/aliases/stable",
                   json={"version": 1})
    resp = await gw.client.get("/v1/models", headers=gw.headers("acme", key))
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert ids[0] == BASE
    assert sorted(ids[1:]) == sorted(["billing", "billing@1", "support", "support@1",
                                      "support@2", "support@stable"])
    for m in body["data"][1:]:
        assert m["object"] == "model" and m["owned_by"] == "acme" and m["parent"] == BASE
    assert body["data"][0]["parent"] is None
    one = await gw.client.get("/v1/models/support@stable", headers=gw.headers("acme", key))
    assert one.status_code == 200 and one.json()["id"] == "support@stable"
    base = await gw.client.get(f"/v1/models/{BASE}", headers=gw.headers("acme", key))
    assert base.status_code == 200 and base.json()["id"] == BASE
    theirs = await gw.client.get("/v1/models", headers=gw.headers("other", other))
    assert [m["id"] for m in theirs.json()["data"]] == [BASE, "hidden", "hidden@1"]


async def test_version_record_describes_the_adapter(gw, make_adapter):
    await gw.new_tenant("acme")
    folder = make_adapter(r=16, alpha=32, targets=("q_proj", "k_proj", "down_proj"),
                          config_overrides={"base_model_name_or_path": "someone/else"})
    version = await gw.register("acme", "support", folder)
    assert version["rank"] == 16 and version["alpha"] == 32.0
    assert version["target_modules"] == ["down_proj", "k_proj", "q_proj"]
    assert version["model"] == "support@1" and version["source"] == "upload"
    assert version["size_bytes"] == (folder / "adapter_model.safetensors").stat().st_size
    assert any("someone/else" in w for w in version["warnings"])


async def test_healthz_and_engine_status(gw):
    resp = await gw.client.get("/healthz")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok", "model": BASE}
    status = (await gw.admin("GET", "/admin/engine")).json()
    assert status["ready"] is True and status["spawned"] is False
    assert status["adapters"]["capacity"] == 2


# -- client disconnects ----------------------------------------------------------------------------

async def test_client_disconnect_before_answer_is_client_gone_and_cancels_work():
    from server.routes.raw_generation import ClientGone, unless_disconnected

    async def gone():
        return {"type": "http.disconnect"}

    cancelled = asyncio.Event()

    async def slow_answer():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(ClientGone):
        await unless_disconnected(gone, slow_answer())
    await asyncio.wait_for(cancelled.wait(), 10)
    assert cancelled.is_set()


async def test_answer_ready_before_disconnect_is_returned():
    from server.routes.raw_generation import unless_disconnected

    async def staying():
        await asyncio.sleep(3600)

    async def answer():
        return {"ok": True}

    assert await unless_disconnected(staying, answer()) == {"ok": True}


async def test_client_leaving_a_stream_closes_it_and_is_client_gone():
    from server.request_log import RequestRecord
    from server.routes.raw_generation import CLIENT_GONE, _send_events

    closed = asyncio.Event()

    async def events():
        try:
            yield b"data: {}\n\n"
            await asyncio.sleep(3600)  # the engine is slow to send the next token
        finally:
            closed.set()  # the engine connection is closed here: vLLM aborts the request

    left = asyncio.Event()

    async def receive():
        await left.wait()
        return {"type": "http.disconnect"}

    sent = []

    async def send(message):
        sent.append(message)
        if message.get("body"):
            left.set()  # the client leaves after its first event

    record = RequestRecord("r", "POST", "/v1/chat/completions")
    await asyncio.wait_for(_send_events(events(), receive, send, record), 10)
    assert closed.is_set() and record.status == CLIENT_GONE
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]


async def test_a_stream_that_ends_is_not_client_gone_when_the_end_wakes_the_watcher_first():
    # uvicorn answers `receive` with http.disconnect as soon as the response is complete, and
    # the final send may still await (flow control) after that: a whole answer, not a 499.
    from server.request_log import RequestRecord
    from server.routes.raw_generation import _send_events

    async def events():
        yield b"data: {}\n\n"
        yield b"data: [DONE]\n\n"

    complete = asyncio.Event()

    async def receive():
        await complete.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body" and not message.get("more_body"):
            complete.set()
            await asyncio.sleep(0.05)  # draining the transport after the last write

    record = RequestRecord("r", "POST", "/v1/chat/completions")
    record.status = 200
    await asyncio.wait_for(_send_events(events(), receive, send, record), 10)
    assert record.status == 200


async def test_a_client_that_closes_on_done_is_not_client_gone():
    # The OpenAI SDK closes the connection as soon as it reads `[DONE]`, while the stream's own
    # end (closing the engine connection, settling usage) may still await: a whole answer.
    from server.request_log import RequestRecord
    from server.routes.raw_generation import _send_events

    done_sent = asyncio.Event()
    settled = []

    async def events():
        try:
            yield b"data: {}\n\n"
            yield b"data: [DONE]\n\n"
            await asyncio.sleep(0.2)  # closing the engine connection
        finally:
            settled.append(True)

    async def receive():
        await done_sent.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message.get("body", b"").endswith(b"[DONE]\n\n"):
            done_sent.set()

    record = RequestRecord("r", "POST", "/v1/chat/completions")
    record.status = 200
    await asyncio.wait_for(_send_events(events(), receive, send, record), 10)
    assert record.status == 200
    assert settled == [True]


async def test_one_json_access_line_per_request_without_prompt_text(gw, make_adapter, caplog):
    key = await gw.new_tenant("acme")
    await gw.register("acme", "support", make_adapter())
    caplog.set_level("INFO", logger="loraplex.access")
    resp = await gw.client.post(
        "/v1/chat/completions", headers={**gw.headers("acme", key), "X-Request-ID": "trace-1"},
        json={"model": "support", "messages": [{"role": "user", "content": "secret prompt"}]})
    assert resp.status_code == 200 and resp.headers["x-request-id"] == "trace-1"
    lines = [json.loads(r.getMessage()) for r in caplog.records
             if r.name == "loraplex.access" and '"trace-1"' in r.getMessage()]
    assert len(lines) == 1
    line = lines[0]
    assert line["status"] == 200 and line["tenant"] == "acme" and line["adapter"] == "support"
    assert line["path"] == "/v1/chat/completions" and line["prompt_tokens"] > 0
    assert line["completion_tokens"] > 0 and line["latency_s"] > 0
    assert "secret prompt" not in caplog.text
