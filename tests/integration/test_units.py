"""`loraplex up --units 2` for real: two units (gateway + vLLM CPU engine each) behind the
real Envoy, the registry on a real PostgreSQL, the local store shared in the data folder.

Affinity through the front, failover when a unit is SIGKILLed, the supervisor's restart, and
a stop that leaves no loraplex or vLLM process behind.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from tests.integration.conftest import (
    ADMIN_TOKEN,
    BASE,
    Server,
    engine_processes_under,
    is_engine_process,
    start_up,
    upload_adapter,
    wait_healthy,
)

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _chat(server: Server, key: str, model: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", timeout=120,
                      headers={"X-Tenant-ID": "acme", "Authorization": f"Bearer {key}"},
                      json={"model": model, "messages": QUESTION, "max_tokens": 8})


def _wait_for(predicate: Callable[[], bool], what: str, limit_s: float) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < limit_s, f"timed out waiting for {what}"
        time.sleep(0.5)
    return time.monotonic() - started


def _unit_processes(up: psutil.Process) -> dict[str, psutil.Process]:
    """The `loraplex unit` children of `up`, by the address they serve on."""
    found = {}
    for p in up.children():
        if p.cmdline()[-2:] == ["server.cli", "unit"]:
            env = p.environ()
            found[f"127.0.0.1:{env['LORAPLEX_PORT']}"] = p
    return found


def _ours(home: Path) -> list[psutil.Process]:
    """Every process left that belongs to this test's `loraplex up` (its data folder in the
    environment, or a vLLM process of one of its engines)."""
    left = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("LORAPLEX_HOME") == str(home):
                left.append(p)
        except psutil.Error:
            pass
    return left


def test_two_units_behind_envoy(base_model: Path, adapter_dirs: list[Path], tmp_path: Path,
                                pg_url: str) -> None:
    home = tmp_path / "home"
    timings: dict[str, float] = {}
    started = time.monotonic()
    server = start_up(base_model, home, "--units", "2", LORAPLEX_DATABASE_URL=pg_url)
    up = psutil.Process(server.proc.pid)
    descendants: list[psutil.Process] = []
    try:
        wait_healthy(server)
        timings["front healthy"] = time.monotonic() - started
        units = _unit_processes(up)
        assert len(units) == 2, units
        # Both units come up (one is enough for the front); each has its own folder.
        log = server.log.read_text
        timings["both units ready"] = timings["front healthy"] + _wait_for(
            lambda: len(re.findall(r"unit \d ready", log())) == 2, "both units", 300)
        for i in range(2):
            assert (home / "units" / str(i) / "logs" / "engine.log").exists()
            assert (home / "units" / str(i) / "engine.pid").exists()

        with httpx.Client(base_url=server.url, timeout=120,
                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
            assert admin.post("/admin/tenants", json={"id": "acme"}).status_code == 201
            key = admin.post("/admin/tenants/acme/keys", json={}).json()["key"]
        upload_adapter(server, "acme", "bot", adapter_dirs[0])
        upload_adapter(server, "acme", "other-bot", adapter_dirs[1])

        # Affinity: the same adapter, the same unit.
        served = []
        for _ in range(4):
            r = _chat(server, key, "bot")
            assert r.status_code == 200, r.text
            assert r.json()["model"] == "bot"
            served.append(r.headers["x-loraplex-unit"])
        assert len(set(served)) == 1, served
        home_unit = served[0]
        assert home_unit in units
        for model in (BASE, "other-bot"):
            r = _chat(server, key, model)
            assert r.status_code == 200, r.text
            assert r.headers["x-loraplex-unit"] in units

        # SIGKILL the unit that serves `bot`: the other one takes its requests within seconds.
        victim = units[home_unit]
        victim_engine = engine_processes_under(victim.pid)
        assert victim_engine
        other = next(a for a in units if a != home_unit)
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        answers = []
        for _ in range(3):
            r = _chat(server, key, "bot")
            answers.append((r.status_code, r.headers.get("x-loraplex-unit")))
            if r.status_code != 200:
                time.sleep(1)
        timings["first answers after the kill"] = time.monotonic() - killed_at
        assert all(a == (200, other) for a in answers), answers
        assert timings["first answers after the kill"] < 20
        # The killed unit's engine goes with it.
        _, alive = psutil.wait_procs(victim_engine, timeout=30)
        assert not alive, f"engine processes outlived their SIGKILLed unit: {alive}"

        # The supervisor restarts it; once ready it takes `bot`'s traffic again.
        timings["killed unit back"] = _wait_for(
            lambda: len(re.findall(r"unit \d ready", log())) == 3, "the restarted unit", 600)
        assert re.search(r"unit \d exited with signal SIGKILL; restarting in 2s", log())

        def back_home() -> bool:
            r = _chat(server, key, "bot")
            assert r.status_code == 200, r.text
            return r.headers["x-loraplex-unit"] == home_unit

        _wait_for(back_home, "the restarted unit to take traffic again", 30)
        descendants = up.children(recursive=True)
        assert any(is_engine_process(p) for p in descendants)
    finally:
        descendants = descendants or up.children(recursive=True)
        if server.proc.poll() is None:
            stopping = time.monotonic()
            server.proc.send_signal(signal.SIGINT)
            try:
                server.proc.wait(120)
            finally:
                server.proc.kill()
            timings["stop"] = time.monotonic() - stopping
    _, alive = psutil.wait_procs(descendants, timeout=30)
    for p in alive:
        p.kill()
    assert not alive, f"processes outlived loraplex up: {[(p.pid, p.name()) for p in alive]}"
    assert not _ours(home)
    assert "stopping: envoy, then units, then workers" in server.log.read_text()
    print("timings:", {k: round(v, 1) for k, v in timings.items()})
