"""Every bad input of the tenant API gets the right status and OpenAI's error shape."""

from __future__ import annotations

import json

import pytest

from tests.unit.conftest import wait_until

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


# -- authentication ----------------------------------------------------------------------------

async def test_missing_key_is_401(gw):
    resp = await gw.client.post(CHAT, json={"model": BASE, "messages": []},
                                headers={"X-Tenant-ID": "acme"})
    err = gw.expect_error(resp, 401, contains="authorization")
    assert err["type"] == "authentication_error"


async def test_invalid_key_is_401(gw, subtests):
    key = await gw.new_tenant("acme")
    for authorization in ["Bearer lpx-not-a-real-key", "Basic dXNlcjpwYXNz", "Bearer ",
                          "lpx-no-scheme", f"Bearer {'x' * 300}", f"Bearer {key}x",
                          f"Bearer {key[:-1]}", f"Token {key}"]:
        with subtests.test(authorization=authorization):
            resp = await gw.client.post(CHAT, json={"model": BASE, "messages": [
                {"role": "user", "content": "hi"}]},
                headers={"X-Tenant-ID": "acme", "Authorization": authorization})
            err = gw.expect_error(resp, 401)
            assert err["type"] == "authentication_error"
    assert gw.engine.requests == []


async def test_revoked_key_is_401(gw):
    key = await gw.new_tenant("acme")
    assert (await gw.chat("acme", key, BASE)).status_code == 200  # warms the key cache
    keys = (await gw.admin("GET", "/admin/tenants/acme/keys")).json()["data"]
    resp = await gw.admin("DELETE", f"/admin/tenants/acme/keys/{keys[0]['id']}")
    assert resp.status_code == 200 and resp.json()["revoked_at"] is not None
    gw.expect_error(await gw.chat("acme", key, BASE), 401, contains="invalid API key")
    gw.expect_error(await gw.client.get("/v1/models", headers=gw.headers("acme", key)), 401)


async def test_missing_tenant_header_is_401(gw):
    key = await gw.new_tenant("acme")
    resp = await gw.client.post(CHAT, json={"model": BASE, "messages": [
        {"role": "user", "content": "hi"}]}, headers={"Authorization": f"Bearer {key}"})
    gw.expect_error(resp, 401, contains="X-Tenant-ID", code="missing_tenant")


async def test_key_of_other_tenant_is_403(gw):
    key_a = await gw.new_tenant("tenant-a")
    await gw.new_tenant("tenant-b")
    resp = await gw.chat("tenant-b", key_a, BASE)
    err = gw.expect_error(resp, 403, code="tenant_mismatch")
    assert err["type"] == "permission_error"
    gw.expect_error(await gw.client.get("/v1/models", headers=gw.headers("tenant-b", key_a)),
                    403)
    assert gw.engine.requests == []


async def test_key_of_deleted_tenant_stays_dead_when_the_id_is_reused(gw):
    key = await gw.new_tenant("acme")
    assert (await gw.admin("DELETE", "/admin/tenants/acme")).status_code == 200
    gw.expect_error(await gw.chat("acme", key, BASE), 401)
    assert (await gw.admin("POST", "/admin/tenants", json={"id": "acme"})).status_code == 201
    gw.expect_error(await gw.chat("acme", key, BASE), 401)


# -- unknown models and tenant isolation ---------------------------------------------------------

async def test_unknown_model_is_404(gw, subtests):
    key = await gw.new_tenant("acme")
    for model in ["no-such-adapter", "no-such@3", "no-such@prod", "../etc", "a/b", "@",
                  BASE + "@1", "x" * 200, BASE.lower()]:
        with subtests.test(model=model):
            err = gw.expect_error(await gw.chat("acme", key, model), 404,
                                  code="model_not_found")
            assert err["type"] == "not_found_error"
            assert err["param"] == "model"
            gw.expect_error(await gw.client.get(f"/v1/models/{model}",
                                                headers=gw.headers("acme", key)), 404)
    assert gw.engine.requests == []


