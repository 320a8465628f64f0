"""A real Envoy with the rendered configuration in front of stand-in units (no vLLM):
affinity, bounded load, retries (only of work never started), health checks, ejection,
unbuffered streaming, the unit header. See stand_ins.py for the units and the front."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.cluster.envoy import MODEL_HEADER, RETRYABLE_HEADER, UNIT_HEADER, EnvoyTuning
from tests.envoy.stand_ins import EnvoyFront, StandInUnit, wait_for

TENANT = "acme"
# Health checks every 0.5 s (the shipped 1 s, halved to keep the tests short).
FAST = EnvoyTuning(health_interval_s=0.5, health_timeout_s=0.5)
# Health checks that do not come again during a test: what a unit does between checks.
NO_RECHECK = EnvoyTuning(health_interval_s=60, health_timeout_s=1)


@pytest.fixture
def units() -> Iterator[list[StandInUnit]]:
    started = [StandInUnit().start() for _ in range(2)]
    yield started
    for unit in started:
        unit.stop()


@pytest.fixture
def start_front(units: list[StandInUnit], tmp_path: Path) -> Iterator[Callable[..., EnvoyFront]]:
    fronts: list[EnvoyFront] = []

    def start(tuning: EnvoyTuning = FAST, only: list[StandInUnit] | None = None) -> EnvoyFront:
        members = only or units
        folder = tmp_path / f"envoy-{len(fronts)}"
        folder.mkdir()
        front = EnvoyFront([u.address for u in members], folder, tuning)
        fronts.append(front)
        front.start().wait_routable({u.address for u in members})
        return front

    yield start
    for front in fronts:
        front.stop()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as c:
        yield c


def chat(client: httpx.Client, front: EnvoyFront, model: str, tenant: str | None = TENANT,
         **extra: Any) -> httpx.Response:
    headers = {"X-Tenant-ID": tenant} if tenant else {}
    body = {"messages": [{"role": "user", "content": "Hi"}], "model": model, **extra}
    return client.post(f"{front.url}/v1/chat/completions", json=body, headers=headers)


def unit_of(resp: httpx.Response) -> str:
    return resp.headers[UNIT_HEADER]


def model_on(client: httpx.Client, front: EnvoyFront, unit: StandInUnit,
             units: list[StandInUnit]) -> str:
    """A model whose (TENANT, model) hashes to `unit`; the units' records are cleared after."""
    for i in range(64):
        model = f"adapter-{i}"
        if unit_of(chat(client, front, model)) == unit.address:
            for u in units:
                u.seen.clear()
            return model
    raise AssertionError("no model hashes to that unit")


@contextlib.contextmanager
def held_stream(client: httpx.Client, front: EnvoyFront, model: str
                ) -> Iterator[tuple[httpx.Response, Iterator[bytes]]]:
    """A stream whose first event has arrived; the unit holds the rest (unit.hold)."""
    body = {"messages": [], "model": model, "stream": True}
    with client.stream("POST", f"{front.url}/v1/chat/completions", json=body,
                       headers={"X-Tenant-ID": TENANT}) as resp:
        chunks = resp.iter_raw()
        first = next(chunks)
        assert first.startswith(b'data: {"n": 1}'), first
        yield resp, chunks


# -- affinity -------------------------------------------------------------------------------------

def test_same_tenant_and_model_stay_on_one_unit_and_models_spread(units, start_front, client):
    front = start_front()
    served: dict[str, set[str]] = {}
    for _round in range(4):
        for i in range(16):
            resp = chat(client, front, f"bot-{i}")
            assert resp.status_code == 200
            # X-Loraplex-Unit passes through, and names the unit that really served it.
            assert resp.json()["unit"] == unit_of(resp)
            served.setdefault(f"bot-{i}", set()).add(unit_of(resp))
    assert all(len(where) == 1 for where in served.values()), served
    assert {next(iter(w)) for w in served.values()} == {u.address for u in units}  # spread
    # Versions and aliases of one adapter hash alike; the unit got the body untouched.
    where = served["bot-3"]
    for model in ("bot-3@1", "bot-3@prod", "bot-3@17"):
        resp = chat(client, front, model)
        assert {unit_of(resp)} == where and resp.json()["model"] == model
    # Without a model (/v1/models), the tenant alone decides: always the same unit.
    models_units = {unit_of(client.get(f"{front.url}/v1/models",
                                       headers={"X-Tenant-ID": TENANT})) for _ in range(8)}
    assert len(models_units) == 1
    # One JSON access-log line per request, naming tenant, model key and unit.
    wait_for(lambda: any(r["path"] == "/v1/models" for r in front.access_log()), "access log")
    line = next(r for r in front.access_log() if r["model"] == "bot-3")
    assert line["tenant"] == TENANT and line["unit"] in where and line["status"] == 200


