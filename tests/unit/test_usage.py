"""Usage metering: the in-memory meter, the daily usage store (SQLite and a real PostgreSQL)
and the admin usage API (JSON and CSV) through the real gateway."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator, Sequence
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from adapters.errors import InvalidInput, NotFound
from adapters.registry import Registry
from adapters.registry.usage import UsageRow, UsageStore, UsageTotal
from server.quotas.usage import UsageMeter
from tests.unit.conftest import Gw

UTC = timezone.utc
DAY = date(2026, 11, 29)


class Clock:
    """A settable clock for the meter."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class FakeStore:
    """Records what is added; `fail` makes the next adds raise; `gate` holds an add until
    it is set (a write in flight)."""

    def __init__(self) -> None:
        self.added: list[list[UsageRow]] = []
        self.fail = 0
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def add(self, rows: Sequence[UsageRow]) -> None:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            self.fail -= 1
            raise ConnectionError("database is down")
        self.added.append(list(rows))

    def totals(self) -> dict[tuple[date, str, str, str], tuple[int, int, int, int]]:
        out: dict[tuple[date, str, str, str], list[int]] = {}
        for batch in self.added:
            for r in batch:
                c = out.setdefault((r.day, r.tenant_id, r.adapter, r.key_id), [0, 0, 0, 0])
                for i, v in enumerate((r.requests, r.prompt_tokens, r.completion_tokens,
                                       r.errors)):
                    c[i] += v
        return {k: (v[0], v[1], v[2], v[3]) for k, v in out.items()}


def meter_on(store: FakeStore, clock: Clock | None = None, **kwargs: Any) -> UsageMeter:
    return UsageMeter(store, clock or Clock(datetime(2026, 11, 29, 12, tzinfo=UTC)),  # type: ignore[arg-type]
                      **kwargs)


# -- the meter ---------------------------------------------------------------------------------

async def test_counts_split_by_utc_day_at_midnight():
    store = FakeStore()
    clock = Clock(datetime(2026, 11, 29, 23, 59, 59, 999999, tzinfo=UTC))
    meter = meter_on(store, clock)
    meter.record("acme", "sql", "k1", 10, 5, False)
    clock.now = datetime(2026, 11, 30, 0, 0, 0, tzinfo=UTC)
    meter.record("acme", "sql", "k1", 7, 3, True)
    # 01:30 in UTC+2 is 23:30 UTC of the day before: the UTC day counts, not the local one.
    clock.now = datetime(2026, 11, 30, 1, 30, tzinfo=timezone(timedelta(hours=2)))
    meter.record("acme", None, None, 1, 1, False)
    assert meter.pending == 3
    assert store.added == []  # record never writes
    assert await meter.flush() is True
    assert store.totals() == {
        (date(2026, 11, 29), "acme", "sql", "k1"): (1, 10, 5, 0),
        (date(2026, 11, 30), "acme", "sql", "k1"): (1, 7, 3, 1),
        (date(2026, 11, 29), "acme", "", ""): (1, 1, 1, 0),
    }
    assert meter.pending == 0


async def test_same_key_adds_up_in_memory():
    store = FakeStore()
    meter = meter_on(store)
    for i in range(100):
        meter.record("acme", "sql", "k1", i, 1, i % 10 == 0)
    await meter.flush()
    assert len(store.added) == 1 and len(store.added[0]) == 1
    assert store.totals() == {(DAY, "acme", "sql", "k1"): (100, sum(range(100)), 100, 10)}


async def test_a_failed_flush_keeps_the_counts_and_the_next_one_writes_them():
    store = FakeStore()
    meter = meter_on(store)
    meter.record("acme", "sql", "k1", 10, 5, False)
    meter.record("acme", None, "k1", 3, 1, False)
    store.fail = 1
    store.gate = asyncio.Event()
    flushing = asyncio.create_task(meter.flush())
    await store.entered.wait()
    # Recorded while the failing write is in flight: merged with what comes back.
    meter.record("acme", "sql", "k1", 1, 1, True)
    meter.record("beta", "chat", "k2", 2, 2, False)
    store.gate.set()
    assert await flushing is False
    assert store.added == [] and meter.failed_flushes == 1
    assert meter.pending == 3
    store.gate = None
    assert await meter.flush() is True
    assert store.totals() == {
        (DAY, "acme", "sql", "k1"): (2, 11, 6, 1),
        (DAY, "acme", "", "k1"): (1, 3, 1, 0),
        (DAY, "beta", "chat", "k2"): (1, 2, 2, 0),
    }
    assert meter.pending == 0
    assert await meter.flush() is True and len(store.added) == 1  # nothing left to write


