"""Schema-driven fuzzing of the whole API (schemathesis), in-process, against the fake engine.

The schema is the app's own `/openapi.json`: every operation it lists is fuzzed, with the data
it documents (valid, and invalid: schemathesis' positive and negative modes), so that new
endpoints, request bodies and response models are covered as soon as they are documented.
Each generated request is sent four ways: without credentials, with a wrong key or admin token,
with another tenant's key (tenant endpoints), then as the caller it is meant for (the admin
token on `/admin`, `X-Tenant-ID` and that tenant's key elsewhere). Path parameters sometimes
name things that exist (the tenant, its adapter, version, alias, key, file and job), so that
requests get past the 404s; so do the `model` and file fields of JSON bodies. Every answer must be:

- no 5xx (`not_a_server_error`);
- a documented status code (`status_code_conformance`), a documented content type
  (`content_type_conformance`) and a body that matches the documented schema
  (`response_schema_conformance`);
- for every 4xx, OpenAI's error object `{"error": {"message", "type", "param", "code"}}`.

Bounded and repeatable: at most MAX_EXAMPLES generated requests per operation, BUDGET_S for the
whole run (each operation gets an equal share of what is left), derandomized (the same
requests on every run), no example database. Every distinct failure (operation, check,
status) is reported once, with the request that caused it and the answer; with FUZZ_REPORT set
to a file name the report is also written there. FUZZ_MAX_EXAMPLES and FUZZ_BUDGET_S raise or
lower the bounds for a longer local run; FUZZ_ONLY=<text> fuzzes only the operations whose
label ("POST /v1/files") contains it.

Hypothesis drives generation in a worker thread; each request is sent on the test's event
loop, where the gateway and its background tasks live (`gw` fixture).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.unit.conftest import BASE_MODEL, Gw

pytestmark = pytest.mark.fuzz

MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "30"))
MIN_EXAMPLES = 5  # per operation, even over its share of the budget (not over BUDGET_S)
BUDGET_S = float(os.environ.get("FUZZ_BUDGET_S", "100"))
ONLY = os.environ.get("FUZZ_ONLY", "")  # fuzz only the operations whose label contains this
REQUEST_TIMEOUT_S = 30.0
HOST = "http://test"  # the gw fixture's client base URL
AUTH_HEADERS = {"authorization", "x-tenant-id"}
TENANT, OTHER = "acme", "globex"
ADAPTER, ALIAS = "bot", "prod"
T = TypeVar("T")


def _dataset(n: int = 12) -> bytes:
    return "\n".join(json.dumps({"messages": [
        {"role": "user", "content": f"question {i}"},
        {"role": "assistant", "content": f"answer {i}"}]}) for i in range(n)).encode()


# -- the world that valid requests can name -------------------------------------------------

@dataclass
class World:
    gw: Gw
    make_adapter: Callable[..., Path]
    keys: dict[str, str] = field(default_factory=dict)  # tenant -> key
    key_ids: dict[str, str] = field(default_factory=dict)
    file_id: str | None = None
    job_id: str | None = None
    version: int = 1  # an existing version of the adapter

    async def refresh(self) -> None:
        """Put back what earlier requests deleted or revoked (idempotent, cheap when intact)."""
        gw = self.gw
        for tenant in (TENANT, OTHER):
            if (await gw.admin("GET", f"/admin/tenants/{tenant}")).status_code == 404:
                resp = await gw.admin("POST", "/admin/tenants", json={"id": tenant})
                assert resp.status_code == 201, resp.text
                self.keys.pop(tenant, None)
            key = self.keys.get(tenant)
            if key is None or (await gw.client.get(
                    "/v1/models", headers=gw.headers(tenant, key))).status_code == 401:
                resp = await gw.admin("POST", f"/admin/tenants/{tenant}/keys")
                assert resp.status_code == 201, resp.text
                self.keys[tenant], self.key_ids[tenant] = resp.json()["key"], resp.json()["id"]
        base = f"/admin/tenants/{TENANT}/adapters/{ADAPTER}"
        resp = await gw.admin("GET", base)
        versions = [v["version"] for v in resp.json().get("versions", [])] \
            if resp.status_code == 200 else []
        if not versions:  # numbers are never reused: a new one after a delete
            versions = [(await gw.register(TENANT, ADAPTER, self.make_adapter()))["version"]]
        self.version = versions[-1]
        await gw.admin("PUT", f"{base}/aliases/{ALIAS}", json={"version": self.version})
        headers = self.headers(TENANT)
        if self.file_id is None or (await gw.client.get(
                f"/v1/files/{self.file_id}", headers=headers)).status_code == 404:
            resp = await gw.client.post(
                "/v1/files", headers=headers, data={"purpose": "fine-tune"},
                files={"file": ("train.jsonl", _dataset(), "application/jsonl")})
            self.file_id = resp.json()["id"] if resp.status_code == 200 else None
        if self.file_id is not None and (self.job_id is None or (await gw.client.get(
                f"/v1/fine_tuning/jobs/{self.job_id}", headers=headers)).status_code == 404):
            # The fake base model has no tokenizer: the job may fail in the background, but
            # it exists, which is all the job endpoints need.
            resp = await gw.client.post("/v1/fine_tuning/jobs", headers=headers, json={
                "model": BASE_MODEL, "training_file": self.file_id, "suffix": "fuzz"})
            self.job_id = resp.json()["id"] if resp.status_code == 200 else None
        await gw.settle()

    def headers(self, tenant: str) -> dict[str, str]:
        return self.gw.headers(tenant, self.keys[tenant])

    def known(self) -> dict[str, list[Any]]:
        """Path parameter name -> values that exist."""
        values: dict[str, list[Any]] = {
            "tenant": [TENANT], "name": [ADAPTER], "version": [self.version], "alias": [ALIAS],
            "key_id": [self.key_ids[TENANT]],
            "model": [ADAPTER, f"{ADAPTER}@{self.version}", f"{ADAPTER}@{ALIAS}", BASE_MODEL],
        }
        if self.file_id:
            values["file_id"] = [self.file_id]
        if self.job_id:
            values["job_id"] = [self.job_id]
        return values

    def auth_variants(self, path: str) -> list[tuple[str, dict[str, str]]]:
        """(label, credentials) to send a request with; the intended caller last."""
        if path.startswith("/admin"):
            return [("no credentials", {}),
                    ("wrong admin token", {"Authorization": "Bearer not-the-admin-token"}),
                    ("a tenant key", self.headers(TENANT)),
                    ("admin", dict(self.gw.admin_headers))]
        return [("no credentials", {}),
                ("wrong key", {"X-Tenant-ID": TENANT, "Authorization": "Bearer lpx-wrong"}),
                ("no tenant header", {"Authorization": f"Bearer {self.keys[TENANT]}"}),
                ("another tenant's key", {"X-Tenant-ID": TENANT,
                                          "Authorization": f"Bearer {self.keys[OTHER]}"}),
                ("tenant", self.headers(TENANT))]


# -- checks -----------------------------------------------------------------------------------

def openai_error_shape(_ctx: Any, response: schemathesis.Response, _case: Case) -> None:
    """Every 4xx/5xx is OpenAI's error object (the SDK reads `error.message` and `error.code`)."""
    if response.status_code < 400:
        return
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"error body is not JSON: {response.content[:200]!r}") from None
    err = body.get("error") if isinstance(body, dict) else None
    assert isinstance(body, dict) and set(body) == {"error"} and isinstance(err, dict) \
        and set(err) == {"message", "type", "param", "code"} \
        and isinstance(err["message"], str) and err["message"] \
        and isinstance(err["type"], str) and err["type"] \
        and (err["param"] is None or isinstance(err["param"], str)) \
        and (err["code"] is None or isinstance(err["code"], (str, int))), \
        f"error body is not OpenAI's error object: {body!r:.300}"


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, openai_error_shape]


