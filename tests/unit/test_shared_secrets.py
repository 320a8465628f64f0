"""The cache-salt secret and the admin token are the same on every unit: set from the
environment on a fleet, or created once in the data folder that the units of one box share."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from server.services import Services, read_or_create_secret
from server.settings import Settings


async def build(home: Path, model: Path, **settings: str) -> Services:
    services = Services.build(Settings(home=home, engine_url="http://unused", **settings),
                              model_path=model)
    await services.registry.close()
    return services


async def test_units_with_the_configured_secrets_agree(tmp_path: Path, base_model_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Two units of a fleet: different data folders, the same Kubernetes Secret.
    monkeypatch.setenv("LORAPLEX_CACHE_SALT_SECRET", "salt-from-a-secret")
    monkeypatch.setenv("LORAPLEX_ADMIN_TOKEN", "admin-from-a-secret")
    a = await build(tmp_path / "a", base_model_dir)
    b = await build(tmp_path / "b", base_model_dir)
    assert a.gateway.cache_salt("acme") == b.gateway.cache_salt("acme")
    assert a.gateway.cache_salt("acme") != a.gateway.cache_salt("globex")
    assert a.admin_token == b.admin_token == "admin-from-a-secret"
    # Nothing was written where the setting is used.
    assert not (tmp_path / "a" / "secret").exists()
    other = await build(tmp_path / "c", base_model_dir, cache_salt_secret="another")
    assert other.gateway.cache_salt("acme") != a.gateway.cache_salt("acme")


async def test_units_sharing_a_data_folder_agree_without_settings(tmp_path: Path,
                                                                  base_model_dir: Path) -> None:
    home = tmp_path / "home"
    a = await build(home, base_model_dir, unit_dir=str(home / "units" / "0"))
    b = await build(home, base_model_dir, unit_dir=str(home / "units" / "1"))
    assert a.gateway.cache_salt("acme") == b.gateway.cache_salt("acme")
    assert a.admin_token == b.admin_token
    assert (home / "secret").stat().st_mode & 0o777 == 0o600
    # ... and a restarted unit gets them again.
    again = await build(home, base_model_dir)
    assert again.gateway.cache_salt("acme") == a.gateway.cache_salt("acme")


def test_units_starting_together_all_get_the_first_secret(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    barrier = threading.Barrier(16)
    got: list[str] = []

    def unit(i: int) -> None:
        barrier.wait()
        got.append(read_or_create_secret(path, f"secret-{i}"))

    threads = [threading.Thread(target=unit, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 1 and got[0] == path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]  # no temporary file left


def test_each_unit_has_its_own_folder_for_what_is_its_own(tmp_path: Path) -> None:
    shared = Settings(home=tmp_path)
    unit = Settings(home=tmp_path, unit_dir=tmp_path / "units" / "1")
    assert shared.engine_log_path == tmp_path / "logs" / "engine.log"
    assert shared.engine_pid_path == tmp_path / "engine.pid"
    assert shared.cache_dir == tmp_path / "cache"
    assert unit.engine_log_path == tmp_path / "units" / "1" / "logs" / "engine.log"
    assert unit.engine_pid_path == tmp_path / "units" / "1" / "engine.pid"
    assert unit.cache_dir == tmp_path / "units" / "1" / "cache"
    # Shared by every unit: the registry, the store, the models.
    assert unit.registry_url == shared.registry_url
    assert unit.store_dir == shared.store_dir and unit.models_dir == shared.models_dir