async def test_many_failed_flushes_lose_nothing():
    store = FakeStore()
    meter = meter_on(store)
    store.fail = 5
    for _ in range(5):
        meter.record("acme", "sql", "k1", 2, 3, False)
        assert await meter.flush() is False
    meter.record("acme", "sql", "k1", 2, 3, False)
    assert await meter.flush() is True
    assert store.totals() == {(DAY, "acme", "sql", "k1"): (6, 12, 18, 0)}


async def test_past_the_cap_usage_is_dropped_and_counted():
    store = FakeStore()
    meter = meter_on(store, max_entries=2)
    meter.record("acme", "a", "k", 1, 1, False)
    meter.record("acme", "b", "k", 1, 1, False)
    meter.record("acme", "c", "k", 1, 1, False)  # a third key: dropped
    meter.record("acme", "a", "k", 1, 1, False)  # a key already held still counts
    assert meter.dropped_requests == 1 and meter.pending == 2
    store.fail = 1
    store.gate = asyncio.Event()
    flushing = asyncio.create_task(meter.flush())
    await store.entered.wait()
    meter.record("acme", "d", "k", 1, 1, False)  # while the failing write is in flight
    meter.record("acme", "d", "k", 1, 1, False)
    store.gate.set()
    assert await flushing is False
    # The batch that came back (a: 2, b: 1) meets d: one more key fits, a; b is dropped.
    assert meter.dropped_requests == 2 and meter.pending == 2
    store.gate = None
    assert await meter.flush() is True
    assert store.totals() == {(DAY, "acme", "a", "k"): (2, 2, 2, 0),
                              (DAY, "acme", "d", "k"): (2, 2, 2, 0)}
    assert 4 + meter.dropped_requests == 6  # every record is either written or counted


async def test_close_flushes():
    store = FakeStore()
    meter = meter_on(store)
    meter.record("acme", "sql", None, 4, 4, False)
    await meter.close()
    assert store.totals() == {(DAY, "acme", "sql", ""): (1, 4, 4, 0)}


async def test_close_logs_what_it_cannot_write(caplog: pytest.LogCaptureFixture):
    store = FakeStore()
    store.fail = 1
    meter = meter_on(store)
    meter.record("acme", "sql", None, 4, 4, False)
    await meter.close()
    assert "usage of 1 requests" in caplog.text and "lost" in caplog.text


async def test_run_flushes_every_interval_and_a_cancel_lets_a_write_finish():
    store = FakeStore()
    meter = meter_on(store)
    meter.record("acme", "sql", "k1", 1, 1, False)
    loop = asyncio.create_task(meter.run(0.01))
    while not store.added:
        await asyncio.sleep(0.005)
    assert store.totals() == {(DAY, "acme", "sql", "k1"): (1, 1, 1, 0)}
    # Cancel the loop while its write is in flight: the write finishes, nothing doubles.
    store.gate = asyncio.Event()
    store.entered.clear()
    meter.record("acme", "sql", "k1", 1, 1, False)
    await store.entered.wait()
    loop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loop
    meter.record("acme", "sql", "k1", 1, 1, False)  # after the loop: close writes it
    closing = asyncio.create_task(meter.close())
    await asyncio.sleep(0.01)
    assert not closing.done()  # waits for the write in flight
    store.gate.set()
    await closing
    assert store.totals() == {(DAY, "acme", "sql", "k1"): (3, 3, 3, 0)}
    assert meter.pending == 0


# -- the store: SQLite and PostgreSQL ----------------------------------------------------------

@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        return str(request.getfixturevalue("pg_url"))
    return f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}"


@pytest.fixture
async def registry(db_url: str) -> AsyncIterator[Registry]:
    reg = Registry(db_url)
    await reg.create_schema()
    for tenant in ("acme", "beta"):
        await reg.create_tenant(tenant)
    yield reg
    await reg.close()


def row(day: date, tenant: str, adapter: str, key: str, requests: int, prompt: int,
        completion: int, errors: int = 0) -> UsageRow:
    return UsageRow(day, tenant, adapter, key, requests, prompt, completion, errors)