# -- findings ---------------------------------------------------------------------------------

@dataclass
class Finding:
    operation: str
    check: str
    status: int | None
    message: str
    request: str
    response: str
    count: int = 1

    def render(self) -> str:
        return (f"[{self.operation}] {self.check} (status {self.status}, seen {self.count}x)\n"
                f"  {self.message.strip()[:600]}\n"
                f"  request:  {self.request}\n  response: {self.response}\n")


class Findings:
    def __init__(self, secrets: dict[str, str]) -> None:
        self.by_key: dict[tuple[str, str, int | None], Finding] = {}
        self.secrets = secrets  # secret -> placeholder, for the report

    def add(self, operation: str, check: str, status: int | None, message: str,
            request: httpx.Request | None, response: httpx.Response | None) -> None:
        key = (operation, check, status)
        if key in self.by_key:
            self.by_key[key].count += 1
            return
        self.by_key[key] = Finding(operation, check, status, self._redact(message),
                                   self._redact(_show_request(request)),
                                   self._redact(_show_response(response)))

    def _redact(self, text: str) -> str:
        for secret, placeholder in self.secrets.items():
            text = text.replace(secret, placeholder)
        return text

    def report(self) -> str:
        return "\n".join(f.render() for f in self.by_key.values())


def _show_request(request: httpx.Request | None) -> str:
    if request is None:
        return "-"
    headers = {k: v for k, v in request.headers.items()
               if k.lower() in AUTH_HEADERS or k.lower() == "content-type"}
    body = request.content[:400]
    return f"{request.method} {request.url.raw_path.decode('latin-1')} headers={headers} " \
           f"body={body!r}{'...' if len(request.content) > 400 else ''}"


def _show_response(response: httpx.Response | None) -> str:
    if response is None:
        return "-"
    return f"{response.status_code} {response.headers.get('content-type')} " \
           f"{response.content[:400]!r}"


