"""A unit with several gateway processes (server/gateway_processes.py, server/slots_link.py).

The link itself in-process (a fake loader): holds, errors and a process that goes away. Then a
real `loraplex unit` with LORAPLEX_GATEWAY_PROCESSES=2 on the stand-in engine
(loadtest/fake_engine.py, which counts adapter loads and unloads) and a real Redis: both
processes serve the port, one scrape counts every process's requests, concurrent first
requests for an adapter load it once, and an adapter held by a stream is never evicted.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.errors import Overloaded, Unavailable
from adapters.residency import Residency
from server.engine.process import free_port
from server.slots import LocalSlots
from server.slots_link import RemoteSlots, SlotsServer
from tests.unit.conftest import write_adapter

REPO = Path(__file__).resolve().parents[2]
ADMIN = "processes-admin"


class Loader:
    def __init__(self) -> None:
        self.loaded: list[str] = []
        self.unloaded: list[str] = []

    async def load_adapter(self, engine_name: str, path: Path) -> None:
        self.loaded.append(engine_name)

    async def unload_adapter(self, engine_name: str) -> None:
        self.unloaded.append(engine_name)


class Store:
    async def checkout(self, key: str) -> Path:
        return Path("/adapters") / key

    def release(self, key: str) -> None:
        pass


@pytest.fixture
async def link(tmp_path: Path) -> Any:
    loader = Loader()
    residency = Residency(loader, capacity=2, slot_wait_s=0.2)
    local = LocalSlots(residency, Store())  # type: ignore[arg-type]
    server = SlotsServer(local, tmp_path / "slots.sock", lambda: b"# residency\n")
    await server.start()
    clients: list[RemoteSlots] = []

    def client() -> RemoteSlots:
        clients.append(RemoteSlots(tmp_path / "slots.sock"))
        return clients[-1]

    yield residency, loader, client
    for c in clients:
        await c.aclose()
    await server.close()


async def until(predicate: Any, what: str) -> None:
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_holds_through_the_link_count_in_the_owner(link: Any) -> None:
    residency, loader, client = link
    a, b = client(), client()
    async with a.hold("t-x-1", "k1"), b.hold("t-x-1", "k1"):
        snapshot = await a.snapshot()
        assert [(s["engine_name"], s["in_flight"]) for s in snapshot["resident"]] == \
            [("t-x-1", 2)]
    assert loader.loaded == ["t-x-1"]  # loaded once for both processes
    await until(lambda: residency.snapshot()["resident"][0]["in_flight"] == 0, "release")
    assert (await a.metrics_text()) == b"# residency\n"


async def test_a_full_engine_answers_overloaded_through_the_link(link: Any) -> None:
    _residency, _loader, client = link
    a = client()
    async with a.hold("t-x-1", "k1"), a.hold("t-x-2", "k2"):
        with pytest.raises(Overloaded) as refused:
            async with a.hold("t-x-3", "k3"):
                pass
    assert refused.value.code == "adapter_slots_busy" and refused.value.retry_after_s == 1


async def test_a_process_that_goes_away_frees_what_it_held(link: Any) -> None:
    residency, _loader, client = link
    gone, other = client(), client()
    holding = gone.hold("t-x-1", "k1")
    await holding.__aenter__()  # held, and never let go: the process dies
    await until(lambda: residency.snapshot()["resident"][0]["in_flight"] == 1, "the hold")
    await gone.aclose()
    await until(lambda: residency.snapshot()["resident"][0]["in_flight"] == 0, "the release")
    async with other.hold("t-x-2", "k2"), other.hold("t-x-3", "k3"):  # t-x-1 was evictable
        pass


async def test_a_restarted_owner_is_reached_again(tmp_path: Path) -> None:
    residency = Residency(Loader(), capacity=2, slot_wait_s=0.2)
    local = LocalSlots(residency, Store())  # type: ignore[arg-type]
    path = tmp_path / "slots.sock"
    first = SlotsServer(local, path, lambda: b"")
    await first.start()
    client = RemoteSlots(path)
    assert (await client.snapshot())["capacity"] == 2
    await first.close()  # the owner goes away ...
    await until(lambda: client._writer is None, "the client to see it")
    with pytest.raises(Unavailable):
        await client.snapshot()
    second = SlotsServer(local, path, lambda: b"")
    await second.start()  # ... and comes back
    assert (await client.snapshot())["capacity"] == 2
    await client.aclose()
    await second.close()


# -- a real unit with two gateway processes ----------------------------------------------------

def wait_until(predicate: Any, what: str, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while True:
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def stand_in_engine() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "loadtest" / "fake_engine.py"),
                             "--port", str(port), "--gap-ms", "20", "--load-ms", "200"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/health").status_code == 200, "the stand-in")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


class Unit:
    def __init__(self, url: str, home: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url, self.home, self.proc, self.log = url, home, proc, log

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(method, self.url + path, timeout=30,
                             headers={"Authorization": f"Bearer {ADMIN}"}, **kwargs)

    def metric_pids(self) -> set[str]:
        """Processes that wrote request counters (prometheus_client's files, one per pid)."""
        folder = self.home / "prometheus"
        return {m.group(1) for f in folder.iterdir()
                if (m := re.fullmatch(r"counter_(\d+)\.db", f.name))}


@pytest.fixture(scope="module")
def unit(tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path, stand_in_engine: str,
         redis_url: str) -> Iterator[Unit]:
    home = tmp_path_factory.mktemp("unit")
    port = free_port()
    env = {**os.environ, "LORAPLEX_HOME": str(home), "LORAPLEX_PORT": str(port),
           "LORAPLEX_ENGINE_URL": stand_in_engine, "LORAPLEX_MODEL_PATH": str(base_model_dir),
           "LORAPLEX_GATEWAY_PROCESSES": "2", "LORAPLEX_REDIS_URL": redis_url,
           "LORAPLEX_ADMIN_TOKEN": ADMIN, "LORAPLEX_MAX_RESIDENT_ADAPTERS": "2",
           "LORAPLEX_MAX_LORAS": "1", "LORAPLEX_MAX_LORA_RANK": "8",
           "LORAPLEX_ENGINE_HEALTH_POLL_S": "0.2", "LORAPLEX_REGISTRY_POLL_S": "0.2"}
    log = home / "unit.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "unit"], env=env, cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT)
    served = Unit(f"http://127.0.0.1:{port}", home, proc, log)
    try:
        wait_until(lambda: proc.poll() is None and
                   httpx.get(f"{served.url}/healthz").status_code == 200, "the unit")
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


@pytest.fixture(scope="module")
def tenant(unit: Unit, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    assert unit.admin("POST", "/admin/tenants", json={"id": "acme"}).status_code == 201
    key = unit.admin("POST", "/admin/tenants/acme/keys").json()["key"]
    for name in ("a", "b", "c"):
        folder = write_adapter(tmp_path_factory.mktemp(name), r=8, seed=ord(name))
        files = {p.name: p.read_bytes() for p in folder.iterdir()}
        resp = unit.admin("POST", f"/admin/tenants/acme/adapters/{name}/versions", files=files)
        assert resp.status_code == 201, resp.text
    return {"X-Tenant-ID": "acme", "Authorization": f"Bearer {key}"}


def chat(unit: Unit, headers: dict[str, str], model: str, max_tokens: int = 2,
         stream: bool = False) -> httpx.Response:
    """One request on a connection of its own, so the kernel may give it to either process."""
    with httpx.Client(base_url=unit.url, timeout=60) as client:
        return client.post("/v1/chat/completions", headers=headers, json={
            "model": model, "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": "hi"}]})


