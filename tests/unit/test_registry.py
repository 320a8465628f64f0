"""The registry on its own, on both engines: SQLite in a temp folder and a fresh database on
the real PostgreSQL server of the session (tests/pg_server.py)."""

from __future__ import annotations

import asyncio
from contextlib import suppress

import pytest

import adapters.registry as registry_module
from adapters.errors import LoraplexError
from adapters.names import ModelRef
from adapters.registry import Registry, VersionSpec, hash_key
from adapters.spec import AdapterSpec


@pytest.fixture(params=["sqlite", "postgres"])
async def registry(request, tmp_path):
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}"
    reg = Registry(url)
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


async def test_generation_moves_with_every_change_a_lookup_could_see(registry):
    spec = VersionSpec(store_key="k", source="test", meta={}, spec=AdapterSpec(
        rank=8, alpha=16.0, target_modules=["q_proj"], base_model=None, size_bytes=1,
        sha256="0" * 64))
    start = await registry.generation()
    row, key = await registry.create_key("acme")
    version, _ = await registry.reserve_version("acme", "support")
    await registry.add_version("acme", "support", version, spec)
    after_add = await registry.generation()
    assert after_add > start  # "support" now names a newer version
    await registry.tenant_for_key(key)
    await registry.resolve("acme", ModelRef("support"))
    await registry.set_pinned("acme", "support", version, True)
    assert await registry.generation() == after_add  # reads and pins change no lookup
    steps = [
        registry.set_alias("acme", "support", "prod", version),
        registry.delete_alias("acme", "support", "prod"),
        registry.revoke_key("acme", row.id),
        registry.delete_version("acme", "support", version),
        registry.delete_adapter("acme", "support"),
        registry.delete_tenant("acme"),
    ]
    seen = after_add
    for step in steps:
        await step
        now = await registry.generation()
        assert now > seen, step
        seen = now


async def test_a_failed_change_does_not_move_the_generation(registry):
    before = await registry.generation()
    with pytest.raises(LoraplexError):
        await registry.revoke_key("acme", "no-such-key")
    with pytest.raises(LoraplexError):
        await registry.delete_adapter("acme", "nope")
    assert await registry.generation() == before