D1, D2, D3 = date(2026, 11, 1), date(2026, 11, 2), date(2026, 11, 3)
ROWS = [
    row(D1, "acme", "", "k1", 1, 10, 1),
    row(D1, "acme", "sql", "k1", 2, 20, 2, 1),
    row(D1, "acme", "sql", "k2", 3, 30, 3),
    row(D2, "acme", "sql", "k1", 4, 40, 4),
    row(D2, "acme", "", "k2", 5, 50, 5, 2),
    row(D3, "acme", "sql", "k1", 6, 60, 6),
    row(D1, "beta", "chat", "k9", 7, 70, 7),
    row(D3, "beta", "", "", 8, 80, 8),
]


def counts(t: UsageTotal) -> tuple[int, int, int, int]:
    return t.requests, t.prompt_tokens, t.completion_tokens, t.errors


async def test_add_sums_into_existing_rows(registry: Registry):
    store = UsageStore(registry)
    await store.add(ROWS)
    await store.add([row(D1, "acme", "sql", "k1", 1, 1, 1, 1),
                     row(D1, "acme", "sql", "k1", 1, 1, 1, 0)])  # the same key twice: summed
    totals = await store.query("acme", D1, D1, ["adapter", "key"])
    [total] = [t for t in totals if (t.adapter, t.key_id) == ("sql", "k1")]
    assert counts(total) == (4, 22, 4, 2)
    await store.add([])  # nothing to add: no error


async def test_concurrent_flushes_from_many_gateways_add_up_exactly(db_url: str,
                                                                    registry: Registry):
    # 4 gateways (their own engines and pools) on one database, 20 meters flushing at once,
    # all onto the same few rows (and a few of their own), each counted exactly once.
    gateways = [Registry(db_url) for _ in range(4)]
    try:
        meters = [UsageMeter(UsageStore(gateways[i % 4]),
                             Clock(datetime(2026, 11, 1, 12, tzinfo=UTC))) for i in range(20)]
        for i, meter in enumerate(meters):
            for _ in range(i + 1):
                meter.record("acme", "sql", "k1", 3, 2, False)
                meter.record("acme", None, None, 1, 1, True)
            meter.record("beta", f"own-{i}", "k9", i, 0, False)
        results = await asyncio.gather(*(m.flush() for m in meters))
        assert results == [True] * 20
        # A second round on rows that now exist: the update path, concurrently too.
        for meter in meters:
            meter.record("acme", "sql", "k1", 3, 2, False)
        assert await asyncio.gather(*(m.flush() for m in meters)) == [True] * 20
    finally:
        for reg in gateways:
            await reg.close()
    store = UsageStore(registry)
    n = sum(range(1, 21))  # 210
    by_adapter = {t.adapter: counts(t) for t in await store.query("acme", D1, D1, ["adapter"])}
    assert by_adapter == {"sql": (n + 20, 3 * (n + 20), 2 * (n + 20), 0), "": (n, n, n, n)}
    beta = await store.query("beta", D1, D1, ["adapter"])
    assert len(beta) == 20 and sum(t.prompt_tokens for t in beta) == sum(range(20))


async def test_query_groups_and_the_end_is_included(registry: Registry):
    store = UsageStore(registry)
    await store.add(ROWS)
    by_day = await store.query("acme", D1, D2, ["day"])
    assert [(t.day, counts(t)) for t in by_day] == [(D1, (6, 60, 6, 1)), (D2, (9, 90, 9, 2))]
    assert all(t.tenant_id == "acme" and t.adapter is None and t.key_id is None for t in by_day)
    # adapter then day, ordered that way; "" is the base model.
    grouped = await store.query("acme", D1, D3, ["adapter", "day"])
    assert [(t.adapter, t.day, t.requests) for t in grouped] == [
        ("", D1, 1), ("", D2, 5), ("sql", D1, 5), ("sql", D2, 4), ("sql", D3, 6)]
    by_key = await store.query("acme", D1, D3, ["key"])
    assert [(t.key_id, counts(t)) for t in by_key] == [("k1", (13, 130, 13, 1)),
                                                        ("k2", (8, 80, 8, 2))]
    [total] = await store.query("acme", D1, D3, [])
    assert counts(total) == (21, 210, 21, 3) and total.day is None and total.adapter is None
    [one_day] = await store.query("acme", D3, D3, ["day"])
    assert (one_day.day, one_day.requests) == (D3, 6)
    assert await store.query("acme", date(2026, 10, 1), date(2026, 10, 31), []) == []
    assert await store.query("acme", date(2026, 10, 1), date(2026, 10, 31), ["day"]) == []