BODIES: list[tuple[str, bytes, str | None]] = [
    ("plain", b'{"model": "bot", "messages": []}', "bot"),
    ("model last, after messages", json.dumps(
        {"messages": [{"role": "user", "content": 'say "model": "evil"'}], "model": "bot"}
     ).encode(), "bot"),
    ("nested model keys first", json.dumps(
        {"metadata": {"model": "evil"}, "tools": [{"model": "evil2"}], "model": "bot"}
     ).encode(), "bot"),
    ("whitespace", b'{\n  "model"\t :\r\n "bot" ,"messages":[]}', "bot"),
    ("escapes", json.dumps({"model": 'b"o\\t/x'}).encode(), 'b"o\\t/x'),
    ("unicode escapes", b'{"model": "\\u0062ot\\u00e9"}', "bot\\u00e9"),
    ("control characters dropped", b'{"model": "bo\\u0001t\\n"}', "bot"),
    ("alias", b'{"model": "bot@prod"}', "bot"),
    ("not a string", b'{"model": 5, "messages": []}', None),
    ("no model", b'{"messages": [], "models": "x", "model_x": "y"}', None),
    ("an array", b'[{"model": "bot"}]', None),
    ("truncated JSON", b'{"messages": [{"content": "unclosed', None),
    ("empty model", b'{"model": ""}', None),
]


def test_the_model_is_read_from_the_body(units, start_front, client):
    unit = units[0]
    front = start_front(only=[unit])
    url = f"{front.url}/v1/chat/completions"
    for name, body, expected in BODIES:
        unit.seen.clear()
        resp = client.post(url, content=body, headers={"X-Tenant-ID": TENANT,
                                                       "Content-Type": "application/json"})
        assert resp.status_code == 200, name
        [seen] = unit.inference
        assert seen.model_header == expected, (name, seen.model_header)

    def model_header(method: str, path: str, **kwargs: Any) -> str | None:
        unit.seen.clear()
        resp = client.request(method, front.url + path, **kwargs)
        assert resp.status_code == 200, (path, resp.text)
        return unit.seen[-1].model_header

    spoof = {MODEL_HEADER: "spoofed"}
    body = {"model": "bot"}
    # /v1/completions too, with a query string; a client's own header is never trusted.
    assert model_header("POST", "/v1/completions?x=1", json=body,
                        headers={"X-Tenant-ID": TENANT, **spoof}) == "bot"
    assert model_header("GET", "/v1/models", headers={"X-Tenant-ID": TENANT, **spoof}) is None
    # No tenant: not read (the unit answers 401 anyway); a chunked body: not read.
    assert model_header("POST", "/v1/chat/completions", json=body, headers=spoof) is None
    assert model_header("POST", "/v1/chat/completions", content=iter([b'{"model": "bot"}']),
                        headers={"X-Tenant-ID": TENANT}) is None
    assert unit.seen[-1].body_model == "bot"  # the body itself reached the unit intact


def test_bodies_above_the_read_limit_pass_unread(units, start_front, client):
    unit = units[0]
    front = start_front(EnvoyTuning(health_interval_s=0.5, model_body_limit_bytes=1024),
                        only=[unit])
    resp = chat(client, front, "bot", padding="x" * 4096)
    assert resp.status_code == 200 and resp.json()["model"] == "bot"
    assert unit.inference[-1].model_header is None
    assert chat(client, front, "bot").status_code == 200
    assert unit.inference[-1].model_header == "bot"


# -- bounded load ---------------------------------------------------------------------------------

