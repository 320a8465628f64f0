"""Fixtures shared by every test folder.

- `postgres`: one real PostgreSQL server for the whole session (see tests/pg_server.py),
  started the first time a test asks for it, so runs that need none start none.
- `pg_url`: the URL of a fresh, empty database on it, one per test.
- `redis_server`: one real redis-server for the whole session (see tests/redis_server.py),
  started the first time a test asks for it. Tests keep apart by key prefix or tenant name;
  a test that stops a server (an outage) starts its own `RedisServer` rather than this one.
- `redis_url`: its URL.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pg_server import PostgresServer
from tests.redis_server import RedisServer


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    return postgres.new_database()



@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url()