async def test_query_across_tenants(registry: Registry):
    store = UsageStore(registry)
    await store.add(ROWS)
    by_tenant = await store.query_all(D1, D3, ["tenant"])
    assert [(t.tenant_id, counts(t)) for t in by_tenant] == [("acme", (21, 210, 21, 3)),
                                                             ("beta", (15, 150, 15, 0))]
    by_day_tenant = await store.query_all(D1, D3, ["day", "tenant"])
    assert [(t.day, t.tenant_id, t.requests) for t in by_day_tenant] == [
        (D1, "acme", 6), (D1, "beta", 7), (D2, "acme", 9), (D3, "acme", 6), (D3, "beta", 8)]
    [everything] = await store.query_all(D1, D3, [])
    assert counts(everything) == (36, 360, 36, 3) and everything.tenant_id is None


async def test_unknown_tenant_is_not_found_but_a_deleted_tenants_bill_stays(registry: Registry):
    store = UsageStore(registry)
    await store.add(ROWS)
    with pytest.raises(NotFound) as err:
        await store.query("nobody", D1, D3, ["day"])
    assert err.value.code == "tenant_not_found"
    await registry.delete_tenant("beta")
    beta = await store.query("beta", D1, D3, [])
    assert [counts(t) for t in beta] == [(15, 150, 15, 0)]
    # A tenant that exists and used nothing: an empty list, not a 404.
    await registry.create_tenant("idle")
    assert await store.query("idle", D1, D3, ["day"]) == []


async def test_store_refuses_an_unknown_grouping(registry: Registry):
    store = UsageStore(registry)
    with pytest.raises(InvalidInput):
        await store.query("acme", D1, D3, ["tenant"])  # one tenant's query has one tenant
    with pytest.raises(InvalidInput):
        await store.query_all(D1, D3, ["model"])


async def test_a_large_flush_is_one_transaction_in_chunks(registry: Registry):
    store = UsageStore(registry)
    rows = [row(D1, "acme", f"a{i}", "k", 1, i, 0) for i in range(1234)]
    await store.add(rows)
    [total] = await store.query("acme", D1, D1, [])
    assert counts(total) == (1234, sum(range(1234)), 0, 0)
    # One bad row (too long for PostgreSQL's column; SQLite does not check) fails the lot
    # there: all or nothing, so a retry cannot count the rest twice.
    if registry.engine.dialect.name == "postgresql":
        with pytest.raises(Exception):  # noqa: B017 - the driver's own error type
            await store.add([row(D2, "acme", "ok", "k", 1, 1, 1),
                             row(D2, "acme", "x" * 65, "k", 1, 1, 1)])
        assert await store.query("acme", D2, D2, []) == []


# -- the API -----------------------------------------------------------------------------------

FIELDS = {"tenant", "adapter", "day", "key_id", "requests", "prompt_tokens",
          "completion_tokens", "total_tokens", "errors"}


@pytest.fixture
async def ugw(gw: Gw) -> Gw:
    """The gateway, with its usage store and meter (made here while Services has none)."""
    services: Any = gw.services
    if not hasattr(services, "usage_store"):
        services.usage_store = UsageStore(services.registry)
    if not hasattr(services, "usage"):
        services.usage = UsageMeter(services.usage_store)
    await gw.new_tenant("acme")
    await gw.new_tenant("beta")
    return gw


def today() -> date:
    return datetime.now(UTC).date()


async def test_default_json_is_the_last_30_days_by_day(ugw: Gw):
    t = today()
    store: UsageStore = ugw.services.usage_store  # type: ignore[attr-defined]
    await store.add([row(t, "acme", "", "k1", 2, 20, 10),
                     row(t, "acme", "sql", "k1", 1, 5, 5, 1),
                     row(t - timedelta(days=29), "acme", "sql", "k2", 1, 1, 1),
                     row(t - timedelta(days=30), "acme", "sql", "k2", 100, 100, 100)])
    resp = await ugw.admin("GET", "/admin/tenants/acme/usage")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert body["object"] == "list" and body["group_by"] == ["day"]
    assert body["end"] == t.isoformat() and body["start"] == (t - timedelta(days=29)).isoformat()
    assert all(set(e) == FIELDS for e in body["data"])
    assert [(e["day"], e["requests"], e["total_tokens"], e["errors"]) for e in body["data"]] == [
        ((t - timedelta(days=29)).isoformat(), 1, 2, 0), (t.isoformat(), 3, 40, 1)]
    assert all(e["tenant"] == "acme" and e["adapter"] is None and e["key_id"] is None
               for e in body["data"])