def bounded_load(requests: int, factor: int, units: int = 2) -> list[int]:
    """Where `requests` concurrent requests of one hash go (0: its unit, 1: the spill unit),
    by Envoy's bounded-load rule: a unit holding more than
    ceil(ceil((all active + 1) * factor / 100) / units) active requests is skipped."""
    active = [0] * units
    where = []
    for _ in range(requests):
        slots = max(math.ceil(math.ceil((sum(active) + 1) * factor / 100) / units), 1)
        pick = 0 if active[0] <= slots else 1
        active[pick] += 1
        where.append(pick)
    return where


def test_a_hot_adapter_spills_to_another_unit_under_load(units, start_front, client):
    front = start_front()
    a, b = units
    model = model_on(client, front, a, units)
    # With the shipped factor (150) and two units, a unit takes up to 75% of the load: the
    # 8th concurrent stream of one adapter spills, then every 4th or so.
    expected = bounded_load(12, FAST.hash_balance_factor)
    assert expected == [0] * 7 + [1] + [0] * 3 + [1]
    a.hold = b.hold = True
    with contextlib.ExitStack() as streams:
        where = [unit_of(streams.enter_context(held_stream(client, front, model))[0])
                 for _ in expected]
        assert front.stats()["upstream_rq_active"] == len(expected)
        assert where == [units[i].address for i in expected], where
        a.release.set()
        b.release.set()
    wait_for(lambda: front.stats()["upstream_rq_active"] == 0, "streams to end")
    a.hold = b.hold = False
    assert unit_of(chat(client, front, model)) == a.address  # back home once the load is gone


# -- retries: only what a unit refused before doing any work ------------------------------------

def test_a_retryable_503_is_retried_on_another_unit_others_never(units, start_front, client):
    front = start_front(NO_RECHECK)
    a, b = units
    model = model_on(client, front, b, units)

    b.mode = "retryable_503"  # the gateway's engine_unavailable refusal
    resp = chat(client, front, model)
    assert resp.status_code == 200 and unit_of(resp) == a.address
    assert (len(b.inference), len(a.inference)) == (1, 1)
    assert front.stats()["upstream_rq_retry"] == 1

    # A client cannot ask for more: Envoy ignores its x-envoy-* retry headers.
    asks = {"X-Tenant-ID": TENANT, "x-envoy-retry-on": "5xx,reset,retriable-4xx",
            "x-envoy-max-retries": "3"}
    for mode, status in [("plain_503", 503), ("429", 429), ("400", 400), ("404", 404),
                         ("502", 502)]:
        b.mode = mode
        a.seen.clear()
        b.seen.clear()
        resp = client.post(f"{front.url}/v1/chat/completions", headers=asks,
                           json={"messages": [], "model": model})
        assert resp.status_code == status and unit_of(resp) == b.address, mode
        assert resp.json()["error"]["code"] in (f"status_{mode}", "s3_unavailable")
        assert (len(b.inference), len(a.inference)) == (1, 0), mode
    assert front.stats()["upstream_rq_retry"] == 1  # no other retry

    # Every unit refusing: the client gets the refusal (with its Retry-After), never a hang.
    a.mode = b.mode = "retryable_503"
    a.seen.clear()
    b.seen.clear()
    resp = chat(client, front, model)
    assert resp.status_code == 503 and resp.headers["retry-after"] == "5"
    assert resp.headers[RETRYABLE_HEADER] == "1"
    assert len(a.inference) + len(b.inference) <= 3


def test_a_connect_failure_is_retried_on_another_unit(units, start_front, client):
    front = start_front(NO_RECHECK)  # no health check notices b's death during the test
    a, b = units
    model = model_on(client, front, b, units)
    b.stop()
    time.sleep(0.2)  # Envoy sees b's pooled connections closed
    before = front.stats()
    resp = chat(client, front, model)
    assert resp.status_code == 200 and unit_of(resp) == a.address
    after = front.stats()
    assert after["upstream_rq_retry"] == before["upstream_rq_retry"] + 1
    assert after["upstream_cx_connect_fail"] > before["upstream_cx_connect_fail"]

    a.stop()  # no unit left: Envoy's own answer, in OpenAI's error shape, after its retries
    time.sleep(0.2)
    resp = chat(client, front, model)
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
    error = resp.json()["error"]
    assert error["type"] == "service_unavailable_error" and error["param"] is None
    assert "upstream connect error" in error["message"]
    assert error["code"].startswith("upstream_reset_before_response_started")
    assert UNIT_HEADER not in resp.headers


