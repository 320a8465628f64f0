"""The registry as several serving units share it, on a real PostgreSQL server.

Each test gets a fresh database on the session's server (tests/pg_server.py). Units are
separate `Registry` / `JobStore` instances, each with its own engine and connection pool, so
the database, not Python, is what keeps them apart. The gateway tests run the real app on
PostgreSQL (`LORAPLEX_DATABASE_URL`) with the stand-in engine of tests/unit/conftest.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.engine import make_url

from adapters.registry import Registry, VersionSpec
from adapters.registry.models import FineTuneJob, JobEvent
from adapters.spec import AdapterSpec
from adapters.store import LocalStore
from adapters.training.jobs import JobStatus, JobStore
from server.settings import Settings
from tests.pg_server import PostgresServer
from tests.unit.conftest import ADMIN_TOKEN, FakeEngine, Gw, serve_gateway, wait_until
from tests.unit.test_fine_tuning_api import (
    JOBS,
    HeldTokenizer,
    dataset,
    event_messages,
    upload,
    wait_for_status,
)

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
UNITS = 8


def version_spec(i: int) -> VersionSpec:
    return VersionSpec(store_key=f"k{i}", source="test", meta={}, spec=AdapterSpec(
        rank=8, alpha=16.0, target_modules=["q_proj"], base_model=None, size_bytes=1,
        sha256=f"{i:064d}"))


@asynccontextmanager
async def units(url: str, n: int) -> AsyncIterator[list[Registry]]:
    """`n` registries on one database, as `n` serving units have."""
    registries = [Registry(url) for _ in range(n)]
    try:
        yield registries
    finally:
        for registry in registries:
            await registry.close()


@pytest.fixture
async def registry(pg_url: str) -> AsyncIterator[Registry]:
    reg = Registry(pg_url)
    await reg.create_schema()
    await reg.create_tenant("acme")
    yield reg
    await reg.close()


def set_database_timezone(postgres: PostgresServer, url: str, tz: str) -> None:
    """Every new session of that database runs in `tz` (nothing may depend on it)."""
    postgres.psql(f"ALTER DATABASE \"{make_url(url).database}\" SET timezone TO '{tz}'")


# -- concurrent writes from several units -----------------------------------------------------

async def test_units_registering_at_once_never_share_a_version_number(registry, pg_url):
    # The adapter does not exist yet: the first reservations also race to create it.
    start = asyncio.Event()

    async def register(unit: Registry, i: int) -> list[int]:
        await start.wait()
        taken = []
        for j in range(5):
            version, _ = await unit.reserve_version("acme", "support")
            await unit.add_version("acme", "support", version, version_spec(i * 100 + j))
            taken.append(version)
        return taken

    async with units(pg_url, UNITS) as regs:
        tasks = [asyncio.create_task(register(unit, i)) for i, unit in enumerate(regs)]
        await asyncio.sleep(0.05)
        start.set()
        results = await asyncio.gather(*tasks)
    numbers = sorted(n for taken in results for n in taken)
    assert numbers == list(range(1, UNITS * 5 + 1))  # each number once, none skipped
    adapter = await registry.get_adapter("acme", "support")
    assert [v.version for v in adapter.versions] == numbers
    assert adapter.next_version == UNITS * 5 + 1


async def queue_jobs(registry: Registry, count: int) -> list[str]:
    ids = [f"ftjob-{i:04d}" for i in range(count)]
    start = datetime.now(timezone.utc) - timedelta(minutes=1)
    async with registry.transaction() as s:
        for i, job_id in enumerate(ids):
            s.add(FineTuneJob(id=job_id, tenant_id="acme", model=BASE, training_file="file-x",
                              adapter_name="a", status=JobStatus.QUEUED.value,
                              created_at=start + timedelta(milliseconds=i)))
    return ids


async def test_workers_claiming_at_once_never_share_a_job(registry, pg_url, tmp_path):
    ids = await queue_jobs(registry, 30)
    statements: list[str] = []
    start = asyncio.Event()

    async def drain(jobs: JobStore, worker: str) -> list[str]:
        await start.wait()
        claimed = []
        while (job := await jobs.claim(worker, 60)) is not None:
            assert job.worker_id == worker and job.status == JobStatus.RUNNING
            claimed.append(job.id)
        return claimed

    async with units(pg_url, 6) as regs:
        event.listen(regs[0].engine.sync_engine, "before_cursor_execute",
                     lambda _c, _cur, statement, *_: statements.append(statement))
        stores = [JobStore(reg, LocalStore(tmp_path / "store")) for reg in regs]
        tasks = [asyncio.create_task(drain(jobs, f"w{i}")) for i, jobs in enumerate(stores)]
        await asyncio.sleep(0.05)
        start.set()
        results = await asyncio.gather(*tasks)
    claimed = [job_id for taken in results for job_id in taken]
    assert sorted(claimed) == ids  # every job once: none twice, none left behind
    assert any("FOR UPDATE SKIP LOCKED" in s for s in statements), "claims must skip locked rows"
    async with registry.transaction() as s:
        rows = {job.id: job for job in (await s.scalars(select(FineTuneJob))).all()}
        started = (await s.scalars(select(JobEvent.job_id).where(
            JobEvent.message.like("Job started by worker %")))).all()
    owner = {job_id: f"w{i}" for i, taken in enumerate(results) for job_id in taken}
    for job_id in ids:
        assert rows[job_id].attempts == 1 and rows[job_id].worker_id == owner[job_id]
    assert sorted(started) == ids


async def test_a_lapsed_lease_is_taken_over_by_another_unit(registry, pg_url, tmp_path,
                                                            postgres):
    # The lease deadline is compared in the database: it must not depend on its time zone.
    set_database_timezone(postgres, pg_url, "Pacific/Chatham")  # +12:45 / +13:45
    [job_id] = await queue_jobs(registry, 1)
    async with units(pg_url, 2) as (one, two):
        first = JobStore(one, LocalStore(tmp_path / "store"))
        second = JobStore(two, LocalStore(tmp_path / "store"))
        job = await first.claim("w1", 0.5)
        assert job is not None and job.id == job_id
        assert job.lease_expires_at is not None and job.lease_expires_at.tzinfo is not None
        assert await second.claim("w2", 30) is None  # the lease still holds
        await asyncio.sleep(0.7)
        taken = await second.claim("w2", 30)
        assert taken is not None and taken.id == job_id and taken.attempts == 2
        assert not await first.renew(job_id, "w1", 30)  # the first worker learns it lost it
        assert await second.renew(job_id, "w2", 30)


async def test_timestamps_are_the_same_instant_whatever_the_session_time_zone(postgres, pg_url):
    set_database_timezone(postgres, pg_url, "America/St_Johns")  # -03:30
    before = datetime.now(timezone.utc)
    async with units(pg_url, 1) as (reg,):
        await reg.create_schema()
        await reg.create_tenant("acme")
        row, _ = await reg.create_key("acme")
        await reg.revoke_key("acme", row.id)
        [key] = await reg.list_keys("acme")  # read back from the database
        tenant = await reg.get_tenant("acme")
        async with reg.engine.connect() as conn:
            column_type = await conn.scalar(text(
                "SELECT data_type FROM information_schema.columns "
                "WHERE table_name = 'tenants' AND column_name = 'created_at'"))
            session_zone = await conn.scalar(text("SHOW TimeZone"))
    after = datetime.now(timezone.utc)
    assert column_type == "timestamp with time zone" and session_zone == "America/St_Johns"
    for value in (tenant.created_at, key.created_at, key.revoked_at):
        assert value is not None and value.utcoffset() == timedelta(0), value
        assert before - timedelta(seconds=1) <= value <= after + timedelta(seconds=1)
    assert key.revoked_at is not None and key.created_at <= key.revoked_at


# -- the gateway on PostgreSQL ------------------------------------------------------------------

@asynccontextmanager
async def gateway(home: Path, database_url: str, base_model_dir: Path, store: Path,
                  registry_poll_s: float = 1.0) -> AsyncIterator[Gw]:
    """The real gateway (as the `gw` fixture builds it) on `database_url`, with its own
    stand-in engine; gateways given the same `store` and database are two units."""
    settings = Settings(home=home, admin_token=ADMIN_TOKEN, engine_url="http://fake-engine",
                        database_url=database_url, store=str(store), max_resident_adapters=2,
                        max_loras=1, max_lora_rank=16, engine_health_poll_s=3600.0,
                        registry_poll_s=registry_poll_s)
    async with serve_gateway(settings, base_model_dir, FakeEngine()) as gw:
        yield gw


def assert_recent(unix_seconds: Any) -> None:
    assert isinstance(unix_seconds, int) and abs(unix_seconds - time.time()) < 30, unix_seconds


async def test_admin_and_tenant_api_on_postgres(postgres, pg_url, tmp_path, base_model_dir,
                                                make_adapter):
    set_database_timezone(postgres, pg_url, "Asia/Kolkata")  # +05:30: no naive arithmetic
    async with gateway(tmp_path / "home", pg_url, base_model_dir, tmp_path / "store") as gw:
        resp = await gw.admin("POST", "/admin/tenants", json={"id": "acme"})
        assert resp.status_code == 201, resp.text  # was a 500 on PostgreSQL
        assert_recent(resp.json()["created_at"])
        key = await gw.new_tenant("globex")
        resp = await gw.admin("POST", "/admin/tenants/acme/keys")
        assert resp.status_code == 201, resp.text
        acme_key, acme_key_id = resp.json()["key"], resp.json()["id"]
        [listed] = (await gw.admin("GET", "/admin/tenants/acme/keys")).json()["data"]
        assert_recent(listed["created_at"])
        assert listed["revoked_at"] is None

        v1 = await gw.register("acme", "support", make_adapter())
        v2 = await gw.register("acme", "support", make_adapter(seed=1))
        assert (v1["version"], v2["version"]) == (1, 2)
        assert_recent(v2["created_at"])
        resp = await gw.admin("PUT", "/admin/tenants/acme/adapters/support/aliases/prod",
                              json={"version": 1})
        assert resp.status_code == 200, resp.text
        resp = await gw.chat("acme", acme_key, "support@prod")
        assert resp.status_code == 200, resp.text
        assert gw.engine.bodies[-1]["model"] == v1["engine_name"]
        models = (await gw.client.get("/v1/models", headers=gw.headers("acme", acme_key))).json()
        assert all(isinstance(m["created"], int) for m in models["data"])
        resp = await gw.admin("PUT", "/admin/tenants/acme/adapters/support/versions/2/pin")
        assert resp.status_code == 200, resp.text
        resp = await gw.admin("DELETE", "/admin/tenants/acme/adapters/support/versions/2")
        assert resp.status_code in (200, 204), resp.text
        v3 = await gw.register("acme", "support", make_adapter(seed=2))
        assert v3["version"] == 3  # numbers are never reused

        resp = await gw.admin("DELETE", f"/admin/tenants/acme/keys/{acme_key_id}")
        assert resp.status_code == 200, resp.text
        assert_recent(resp.json()["revoked_at"])
        gw.expect_error(await gw.chat("acme", acme_key, "support"), 401)
        assert (await gw.chat("globex", key, BASE)).status_code == 200

        tenants = (await gw.admin("GET", "/admin/tenants")).json()["data"]
        assert sorted(t["id"] for t in tenants) == ["acme", "globex"]
        resp = await gw.admin("DELETE", "/admin/tenants/acme")
        assert resp.status_code in (200, 204), resp.text
        gw.expect_error(await gw.admin("GET", "/admin/tenants/acme"), 404)


async def test_fine_tuning_api_on_postgres(postgres, pg_url, tmp_path, base_model_dir,
                                           monkeypatch):
    set_database_timezone(postgres, pg_url, "Asia/Kolkata")
    async with gateway(tmp_path / "home", pg_url, base_model_dir, tmp_path / "store") as gw:
        monkeypatch.setattr(gw.services.fine_tuning, "tokenizer", HeldTokenizer())
        headers = gw.headers("acme", await gw.new_tenant("acme"))
        r = await upload(gw, headers, dataset())
        assert r.status_code == 200, r.text
        assert_recent(r.json()["created_at"])
        r = await gw.client.post(JOBS, headers=headers, json={
            "model": BASE, "training_file": r.json()["id"], "suffix": "pirate"})
        assert r.status_code == 200, r.text
        job = await wait_for_status(gw, headers, r.json()["id"], "queued")
        assert_recent(job["created_at"])
        assert await event_messages(gw, headers, job["id"]) == [
            "Validating training file", "Files validated; job queued"]
        r = await gw.client.post(f"{JOBS}/{job['id']}/cancel", headers=headers)
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
        assert_recent(r.json()["finished_at"])
        listed = (await gw.client.get(JOBS, headers=headers)).json()["data"]
        assert [j["id"] for j in listed] == [job["id"]]


async def test_two_units_sharing_postgres_see_each_others_changes(pg_url, tmp_path,
                                                                  base_model_dir, make_adapter):
    store = tmp_path / "store"
    async with gateway(tmp_path / "a", pg_url, base_model_dir, store, 0.05) as a, \
            gateway(tmp_path / "b", pg_url, base_model_dir, store, 0.05) as b:
        key = await a.new_tenant("acme")
        version = await a.register("acme", "support", make_adapter())
        resp = await b.chat("acme", key, "support")  # registered on a, served by b
        assert resp.status_code == 200, resp.text
        assert b.engine.bodies[-1]["model"] == version["engine_name"]
        key_id = (await b.admin("GET", "/admin/tenants/acme/keys")).json()["data"][0]["id"]
        assert (await b.admin("DELETE", f"/admin/tenants/acme/keys/{key_id}")).status_code == 200

        async def refused_on_a() -> bool:
            return (await a.chat("acme", key, "support")).status_code == 401

        await wait_until(refused_on_a, "the key revoked on b to be refused by a", limit_s=2.0)