async def test_metered_requests_show_up_after_a_flush(ugw: Gw):
    meter: UsageMeter = ugw.services.usage  # type: ignore[attr-defined]
    meter.record("acme", "sql", "k1", 12, 8, False)
    meter.record("acme", None, "k1", 3, 0, True)
    meter.record("beta", None, None, 1, 1, False)
    assert await meter.flush() is True
    resp = await ugw.admin("GET", "/admin/tenants/acme/usage", params={"group_by": "adapter,key"})
    assert resp.status_code == 200, resp.text
    assert [(e["adapter"], e["key_id"], e["requests"], e["prompt_tokens"],
             e["completion_tokens"], e["errors"]) for e in resp.json()["data"]] == [
        (None, "k1", 1, 3, 0, 1), ("sql", "k1", 1, 12, 8, 0)]


async def test_group_by_adapter_and_day_with_null_for_the_base_model(ugw: Gw):
    store: UsageStore = ugw.services.usage_store  # type: ignore[attr-defined]
    await store.add(ROWS)
    resp = await ugw.admin("GET", "/admin/tenants/acme/usage", params={
        "start": "2026-11-01", "end": "2026-11-02", "group_by": "adapter,day"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["start"] == "2026-11-01" and body["end"] == "2026-11-02"
    assert body["group_by"] == ["adapter", "day"]
    assert [(e["adapter"], e["day"], e["requests"], e["prompt_tokens"], e["completion_tokens"],
             e["total_tokens"], e["errors"], e["key_id"]) for e in body["data"]] == [
        (None, "2026-11-01", 1, 10, 1, 11, 0, None),
        (None, "2026-11-02", 5, 50, 5, 55, 2, None),
        ("sql", "2026-11-01", 5, 50, 5, 55, 1, None),
        ("sql", "2026-11-02", 4, 40, 4, 44, 0, None)]
    # No grouping: one total over the range, every grouping field null.
    resp = await ugw.admin("GET", "/admin/tenants/acme/usage", params={
        "start": "2026-11-01", "end": "2026-11-03", "group_by": ""})
    [total] = resp.json()["data"]
    assert (total["requests"], total["total_tokens"], total["errors"]) == (21, 231, 3)
    assert total["day"] is None and total["adapter"] is None and total["tenant"] == "acme"


async def test_csv_export_parses_back_to_the_same_numbers(ugw: Gw):
    store: UsageStore = ugw.services.usage_store  # type: ignore[attr-defined]
    await store.add(ROWS)
    params = {"start": "2026-11-01", "end": "2026-11-03", "group_by": "day,adapter,key"}
    as_json = (await ugw.admin("GET", "/admin/tenants/acme/usage", params=params)).json()
    resp = await ugw.admin("GET", "/admin/tenants/acme/usage", params={**params, "format": "csv"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "text/csv; charset=utf-8"
    assert resp.headers["content-disposition"] == \
        'attachment; filename="usage-acme-2026-11-01-2026-11-03.csv"'
    reader = csv.DictReader(io.StringIO(resp.text))
    assert reader.fieldnames == ["tenant", "adapter", "day", "key_id", "requests",
                                 "prompt_tokens", "completion_tokens", "total_tokens", "errors"]
    parsed = [{k: (int(v) if k in ("requests", "prompt_tokens", "completion_tokens",
                                   "total_tokens", "errors") else (v or None))
               for k, v in r.items()} for r in reader]
    assert parsed == as_json["data"] and len(parsed) == 6
    assert sum(r["requests"] for r in parsed) == 21


async def test_usage_across_tenants(ugw: Gw):
    store: UsageStore = ugw.services.usage_store  # type: ignore[attr-defined]
    await store.add(ROWS)
    resp = await ugw.admin("GET", "/admin/usage", params={
        "start": "2026-11-01", "end": "2026-11-30", "group_by": "tenant"})
    assert resp.status_code == 200, resp.text
    assert [(e["tenant"], e["requests"], e["total_tokens"]) for e in resp.json()["data"]] == [
        ("acme", 21, 231), ("beta", 15, 165)]
    resp = await ugw.admin("GET", "/admin/usage", params={
        "start": "2026-11-01", "end": "2026-11-30"})
    assert resp.json()["group_by"] == ["tenant", "day"] and len(resp.json()["data"]) == 5
    resp = await ugw.admin("GET", "/admin/usage", params={
        "start": "2026-11-01", "end": "2026-11-30", "group_by": "", "format": "csv"})
    assert resp.headers["content-disposition"] == \
        'attachment; filename="usage-2026-11-01-2026-11-30.csv"'
    [total] = list(csv.DictReader(io.StringIO(resp.text)))
    assert total["tenant"] == "" and int(total["requests"]) == 36


@pytest.mark.parametrize(("path", "params", "param", "code"), [
    ("/admin/tenants/acme/usage", {"start": "yesterday"}, "start", "invalid_value"),
    ("/admin/tenants/acme/usage", {"end": "2026-13-01"}, "end", "invalid_value"),
    ("/admin/tenants/acme/usage", {"end": "2026-02-30"}, "end", "invalid_value"),
    ("/admin/tenants/acme/usage", {"start": "20261101"}, "start", "invalid_value"),
    ("/admin/tenants/acme/usage", {"start": ""}, "start", "invalid_value"),
    ("/admin/tenants/acme/usage", {"start": "2026-11-02", "end": "2026-11-01"}, "end",
     "invalid_range"),
    ("/admin/tenants/acme/usage", {"start": "2025-01-01", "end": "2026-01-02"}, "start",
     "invalid_range"),  # 367 days
    ("/admin/tenants/acme/usage", {"group_by": "tenant"}, "group_by", "invalid_value"),
    ("/admin/tenants/acme/usage", {"group_by": "day,model"}, "group_by", "invalid_value"),
    ("/admin/tenants/acme/usage", {"format": "xml"}, "format", "invalid_value"),
    ("/admin/usage", {"group_by": "tenant,bogus"}, "group_by", "invalid_value"),
    ("/admin/usage", {"end": "0001-01-01", "start": "9999-12-31"}, "end", "invalid_range"),
    ("/admin/usage", {"format": ""}, "format", "invalid_value"),
])
async def test_bad_input_is_a_400_in_openais_shape(ugw: Gw, path: str, params: dict[str, str],
                                                   param: str, code: str):
    resp = await ugw.admin("GET", path, params=params)
    err = ugw.expect_error(resp, 400, code=code)
    assert err["param"] == param and err["type"] == "invalid_request_error"


async def test_edges_of_the_range_are_accepted(ugw: Gw):
    # A whole leap year is 366 days: allowed. The earliest date: the default start clamps.
    resp = await ugw.admin("GET", "/admin/tenants/acme/usage",
                           params={"start": "2024-01-01", "end": "2024-12-31"})
    assert resp.status_code == 200, resp.text
    resp = await ugw.admin("GET", "/admin/tenants/acme/usage", params={"end": "0001-01-05"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["start"] == "0001-01-01"


async def test_unknown_tenant_is_a_404(ugw: Gw):
    resp = await ugw.admin("GET", "/admin/tenants/nobody/usage")
    ugw.expect_error(resp, 404, code="tenant_not_found")
    resp = await ugw.admin("GET", "/admin/tenants/nobody/usage", params={"format": "csv"})
    ugw.expect_error(resp, 404, code="tenant_not_found")


async def test_usage_needs_the_admin_token(ugw: Gw):
    for path in ("/admin/tenants/acme/usage", "/admin/usage"):
        resp = await ugw.client.get(path)
        ugw.expect_error(resp, 401)
        resp = await ugw.client.get(path, headers={"Authorization": "Bearer wrong"})
        assert resp.status_code in (401, 403)
        ugw.expect_error(resp, resp.status_code)


async def test_the_csv_answer_is_documented(ugw: Gw):
    schema = (await ugw.client.get("/openapi.json")).json()
    for path in ("/admin/tenants/{tenant}/usage", "/admin/usage"):
        ok = schema["paths"][path]["get"]["responses"]["200"]["content"]
        assert set(ok) == {"application/json", "text/csv"}
        assert ok["application/json"]["schema"] == {"$ref": "#/components/schemas/UsageList"}
        params = {p["name"] for p in schema["paths"][path]["get"]["parameters"]}
        assert {"start", "end", "group_by", "format"} <= params