def test_nothing_is_replayed_after_the_first_byte(units, start_front, client):
    front = start_front(NO_RECHECK)
    a, b = units
    model = model_on(client, front, b, units)
    b.mode = "die_mid_stream"
    body = {"messages": [], "model": model, "stream": True}
    got = b""
    with pytest.raises(httpx.HTTPError), client.stream(
            "POST", f"{front.url}/v1/chat/completions", json=body,
            headers={"X-Tenant-ID": TENANT}) as resp:
        assert resp.status_code == 200 and unit_of(resp) == b.address
        for chunk in resp.iter_raw():
            got += chunk
    assert got.startswith(b'data: {"n": 1}') and b"[DONE]" not in got  # the client sees the cut
    assert (len(b.inference), len(a.inference)) == (1, 0)
    assert front.stats()["upstream_rq_retry"] == 0


# -- streaming ------------------------------------------------------------------------------------

def test_streams_are_not_buffered(units, start_front, client):
    front = start_front()
    a, _b = units
    model = model_on(client, front, a, units)
    a.hold = True
    started = time.monotonic()
    with held_stream(client, front, model) as (resp, chunks):
        # The first event is at the client while the unit still holds the rest.
        assert not a.release.is_set() and time.monotonic() - started < 5
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert unit_of(resp) == a.address
        a.release.set()
        rest = b"".join(chunks)
    assert rest.endswith(b"data: [DONE]\n\n")


# -- health ---------------------------------------------------------------------------------------

def test_health_checks_take_a_unit_out_and_bring_it_back(units, start_front, client):
    front = start_front()
    a, b = units
    model = model_on(client, front, a, units)
    a.healthy = False
    front.wait_routable({b.address}, limit_s=5)
    assert unit_of(chat(client, front, model)) == b.address
    assert client.get(f"{front.url}/healthz").status_code == 200  # one unit is enough

    b.healthy = False
    front.wait_routable(set(), limit_s=5)
    resp = client.get(f"{front.url}/healthz")
    # No unit ready: 503 with Retry-After. Usually Envoy's own answer (no_healthy_upstream);
    # when every unit fails in the same health-check round, Envoy 1.40 sometimes still sends
    # to them (measured: 2 runs in 8), and the units' own refusal comes back.
    assert resp.status_code == 503 and int(resp.headers["retry-after"]) >= 1
    if UNIT_HEADER not in resp.headers:
        assert resp.json() == {"error": {"message": "no healthy upstream", "param": None,
                                         "type": "service_unavailable_error",
                                         "code": "no_healthy_upstream"}}
    else:
        assert resp.json()["error"]["code"] == "engine_unavailable"

    a.healthy = b.healthy = True
    front.wait_routable({a.address, b.address}, limit_s=5)
    # After a change of every unit at once, Envoy's routing follows its /clusters view about
    # one health-check interval later (measured: ~0.75 s at 0.5 s checks): until then, 503s.
    wait_for(lambda: chat(client, front, model).status_code == 200, "routing again", 5)
    assert unit_of(chat(client, front, model)) == a.address  # its adapters come home


def test_gateway_failures_eject_a_unit_429s_never(units, start_front, client):
    front = start_front(NO_RECHECK)  # a passing health check would end the ejection early
    a, b = units
    model = model_on(client, front, b, units)
    b.mode = "429"
    for _ in range(10):
        assert chat(client, front, model).status_code == 429
    b.mode = "400"
    for _ in range(5):
        assert chat(client, front, model).status_code == 400
    assert front.stats()["outlier_detection.ejections_enforced_total"] == 0
    assert front.routable() == {a.address, b.address}

    b.mode = "502"
    assert [chat(client, front, model).status_code for _ in range(2)] == [502, 502]
    b.mode = "plain_503"
    assert chat(client, front, model).status_code == 503  # the third in a row
    wait_for(lambda: front.routable() == {a.address}, "b ejected")
    stats = front.stats()
    assert stats["outlier_detection.ejections_enforced_consecutive_gateway_failure"] == 1
    resp = chat(client, front, model)
    assert resp.status_code == 200 and unit_of(resp) == a.address
