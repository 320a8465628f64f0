"""/openapi.json documents every endpoint: its body, its answer and OpenAI's error shape."""

from __future__ import annotations

from typing import Any

# Operations with nothing to refuse: no auth, no input, no dependency that can be down.
CANNOT_FAIL = {("get", "/metrics")}
# POST/PUT operations that take no body (the path says everything).
NO_BODY = {("put", "/admin/tenants/{tenant}/adapters/{name}/versions/{version}/pin"),
           ("post", "/v1/fine_tuning/jobs/{job_id}/cancel"),
           ("post", "/admin/fine_tuning/jobs/{job_id}/cancel")}


async def _schema(gw: Any) -> dict[str, Any]:
    resp = await gw.client.get("/openapi.json")
    assert resp.status_code == 200
    return resp.json()  # type: ignore[no-any-return]


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]]
    return node


async def test_every_body_is_documented(gw):
    schema = await _schema(gw)
    seen = set()
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            if method not in ("post", "put") or (method, path) in NO_BODY:
                continue
            seen.add((method, path))
            content = op.get("requestBody", {}).get("content", {})
            assert content, f"{method.upper()} {path} documents no request body"
            for media in content.values():
                body = _resolve(schema, media["schema"])
                assert body.get("properties"), f"{method.upper()} {path}: body has no fields"
    # The ones a newcomer calls first, by name.
    assert ("post", "/v1/chat/completions") in seen and ("post", "/admin/tenants") in seen
    chat = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]
    fields = _resolve(schema, chat["application/json"]["schema"])["properties"]
    assert {"model", "messages", "stream", "max_tokens"} <= set(fields)


async def test_every_answer_and_error_is_documented(gw):
    schema = await _schema(gw)
    error = _resolve(schema, {"$ref": "#/components/schemas/ErrorResponse"})
    assert set(_resolve(schema, error["properties"]["error"])["properties"]) == {
        "message", "type", "param", "code"}
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            where = f"{method.upper()} {path}"
            ok = [s for s in op["responses"] if s.startswith("2")]
            assert ok, f"{where}: no success answer documented"
            assert op["responses"][ok[0]].get("content"), f"{where}: success answer has no schema"
            errors = [s for s in op["responses"] if s[0] in "45"]
            assert errors or (method, path) in CANNOT_FAIL, f"{where}: no error answer documented"
            for status in errors:
                media = op["responses"][status]["content"]["application/json"]
                assert media["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}, \
                    f"{where} {status}: not OpenAI's error shape"


async def test_the_wire_models_stay_permissive_like_vllms(gw):
    # Unknown sampling fields pass through to the engine (vLLM validates them).
    key = await gw.new_tenant("acme")
    resp = await gw.client.post("/v1/chat/completions", headers=gw.headers("acme", key), json={
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "min_p": 0.1, "repetition_penalty": 1.1,
        "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200
    assert gw.engine.bodies[-1]["min_p"] == 0.1
    assert gw.engine.bodies[-1]["repetition_penalty"] == 1.1
