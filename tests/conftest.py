"""Fixtures shared by every test folder.

- `postgres`: one real PostgreSQL server for the whole session (see tests/pg_server.py),
  started the first time a test asks for it, so runs that need none start none.
- `pg_url`: the URL of a fresh, empty database on it, one per test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pg_server import PostgresServer


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    return postgres.new_database()