async def test_unknown_version_and_alias_of_known_adapter_are_404(gw, make_adapter):
    key = await gw.new_tenant("acme")
    await gw.register("acme", "support", make_adapter())
    gw.expect_error(await gw.chat("acme", key, "support@2"), 404)
    gw.expect_error(await gw.chat("acme", key, "support@prod"), 404)
    assert gw.engine.requests == []


async def test_other_tenants_adapter_is_invisible(gw, make_adapter):
    await gw.new_tenant("tenant-a")
    key_b = await gw.new_tenant("tenant-b")
    await gw.register("tenant-a", "secret-sauce", make_adapter())
    for model in ("secret-sauce", "secret-sauce@1"):
        err = gw.expect_error(await gw.chat("tenant-b", key_b, model), 404)
        assert "tenant-a" not in err["message"]
    listed = (await gw.client.get("/v1/models", headers=gw.headers("tenant-b", key_b))).json()
    assert [m["id"] for m in listed["data"]] == [BASE]
    gw.expect_error(await gw.client.get("/v1/models/secret-sauce",
                                        headers=gw.headers("tenant-b", key_b)), 404)
    assert gw.engine.load_calls == [] and gw.engine.requests == []


# -- bad bodies ----------------------------------------------------------------------------------

def _chat_body(**overrides):
    body = {"model": BASE, "messages": [{"role": "user", "content": "hi"}]}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not ...}


BAD_CHAT_BODIES = [
    (b"{not json", None),
    (b"", None),
    (b"\xff\xfe\x00garbage", None),
    (b"[1, 2, 3]", None),
    (b'"a string"', None),
    (b"null", None),
    (json.dumps(_chat_body(messages=...)).encode(), "messages"),
    (json.dumps(_chat_body(messages=[])).encode(), "messages"),
    (json.dumps(_chat_body(messages="hi")).encode(), "messages"),
    (json.dumps(_chat_body(messages=[{"role": "wizard", "content": "hi"}])).encode(),
     "messages.0.role"),
    (json.dumps(_chat_body(messages=[{"content": "hi"}])).encode(), "messages.0.role"),
    (json.dumps(_chat_body(model=...)).encode(), "model"),
    (json.dumps(_chat_body(model="")).encode(), "model"),
    (json.dumps(_chat_body(model=7)).encode(), "model"),
    (json.dumps(_chat_body(max_tokens=0)).encode(), "max_tokens"),
    (json.dumps(_chat_body(max_tokens=-5)).encode(), "max_tokens"),
    (json.dumps(_chat_body(max_completion_tokens=0)).encode(), "max_completion_tokens"),
    (json.dumps(_chat_body(n=100)).encode(), "n"),
    (json.dumps(_chat_body(n=0)).encode(), "n"),
    (json.dumps(_chat_body(temperature=5)).encode(), "temperature"),
    (json.dumps(_chat_body(temperature=-1)).encode(), "temperature"),
    (json.dumps(_chat_body(top_p=0)).encode(), "top_p"),
    (json.dumps(_chat_body(stream="yes please")).encode(), "stream"),
    (json.dumps(_chat_body(stream_options={"include_usage": "many"})).encode(),
     "stream_options.include_usage"),
]


async def test_bad_chat_body_is_400(gw, subtests):
    key = await gw.new_tenant("acme")
    for raw, param in BAD_CHAT_BODIES:
        with subtests.test(body=raw[:80]):
            resp = await gw.client.post(CHAT, content=raw, headers={
                **gw.headers("acme", key), "Content-Type": "application/json"})
            err = gw.expect_error(resp, 400)
            assert err["type"] == "invalid_request_error"
            assert err["param"] == param
            if param is not None:
                assert param in err["message"]
    assert gw.engine.requests == []


