"""Versioned schema migrations (adapters/registry/migrate.py), on SQLite and PostgreSQL.

From an empty database, from the schema main had before migrations (the DDL that
`create_all` emitted at f765ae2, kept in tests/fixtures/, with rows written as that code
wrote them), several upgraders at once (in one process and as two `loraplex db upgrade`
processes), and the databases that must be refused rather than guessed at.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect, text
from sqlalchemy.engine import make_url

from adapters.names import ModelRef
from adapters.registry import Registry, SchemaError, VersionSpec, hash_key, migrate
from adapters.registry.models import Base
from adapters.spec import AdapterSpec
from adapters.store import LocalStore
from adapters.training.jobs import JobStore
from tests.pg_server import PostgresServer

FIXTURES = Path(__file__).parent.parent / "fixtures"
REPO = Path(__file__).parent.parent.parent
HEAD = migrate.head()
UTC = timezone.utc


@dataclass
class Database:
    """An empty database on either engine, and a way to make another one beside it."""

    url: str
    postgres: PostgresServer | None
    folder: Path

    @property
    def dialect(self) -> str:
        return "postgresql" if self.postgres is not None else "sqlite"

    def another(self) -> str:
        if self.postgres is not None:
            return self.postgres.new_database()
        return f"sqlite+aiosqlite:///{self.folder / 'another.db'}"

    def set_timezone(self, tz: str) -> None:
        """New PostgreSQL sessions of this database run in `tz`."""
        assert self.postgres is not None
        self.postgres.psql(f"ALTER DATABASE \"{make_url(self.url).database}\" "
                           f"SET timezone TO '{tz}'")


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    if request.param == "postgres":
        return Database(request.getfixturevalue("pg_url"), request.getfixturevalue("postgres"),
                        tmp_path)
    return Database(f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}", None, tmp_path)


@pytest.fixture
async def registry(db: Database) -> AsyncIterator[Registry]:
    reg = Registry(db.url)
    yield reg
    await reg.close()


async def run_sql(reg: Registry, statements: list[str]) -> None:
    async with reg.engine.begin() as conn:
        for statement in statements:
            await conn.execute(text(statement))


def fixture_statements(dialect: str) -> list[str]:
    """The f765ae2 schema's DDL for `dialect`, one statement each."""
    script = (FIXTURES / f"registry_schema_f765ae2.{dialect}.sql").read_text()
    lines = [line for line in script.splitlines() if not line.startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def describe(conn: Connection) -> dict[str, Any]:
    """Tables, columns (type, nullability), keys and indexes, as the database reports them."""
    inspector = inspect(conn)
    out: dict[str, Any] = {}
    for table in sorted(inspector.get_table_names()):
        if table == "alembic_version":
            continue
        out[table] = {
            "columns": [(c["name"], str(c["type"]), c["nullable"])
                        for c in inspector.get_columns(table)],
            "pk": inspector.get_pk_constraint(table)["constrained_columns"],
            "fks": sorted((tuple(fk["constrained_columns"]), fk["referred_table"],
                           tuple(fk["referred_columns"]), fk["options"].get("ondelete"))
                          for fk in inspector.get_foreign_keys(table)),
            "unique": sorted(tuple(u["column_names"])
                             for u in inspector.get_unique_constraints(table)),
            "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                              for i in inspector.get_indexes(table)),
        }
    return out


# -- from an empty database ------------------------------------------------------------------

async def test_upgrade_from_an_empty_database(registry):
    before = await registry.schema_state()
    assert before.revision is None and not before.legacy
    state = await registry.create_schema()
    assert state.revision == HEAD and state.up_to_date
    async with registry.engine.connect() as conn:
        # The head revision is models.py: a model changed without a migration fails here.
        diffs = await conn.run_sync(lambda c: compare_metadata(
            MigrationContext.configure(c, opts={"compare_type": True}), Base.metadata))
        assert diffs == []
        assert (await conn.execute(text("SELECT id, generation FROM registry_state"))).all() \
            == [(1, 0)]
    await registry.create_tenant("acme")  # and it works
    assert (await registry.create_schema()).revision == HEAD  # again: nothing to do


async def test_revision_0001_is_the_schema_main_made(db):
    """0001 on an empty database == the DDL create_all emitted at f765ae2."""
    migrated, legacy = Registry(db.url), Registry(db.another())
    try:
        await migrate.upgrade(migrated.engine, migrate.BASELINE)
        await run_sql(legacy, fixture_statements(db.dialect))
        async with migrated.engine.connect() as a, legacy.engine.connect() as b:
            made, expected = await a.run_sync(describe), await b.run_sync(describe)
    finally:
        await migrated.close()
        await legacy.close()
    assert made == expected
    assert {t: frozenset(c[0] for c in d["columns"]) for t, d in expected.items()} \
        == migrate.BASELINE_TABLES


# -- from the schema on main before migrations -----------------------------------------------

LEGACY_KEY, REVOKED_KEY = "lpx-legacy-key-1", "lpx-legacy-key-2"


def legacy_rows() -> list[str]:
    """Rows as the pre-migration code wrote them: naive UTC wall times, serial ids taken by
    the database (so that new rows after the upgrade get fresh ones)."""
    adapter = "(SELECT id FROM adapters WHERE name = 'support')"
    version = ("INSERT INTO adapter_versions (adapter_id, version, engine_name, store_key, rank, "
               "alpha, target_modules, base_model, size_bytes, sha256, source, meta, pinned, "
               "created_at) VALUES ({adapter}, {v}, 'acme/support@{v}.ab12', 'acme/support/{v}',"
               " 8, 16.0, '[\"q_proj\"]', NULL, 100, '{sha}', 'upload', '{{}}', FALSE, "
               "'2026-01-02 03:05:0{v}')")
    return [
        "INSERT INTO registry_state (id, generation) VALUES (1, 7)",
        "INSERT INTO tenants (id, created_at) VALUES ('acme', '2026-01-02 03:04:05.123456')",
        "INSERT INTO api_keys (id, tenant_id, key_hash, prefix, name, created_at, revoked_at) "
        f"VALUES ('k1', 'acme', '{hash_key(LEGACY_KEY)}', 'lpx-legacy', 'ci', "
        "'2026-01-02 03:04:06', NULL)",
        "INSERT INTO api_keys (id, tenant_id, key_hash, prefix, name, created_at, revoked_at) "
        f"VALUES ('k2', 'acme', '{hash_key(REVOKED_KEY)}', 'lpx-legacy', NULL, "
        "'2026-01-02 03:04:07', '2026-01-03 00:00:00')",
        "INSERT INTO adapters (tenant_id, name, next_version, created_at) "
        "VALUES ('acme', 'support', 3, '2026-01-02 03:05:00')",
        version.format(adapter=adapter, v=1, sha="1" * 64),
        version.format(adapter=adapter, v=2, sha="2" * 64),
        f"INSERT INTO aliases (adapter_id, alias, version) VALUES ({adapter}, 'prod', 1)",
        "INSERT INTO files (id, tenant_id, filename, purpose, bytes, path, created_at) VALUES "
        "('file-1', 'acme', 't.jsonl', 'fine-tune', 10, '/x/file-1.jsonl', '2026-01-02 04:00:00')",
        "INSERT INTO fine_tuning_jobs (id, tenant_id, model, training_file, validation_file, "
        "adapter_name, suffix, hyperparameters, lora, seed, status, fine_tuned_model, error, "
        "result, trained_tokens, created_at, finished_at, worker_id, lease_expires_at, attempts) "
        "VALUES ('ftjob-1', 'acme', 'base', 'file-1', NULL, 'pirate', 'pirate', '{}', '{}', 42, "
        "'running', NULL, NULL, '{}', NULL, '2026-01-02 04:00:01', NULL, 'w1', "
        "'2026-01-02 04:10:00', 1)",
        "INSERT INTO fine_tuning_events (job_id, level, type, message, data, created_at) VALUES "
        "('ftjob-1', 'info', 'message', 'Job started by worker w1', '{}', '2026-01-02 04:00:02')",
        "INSERT INTO fine_tuning_checkpoints (job_id, step, metrics, created_at) VALUES "
        "('ftjob-1', 10, '{\"loss\": 1.5}', '2026-01-02 04:05:00')",
    ]


async def test_upgrade_from_the_schema_on_main(registry, db, tmp_path):
    if db.postgres is not None:  # the type change must not read the session's time zone
        db.set_timezone("Asia/Kolkata")
    await run_sql(registry, fixture_statements(db.dialect) + legacy_rows())
    before = await registry.schema_state()
    assert before.legacy and before.revision is None

    state = await registry.create_schema()
    assert state.revision == HEAD and not state.legacy

    assert await registry.generation() == 7
    tenant = await registry.get_tenant("acme")
    assert tenant.created_at == datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    assert await registry.tenant_for_key(LEGACY_KEY) == "acme"
    assert await registry.tenant_for_key(REVOKED_KEY) is None
    keys = {k.id: k for k in await registry.list_keys("acme")}
    assert keys["k2"].revoked_at == datetime(2026, 1, 3, tzinfo=UTC)
    prod = await registry.resolve("acme", ModelRef("support", alias="prod"))
    latest = await registry.resolve("acme", ModelRef("support"))
    assert (prod.version, latest.version) == (1, 2)
    assert latest.created_at == datetime(2026, 1, 2, 3, 5, 2, tzinfo=UTC)
    assert latest.target_modules == ["q_proj"] and latest.pinned is False

    # New writes continue where the old data left off.
    version, created = await registry.reserve_version("acme", "support")
    assert (version, created) == (3, False)
    spec = VersionSpec(store_key="k", source="test", meta={}, spec=AdapterSpec(
        rank=8, alpha=16.0, target_modules=["q_proj"], base_model=None, size_bytes=1,
        sha256="3" * 64))
    row = await registry.add_version("acme", "support", version, spec)
    assert abs(row.created_at - datetime.now(UTC)) < timedelta(minutes=1)
    assert (await registry.resolve("acme", ModelRef("support"))).version == 3

    jobs = JobStore(registry, LocalStore(tmp_path / "store"))
    job = await jobs.get_job(None, "ftjob-1")
    assert job.lease_expires_at == datetime(2026, 1, 2, 4, 10, tzinfo=UTC)
    assert job.created_at == datetime(2026, 1, 2, 4, 0, 1, tzinfo=UTC)
    taken = await jobs.claim("w2", 30)  # its lease ran out long ago: taken over
    assert taken is not None and taken.id == "ftjob-1" and taken.attempts == 2
    [checkpoint] = await jobs.list_checkpoints("acme", "ftjob-1")
    assert checkpoint.metrics == {"loss": 1.5}
    assert checkpoint.created_at == datetime(2026, 1, 2, 4, 5, tzinfo=UTC)

    if db.postgres is not None:
        async with registry.engine.connect() as conn:
            types = set((await conn.execute(text(
                "SELECT data_type FROM information_schema.columns WHERE table_schema = "
                "'public' AND column_name IN ('created_at', 'revoked_at', 'finished_at', "
                "'lease_expires_at')"))).scalars())
        assert types == {"timestamp with time zone"}


async def test_a_database_unlike_revision_0001_is_refused(registry, db):
    statements = fixture_statements(db.dialect)
    # tables of loraplex, but not the ones 0001 describes: no fine_tuning_events, an odd column
    statements = [s for s in statements if "fine_tuning_events" not in s]
    await run_sql(registry, [*statements, "ALTER TABLE tenants ADD COLUMN colour VARCHAR(10)"])
    with pytest.raises(SchemaError) as err:
        await registry.create_schema()
    assert "fine_tuning_events" in str(err.value) and "colour" in str(err.value)
    assert (await registry.schema_state()).revision is None  # nothing was stamped


async def test_a_database_from_a_newer_loraplex_is_refused(registry):
    await registry.create_schema()
    await run_sql(registry, ["UPDATE alembic_version SET version_num = '9999'"])
    with pytest.raises(SchemaError, match="9999"):
        await registry.create_schema()


async def test_downgrade_to_0001_and_back_keeps_the_instants(postgres, pg_url):
    registry = Registry(pg_url)
    try:
        await registry.create_schema()
        await registry.create_tenant("acme")
        created = (await registry.get_tenant("acme")).created_at
        async with registry.engine.connect() as conn:
            await conn.run_sync(lambda c: _alembic(c, "downgrade", "0001"))
            await conn.commit()
            kind = await conn.scalar(text(
                "SELECT data_type FROM information_schema.columns "
                "WHERE table_name = 'tenants' AND column_name = 'created_at'"))
        assert kind == "timestamp without time zone"
        assert (await registry.create_schema()).revision == HEAD
        assert (await registry.get_tenant("acme")).created_at == created
    finally:
        await registry.close()


def _alembic(conn: Connection, action: str, revision: str) -> None:
    from alembic import command

    getattr(command, action)(migrate.config(conn), revision)


# -- several upgraders at once ---------------------------------------------------------------

@pytest.mark.parametrize("start", ["empty", "legacy"])
async def test_units_starting_at_once_upgrade_once(db, start):
    if start == "legacy":
        setup = Registry(db.url)
        await run_sql(setup, fixture_statements(db.dialect) + legacy_rows())
        await setup.close()
    regs = [Registry(db.url) for _ in range(6)]
    try:
        states = await asyncio.gather(*(reg.create_schema() for reg in regs))
        assert [s.revision for s in states] == [HEAD] * 6
        async with regs[0].engine.connect() as conn:
            assert (await conn.execute(text("SELECT version_num FROM alembic_version"))).all() \
                == [(HEAD,)]
            assert (await conn.execute(text("SELECT generation FROM registry_state"))).all() \
                == [(7 if start == "legacy" else 0,)]
    finally:
        for reg in regs:
            await reg.close()


def loraplex(args: list[str], url: str, home: Path) -> Callable[[], subprocess.Popen[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    env.update(LORAPLEX_HOME=str(home), LORAPLEX_DATABASE_URL=url)

    def start() -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "server.cli", *args], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    return start


async def test_db_upgrade_in_two_processes_at_once(db, tmp_path):
    upgrade = loraplex(["db", "upgrade"], db.url, tmp_path / "home")
    procs = [upgrade(), upgrade()]
    outputs = [await asyncio.to_thread(p.communicate, timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, (out, err)
        assert f"{HEAD} (head)" in out, out
    current = loraplex(["db", "current"], db.url, tmp_path / "home")()
    out, err = await asyncio.to_thread(current.communicate, timeout=120)
    assert current.returncode == 0 and out.strip().endswith(f"{HEAD} (head)"), (out, err)


async def test_db_upgrade_names_an_unreachable_database(tmp_path):
    url = "postgresql+asyncpg://loraplex:s3cret@127.0.0.1:1/loraplex"
    proc = loraplex(["db", "upgrade"], url, tmp_path / "home")()
    out, err = await asyncio.to_thread(proc.communicate, timeout=120)
    assert proc.returncode == 1
    assert "unreachable" in err and "127.0.0.1:1" in err and "s3cret" not in err + out
