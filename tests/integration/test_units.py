"""The cluster: `loraplex up --units 2` for real. Two units (gateway + vLLM CPU engine each)
behind the real Envoy, the registry on a real PostgreSQL, adapters and training files in a
real S3 endpoint on loopback, a training worker.

Affinity through the front; an adapter registered through the front is served by both units;
a revoked key is refused by both within about 2 s; a fine-tuning job submitted through one
unit is trained and then served by the other; SIGKILL of a unit: its in-flight stream ends
with an error the client sees (never a hang), new requests are answered by the other unit
within seconds, the supervisor restarts it and it takes its traffic back; a stop that leaves
no loraplex or vLLM process behind.
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
    make_tenant,
    start_up,
    upload_adapter,
    wait_healthy,
)
from tests.integration.test_fine_tuning import create_job, wait_for
from tests.s3_server import DUMMY_ENV, MotoS3Server

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


def _direct(unit: str, key: str, model: str, tenant: str = "acme") -> httpx.Response:
    """A chat request straight to one unit, past Envoy."""
    return httpx.post(f"http://{unit}/v1/chat/completions", timeout=120,
                      headers={"X-Tenant-ID": tenant, "Authorization": f"Bearer {key}"},
                      json={"model": model, "messages": QUESTION, "max_tokens": 8})


def test_two_units_behind_envoy(base_model: Path, adapter_dirs: list[Path], tmp_path: Path,
                                pg_url: str) -> None:
    with MotoS3Server() as s3:
        s3.client().create_bucket(Bucket="cluster")
        _two_units_behind_envoy(base_model, adapter_dirs, tmp_path, pg_url, s3)


def _two_units_behind_envoy(base_model: Path, adapter_dirs: list[Path], tmp_path: Path,
                            pg_url: str, s3: MotoS3Server) -> None:
    home = tmp_path / "home"
    timings: dict[str, float] = {}
    started = time.monotonic()
    server = start_up(base_model, home, "--units", "2", LORAPLEX_DATABASE_URL=pg_url,
                      LORAPLEX_STORE="s3://cluster/loraplex", LORAPLEX_S3_ENDPOINT_URL=s3.endpoint_url,
                      LORAPLEX_WORKERS="1", **DUMMY_ENV)
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

        # Envoy's health checks trail the units' own readiness by a check or two: wait until
        # it routes to both (requests of many tenants hash over both units; a 401 names the
        # unit that answered it too).
        def routes_to_both() -> bool:
            seen = {httpx.get(f"{server.url}/v1/models", headers={"X-Tenant-ID": f"t{i}"},
                              timeout=30).headers.get("x-loraplex-unit") for i in range(16)}
            return seen == set(units)

        _wait_for(routes_to_both, "Envoy to route to both units", 30)

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

        # Shared registry and store: what was registered through the front, either unit serves.
        other = next(a for a in units if a != home_unit)
        for unit in units:
            r = _direct(unit, key, "bot")
            assert r.status_code == 200 and r.headers["x-loraplex-unit"] == unit, r.text

        # A key revoked through the front is refused by both units within about 2 s.
        with httpx.Client(base_url=server.url, timeout=120,
                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
            made = admin.post("/admin/tenants/acme/keys", json={}).json()
            assert all(_direct(u, made["key"], BASE).status_code == 200 for u in units)
            assert admin.delete(f"/admin/tenants/acme/keys/{made['id']}").status_code == 200
        revoked_at = time.monotonic()
        _wait_for(lambda: all(_direct(u, made["key"], BASE).status_code == 401 for u in units),
                  "both units to refuse the revoked key", 10)
        timings["revocation seen by both units"] = time.monotonic() - revoked_at
        assert timings["revocation seen by both units"] < 2.5

        # Fine-tuning through one unit (files in S3), trained by the worker, served by the other.
        trainer = make_tenant(server, "trainer")
        trainer.client.base_url = httpx.URL(f"http://{home_unit}/v1/")
        job = wait_for(trainer.client, create_job(trainer, "pirate", epochs=1),
                       {"succeeded", "failed", "cancelled"}, timeout_s=900)
        assert job.status == "succeeded", job.error
        r = _direct(other, trainer.key, job.fine_tuned_model, tenant="trainer")
        assert r.status_code == 200 and r.json()["model"] == job.fine_tuned_model, r.text
        objects = s3.client().list_objects_v2(Bucket="cluster").get("Contents", [])
        assert any("/_data/files/trainer/" in o["Key"] for o in objects), objects

        # SIGKILL the unit that serves `bot` in the middle of a stream: the client sees the
        # stream end with an error (never a hang), and the other unit takes new requests
        # within seconds.
        victim = units[home_unit]
        victim_engine = engine_processes_under(victim.pid)
        assert victim_engine
        stream_body = {"model": "bot", "messages": QUESTION, "max_tokens": 1000,
                       "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60) as client, client.stream(
                "POST", f"{server.url}/v1/chat/completions", json=stream_body,
                headers={"X-Tenant-ID": "acme", "Authorization": f"Bearer {key}"}) as stream:
            assert stream.headers["x-loraplex-unit"] == home_unit
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            victim.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            rest: list[str] = []
            with pytest.raises(httpx.HTTPError):  # the cut reaches the client as an error
                rest.extend(lines)
            assert "data: [DONE]" not in rest
        timings["stream cut seen"] = time.monotonic() - killed_at
        assert timings["stream cut seen"] < 30
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