BAD_COMPLETION_BODIES = [
    ({"model": BASE, "prompt": ""}, "prompt"),
    ({"model": BASE, "prompt": []}, "prompt"),
    ({"model": BASE}, "prompt"),
    ({"model": BASE, "prompt": {"text": "hi"}}, "prompt"),
    ({"model": BASE, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"model": BASE, "prompt": "hi", "n": 100}, "n"),
    ({"model": BASE, "prompt": "hi", "temperature": 5}, "temperature"),
    ({"model": BASE, "messages": [{"role": "user", "content": "hi"}]}, "prompt"),
]


async def test_bad_completion_body_is_400(gw, subtests):
    key = await gw.new_tenant("acme")
    for body, param in BAD_COMPLETION_BODIES:
        with subtests.test(body=body):
            resp = await gw.client.post(COMPLETIONS, json=body, headers=gw.headers("acme", key))
            err = gw.expect_error(resp, 400)
            # A union field's error names the member tried last ("prompt.str"); field first.
            assert err["param"].split(".")[0] == param
    assert gw.engine.requests == []


async def test_bad_body_checked_after_auth(gw):
    """Without a key, a malformed body is still a 401: nothing is parsed for strangers."""
    resp = await gw.client.post(CHAT, content=b"{not json",
                                headers={"Content-Type": "application/json"})
    gw.expect_error(resp, 401)


async def test_deeply_nested_json_is_400_not_500(gw):
    key = await gw.new_tenant("acme")
    raw = b'{"model": "x", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    resp = await gw.client.post(CHAT, content=raw, headers={
        **gw.headers("acme", key), "Content-Type": "application/json"})
    gw.expect_error(resp, 400)


# -- body size -----------------------------------------------------------------------------------

async def test_body_over_limit_with_content_length_is_413(gw):
    limit = gw.settings.max_request_bytes
    raw = b'{"model": "x", "pad": "' + b"a" * limit + b'"}'
    resp = await gw.client.post(CHAT, content=raw, headers={"Content-Type": "application/json"})
    err = gw.expect_error(resp, 413, code="request_too_large")
    assert str(limit) in err["message"]