def test_both_processes_serve_the_port_and_any_scrape_counts_them_all(
        unit: Unit, tenant: dict[str, str]) -> None:
    sent = 0
    while len(unit.metric_pids()) < 2:
        assert sent < 400, "only one process ever got a connection"
        answers = _parallel(lambda: chat(unit, tenant, "HuggingFaceTB/SmolLM2-135M-Instruct"), 8)
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        sent += len(answers)
    for _ in range(4):  # each scrape lands on either process; each counts every request
        text = httpx.get(unit.url + "/metrics").text
        assert _sample(text, "loraplex_requests_total", endpoint="chat") == sent
        assert "loraplex_resident_adapters" in text  # the slots' owner's part, from any process


def test_concurrent_first_requests_load_an_adapter_once(
        unit: Unit, tenant: dict[str, str], stand_in_engine: str) -> None:
    answers = _parallel(lambda: chat(unit, tenant, "a"), 12)
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    loads = httpx.get(stand_in_engine + "/stats").json()["loads"]
    assert [count for name, count in loads.items() if name.startswith("acme/a@")] == [1]


def test_an_adapter_held_by_a_stream_is_never_evicted(
        unit: Unit, tenant: dict[str, str], stand_in_engine: str) -> None:
    held: list[httpx.Response] = []
    stream = threading.Thread(target=lambda: held.append(
        chat(unit, tenant, "a", max_tokens=150, stream=True)))  # about 3 s of tokens
    stream.start()
    time.sleep(0.5)
    for model in ("b", "c", "b", "c"):  # two slots: "a" is held, the other one turns over
        assert chat(unit, tenant, model).status_code == 200
    stream.join(60)
    assert held and held[0].status_code == 200 and held[0].text.rstrip().endswith("[DONE]")
    assert '"error"' not in held[0].text
    unloads = httpx.get(stand_in_engine + "/stats").json()["unloads"]
    assert not [name for name in unloads if name.startswith("acme/a@")], unloads
    assert any(name.startswith(("acme/b@", "acme/c@")) for name in unloads)


def test_the_unit_stops_cleanly_on_sigterm(unit: Unit) -> None:
    unit.proc.send_signal(signal.SIGTERM)
    assert unit.proc.wait(60) == 0, unit.log.read_text()[-3000:]
    assert not (unit.home / "slots.sock").exists()


def _parallel(call: Any, count: int) -> list[httpx.Response]:
    results: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: results.append(call())) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def _sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total