# -- the run ----------------------------------------------------------------------------------

def _to_httpx(client: httpx.AsyncClient, kwargs: dict[str, Any]) -> httpx.Request:
    """schemathesis serializes a case for `requests`; let requests encode the body (JSON, form,
    multipart) and send those exact bytes with httpx."""
    accepted = ("method", "url", "headers", "files", "data", "params", "cookies", "json")
    prepared = requests.Request(**{k: v for k, v in kwargs.items() if k in accepted}).prepare()
    body = prepared.body
    content = body.encode() if isinstance(body, str) else body
    assert prepared.method is not None and prepared.url is not None
    return client.build_request(prepared.method, prepared.url, headers=dict(prepared.headers),
                                content=content)


async def test_api_fuzz(gw: Gw, make_adapter: Callable[..., Path]) -> None:
    loop = asyncio.get_running_loop()
    world = World(gw, make_adapter)
    await world.refresh()
    raw = (await gw.client.get("/openapi.json")).json()
    schema = schemathesis.openapi.from_dict(raw)
    operations = [schema[path][method] for path in schema for method in schema[path]
                  if ONLY in schema[path][method].label]
    assert operations, "the schema lists no operation"

    def on_loop(work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, loop).result(REQUEST_TIMEOUT_S)

    findings = Findings({gw.admin_headers["Authorization"].removeprefix("Bearer "): "<admin token>"})
    stats: dict[str, collections.Counter[str]] = {}
    started = time.monotonic()
    stop = started + BUDGET_S

    def fuzz(index: int, operation: Any) -> None:
        label = operation.label
        counter = stats.setdefault(label, collections.Counter())
        now = time.monotonic()
        deadline = now + max(stop - now, 0.0) / (len(operations) - index)
        examples = 0
        on_loop(world.refresh())
        for tenant, key in world.keys.items():
            findings.secrets[key] = f"<{tenant} key>"
        known = world.known()
        known_fields = {"model": known["model"], "training_file": known.get("file_id", []),
                        "validation_file": known.get("file_id", [])}
        known_fields = {name: values for name, values in known_fields.items() if values}
        variants = world.auth_variants(operation.path)
        strategy = (operation.as_strategy(GenerationMode.POSITIVE)
                    | operation.as_strategy(GenerationMode.NEGATIVE))

        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
                  print_blob=False)
        @given(case=strategy, data=st.data())
        def run(case: Case, data: st.DataObject) -> None:
            nonlocal examples
            now = time.monotonic()
            if now > stop or (now > deadline and examples >= MIN_EXAMPLES):
                counter["skipped (time budget)"] += 1
                return
            examples += 1
            for name in list(case.path_parameters or {}):
                if name in known and data.draw(st.booleans(), label=f"known {name}"):
                    case.path_parameters[name] = data.draw(st.sampled_from(known[name]))
            if isinstance(case.body, dict):  # JSON bodies naming a model or a file
                for name in list(case.body):
                    if name in known_fields and data.draw(st.booleans(), label=f"known {name}"):
                        case.body[name] = data.draw(st.sampled_from(known_fields[name]))
            generated = {k: v for k, v in (case.headers or {}).items()
                         if k.lower() not in AUTH_HEADERS}
            for who, credentials in variants:
                case.headers = {**generated, **credentials}
                request = response = None
                try:
                    request = _to_httpx(gw.client, case.as_transport_kwargs(base_url=HOST))
                    response = on_loop(gw.client.send(request))
                    counter[f"{who}: {response.status_code}"] += 1
                    case.validate_response(response, checks=CHECKS,
                                           headers=dict(request.headers))
                except FailureGroup as group:
                    for failure in group.exceptions:
                        findings.add(label, failure.title, response.status_code if response
                                     else None, f"as {who}: {failure.message}", request,
                                     response)
                except Exception as exc:  # noqa: BLE001 - a hang or a broken request is a finding
                    findings.add(label, type(exc).__name__, None,
                                 f"as {who}: {exc!r:.500}", request, response)

        try:
            run()
        except Exception as exc:  # noqa: BLE001 - cannot generate: report, go on with the rest
            findings.add(label, "generation", None, f"{exc!r:.600}", None, None)

    def fuzz_all() -> None:
        for index, operation in enumerate(operations):
            fuzz(index, operation)

    await asyncio.to_thread(fuzz_all)
    elapsed = time.monotonic() - started
    summary = "\n".join(f"{label}: {dict(sorted(c.items()))}" for label, c in stats.items())
    report = (f"{len(operations)} operations, {elapsed:.0f} s, "
              f"{sum(sum(c.values()) for c in stats.values())} requests\n\n{summary}\n\n"
              f"{len(findings.by_key)} distinct failures\n\n{findings.report()}")
    if path := os.environ.get("FUZZ_REPORT"):
        Path(path).write_text(report)
    print(report)
    assert not findings.by_key, report
