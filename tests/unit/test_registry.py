"""The registry on its own (SQLite in a temp folder)."""

from __future__ import annotations

import asyncio
from contextlib import suppress

import pytest

import adapters.registry as registry_module
from adapters.errors import LoraplexError
from adapters.registry import Registry, hash_key


@pytest.fixture
async def registry(tmp_path):
    reg = Registry(f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}")
    await reg.create_schema()
    await reg.create_tenant("acme")
    yield reg
    await reg.close()


async def test_key_lookup_and_revocation(registry):
    row, key = await registry.create_key("acme", "ci")
    assert row.key_hash == hash_key(key) and key not in (row.prefix, row.key_hash)
    assert await registry.tenant_for_key(key) == "acme"
    assert await registry.tenant_for_key(key + "x") is None
    await registry.revoke_key("acme", row.id)
    assert await registry.tenant_for_key(key) is None


async def test_reserved_numbers_are_never_handed_out_twice(registry):
    assert await registry.reserve_version("acme", "support") == (1, True)
    assert await registry.reserve_version("acme", "support") == (2, False)
    assert await registry.reserve_version("acme", "other") == (1, True)


async def test_concurrent_first_registrations_of_one_adapter(registry, monkeypatch):
    # Make the race deterministic: both transactions read "no such adapter" before either
    # writes (what two admin uploads arriving together do by chance).
    original = registry_module._adapter_or_none
    arrived = 0
    both_read = asyncio.Event()

    async def synced(session, tenant_id, name):
        nonlocal arrived
        row = await original(session, tenant_id, name)
        arrived += 1
        if arrived >= 2:
            both_read.set()
        with suppress(TimeoutError):  # a fix that serializes them must not hang here
            await asyncio.wait_for(both_read.wait(), 1.0)
        return row

    monkeypatch.setattr(registry_module, "_adapter_or_none", synced)
    results = await asyncio.gather(registry.reserve_version("acme", "support"),
                                   registry.reserve_version("acme", "support"),
                                   return_exceptions=True)
    monkeypatch.undo()
    unmapped = [r for r in results
                if isinstance(r, BaseException) and not isinstance(r, LoraplexError)]
    assert unmapped == [], results
    assert sorted(r[0] for r in results) == [1, 2]