async def test_body_over_limit_chunked_is_413(gw):
    key = await gw.new_tenant("acme")
    limit = gw.settings.max_request_bytes
    chunk = b"a" * 65536

    async def body():
        yield b'{"model": "x", "pad": "'
        for _ in range(limit // len(chunk) + 2):
            yield chunk
        yield b'"}'

    resp = await gw.client.post(CHAT, content=body(), headers={
        **gw.headers("acme", key), "Content-Type": "application/json"})
    assert "content-length" not in {k.lower() for k in resp.request.headers}
    gw.expect_error(resp, 413, code="request_too_large")
    assert gw.engine.requests == []


async def test_body_just_under_limit_is_not_413(gw):
    key = await gw.new_tenant("acme")
    body = _chat_body(pad="")
    size = len(json.dumps(body).encode())
    body["pad"] = "a" * (gw.settings.max_request_bytes - size)
    raw = json.dumps(body).encode()
    assert len(raw) == gw.settings.max_request_bytes
    resp = await gw.client.post(CHAT, content=raw, headers={
        **gw.headers("acme", key), "Content-Type": "application/json"})
    assert resp.status_code == 200, resp.text


# -- engine down ---------------------------------------------------------------------------------

async def test_engine_unreachable_is_503_with_retry_after(gw):
    key = await gw.new_tenant("acme")
    gw.transport.down = True
    for stream in (False, True):
        resp = await gw.chat("acme", key, BASE, stream=stream)
        err = gw.expect_error(resp, 503, code="engine_unavailable")
        assert err["type"] == "service_unavailable_error"
        assert int(resp.headers["retry-after"]) >= 1


async def test_engine_unreachable_while_loading_adapter_is_503(gw, make_adapter):
    key = await gw.new_tenant("acme")
    await gw.register("acme", "support", make_adapter())
    gw.transport.down = True
    resp = await gw.chat("acme", key, "support")
    gw.expect_error(resp, 503, code="engine_unavailable")
    assert int(resp.headers["retry-after"]) >= 1
    # Once it is back, the adapter loads (the failed load did not poison the slot).
    gw.transport.down = False
    resp = await gw.chat("acme", key, "support")
    assert resp.status_code == 200, resp.text
    assert resp.json()["model"] == "support"


@pytest.mark.health_poll(0.05)
async def test_engine_unhealthy_is_503_then_recovers(gw):
    key = await gw.new_tenant("acme")
    gw.engine.healthy = False
    await wait_until(lambda: not gw.services.readiness.ready, "the engine to be seen down")
    resp = await gw.chat("acme", key, BASE)
    gw.expect_error(resp, 503, code="engine_unavailable")
    assert resp.headers["retry-after"] == "5"
    gw.expect_error(await gw.client.get("/healthz"), 503)
    assert gw.engine.requests == []
    gw.engine.healthy = True
    await wait_until(lambda: gw.services.readiness.ready, "the engine to be seen up")
    assert (await gw.chat("acme", key, BASE)).status_code == 200
    assert (await gw.client.get("/healthz")).json()["status"] == "ok"


async def test_engine_5xx_is_502_and_4xx_relayed(gw):
    key = await gw.new_tenant("acme")
    gw.engine.fail_status = 500
    gw.expect_error(await gw.chat("acme", key, BASE), 502, code="engine_error")
    gw.engine.fail_status = 400
    err = gw.expect_error(await gw.chat("acme", key, BASE), 400, contains="injected")
    assert err["type"] == "invalid_request_error"



# -- routes the gateway does not have ------------------------------------------------------------

async def test_unknown_route_is_404_in_error_shape(gw, subtests):
    key = await gw.new_tenant("acme")
    for method, path in [("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter"),
                         ("GET", "/v1/nothing-here"), ("POST", "/v1/embeddings"),
                         ("GET", "/health"), ("POST", "/admin/nothing")]:
        with subtests.test(method=method, path=path):
            for headers in (gw.headers("acme", key), gw.admin_headers, {}):
                resp = await gw.client.request(method, path, headers=headers,
                                               json={"lora_name": "x", "lora_path": "/tmp"})
                err = gw.expect_error(resp, 404)
                assert err["type"] == "not_found_error"
    assert gw.engine.load_calls == [] and gw.engine.unload_calls == []


async def test_wrong_method_is_405_in_error_shape(gw):
    key = await gw.new_tenant("acme")
    resp = await gw.client.get(CHAT, headers=gw.headers("acme", key))
    gw.expect_error(resp, 405)


# -- no adapter slot free ------------------------------------------------------------------------

async def test_all_adapter_slots_held_is_429_with_retry_after(gw, make_adapter):
    key = await gw.new_tenant("acme")
    names = [(await gw.register("acme", n, make_adapter(seed=i)))["engine_name"]
             for i, n in enumerate(("a", "b", "c"))]
    for n in ("a", "b"):
        assert (await gw.chat("acme", key, n)).status_code == 200
    residency = gw.services.residency
    residency._slot_wait_s = 0.05  # instead of the configured 30 s

    async def never_fetched():
        raise AssertionError("resident adapters are not fetched")

    # Two requests in flight hold both slots (max_resident_adapters=2).
    async with residency.use(names[0], never_fetched), residency.use(names[1], never_fetched):
        resp = await gw.chat("acme", key, "c")
        err = gw.expect_error(resp, 429, code="adapter_slots_busy")
        assert err["type"] == "rate_limit_error"
        assert int(resp.headers["retry-after"]) >= 1
        assert (await gw.chat("acme", key, "a")).status_code == 200  # resident still served
    assert (await gw.chat("acme", key, "c")).status_code == 200
    assert names[2] in gw.engine.loaded
