"""Versioned schema migrations of the registry (Alembic, in ./migrations).

`upgrade(engine)` brings a database to the newest revision and is safe when several
processes (serving units, workers, `loraplex db upgrade`) run it at once: on PostgreSQL the
whole upgrade is one transaction holding an advisory lock (`pg_advisory_xact_lock`; the DDL is
transactional, so a failed upgrade leaves nothing half-done); on a SQLite file an exclusive
`flock` on `<database>.migrate-lock` serializes the processes that share it. Whoever comes
second finds the database up to date and does nothing.

A database made before migrations existed (`Base.metadata.create_all`, no `alembic_version`
table) is recognised: when its tables and columns are exactly revision 0001's it is stamped
0001 and upgraded from there; anything else is refused with `SchemaError` rather than guessed
at. So is a database at a revision this code does not know (made by a newer loraplex).

A change to models.py comes with a new file in migrations/versions/ whose `down_revision` is
the previous head; tests/unit/test_migrations.py checks that the head matches models.py on
SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, inspect, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

# Alembic announces each of its plugins at INFO on every run; its migration lines stay.
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
BASELINE = "0001"  # the schema `create_all` made before migrations
LOCK_KEY = 0x6C6F_7261_706C_6578  # "loraplex": the PostgreSQL advisory lock of migrations

# Tables and columns of revision 0001, to recognise a database made by create_all back then.
BASELINE_TABLES: dict[str, frozenset[str]] = {
    "registry_state": frozenset({"id", "generation"}),
    "tenants": frozenset({"id", "created_at"}),
    "api_keys": frozenset({"id", "tenant_id", "key_hash", "prefix", "name", "created_at",
                           "revoked_at"}),
    "adapters": frozenset({"id", "tenant_id", "name", "next_version", "created_at"}),
    "adapter_versions": frozenset({
        "id", "adapter_id", "version", "engine_name", "store_key", "rank", "alpha",
        "target_modules", "base_model", "size_bytes", "sha256", "source", "meta", "pinned",
        "created_at"}),
    "aliases": frozenset({"id", "adapter_id", "alias", "version"}),
    "files": frozenset({"id", "tenant_id", "filename", "purpose", "bytes", "path", "created_at"}),
    "fine_tuning_jobs": frozenset({
        "id", "tenant_id", "model", "training_file", "validation_file", "adapter_name",
        "suffix", "hyperparameters", "lora", "seed", "status", "fine_tuned_model", "error",
        "result", "trained_tokens", "created_at", "finished_at", "worker_id",
        "lease_expires_at", "attempts"}),
    "fine_tuning_events": frozenset({"id", "job_id", "level", "type", "message", "data",
                                     "created_at"}),
    "fine_tuning_checkpoints": frozenset({"id", "job_id", "step", "metrics", "created_at"}),
}


class SchemaError(RuntimeError):
    """The database's schema cannot be brought to this code's head safely."""


@dataclass(frozen=True)
class SchemaState:
    revision: str | None  # None: no alembic_version (empty, or made before migrations)
    head: str  # the newest revision this code knows
    legacy: bool  # registry tables without alembic_version: made by create_all before 0001

    @property
    def up_to_date(self) -> bool:
        return self.revision == self.head

    def describe(self) -> str:
        if self.legacy:
            return f"none: tables from before migrations (upgrade stamps {BASELINE}, then " \
                   f"goes to {self.head})"
        if self.revision is None:
            return f"none: empty database (head is {self.head})"
        if self.up_to_date:
            return f"{self.revision} (head)"
        return f"{self.revision} (head is {self.head}: run `loraplex db upgrade`)"


def config(connection: Connection | None = None) -> Config:
    """Alembic's configuration for the registry, bound to `connection` when given."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def head() -> str:
    current = ScriptDirectory.from_config(config()).get_current_head()
    assert current is not None, "no migrations found"
    return current


async def upgrade(engine: AsyncEngine, revision: str = "head") -> SchemaState:
    """Bring the database to `revision` (default: the newest), under the migration lock."""
    async with _file_lock(engine.url), engine.connect() as conn:
        state = await conn.run_sync(_upgrade, revision)
        await conn.commit()  # PostgreSQL: the DDL, the version and the lock, all at once
    return state


async def current(engine: AsyncEngine) -> SchemaState:
    async with engine.connect() as conn:
        return await conn.run_sync(_state)


def _upgrade(conn: Connection, revision: str) -> SchemaState:
    if conn.dialect.name == "postgresql":
        # Held until this transaction ends; every other upgrader waits here, then finds
        # the schema as this one left it.
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
    cfg = config(conn)
    before = _state(conn)
    if before.revision is not None:
        try:
            ScriptDirectory.from_config(cfg).get_revision(before.revision)
        except CommandError as exc:
            raise SchemaError(
                f"the registry database is at revision {before.revision!r}, which this "
                f"loraplex does not know (its newest is {before.head}): it was upgraded by a "
                "newer loraplex; run that version") from exc
    if before.legacy:
        _check_baseline(conn)
        command.stamp(cfg, BASELINE)
    command.upgrade(cfg, revision)
    return _state(conn)


def _state(conn: Connection) -> SchemaState:
    revision = MigrationContext.configure(conn).get_current_revision()
    tables = set(inspect(conn).get_table_names())
    legacy = revision is None and bool(tables & BASELINE_TABLES.keys())
    return SchemaState(revision=revision, head=head(), legacy=legacy)


def _check_baseline(conn: Connection) -> None:
    """Refuse to stamp a database whose tables are not exactly revision 0001's."""
    inspector = inspect(conn)
    tables = set(inspector.get_table_names())
    problems = [f"table {name!r} is missing" for name in sorted(BASELINE_TABLES.keys() - tables)]
    for name in sorted(BASELINE_TABLES.keys() & tables):
        columns = {c["name"] for c in inspector.get_columns(name)}
        if columns != BASELINE_TABLES[name]:
            extra, missing = columns - BASELINE_TABLES[name], BASELINE_TABLES[name] - columns
            problems.append(f"table {name!r} has unexpected columns {sorted(extra)} and lacks "
                            f"{sorted(missing)}")
    if problems:
        raise SchemaError(
            "the registry database has loraplex tables but no alembic_version, and they do not "
            f"match revision {BASELINE} (the schema before migrations): {'; '.join(problems)}. "
            "Refusing to guess: fix the schema by hand or start from an empty database")


@asynccontextmanager
async def _file_lock(url: URL) -> AsyncIterator[None]:
    """On a SQLite file, an exclusive flock beside it for the time of the upgrade."""
    database = url.database
    if url.get_backend_name() != "sqlite" or not database or database == ":memory:" \
            or database.startswith("file:"):
        yield
        return
    path = Path(database + ".migrate-lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
