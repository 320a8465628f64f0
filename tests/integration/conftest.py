"""Integration fixtures: the real `loraplex up` (real vLLM CPU engine, real default model).

One server per test session: the engine takes ~30 s to start on a CPU. The default model is
built once into `.cache/` of the checkout and reused by later runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from openai import OpenAI

from adapters.base_model import ensure_default_model
from adapters.synthetic import make_random_adapters
from server.engine.process import free_port
from server.settings import DEFAULT_MODEL_NAME

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache"
ADMIN_TOKEN = "admin-integration"
RESIDENT_SLOTS = 2
BASE = DEFAULT_MODEL_NAME


@pytest.fixture(scope="session")
def base_model() -> Path:
    return ensure_default_model(CACHE / "models")


@pytest.fixture(scope="session")
def adapter_dirs(base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Six distinct random PEFT adapters (enough to overflow the residency slots)."""
    out = tmp_path_factory.mktemp("adapters")
    return make_random_adapters(base_model, out, 6, rank=8, std=0.1, base_model_name=BASE)


@dataclass
class Server:
    url: str
    home: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120,
                            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})

    def engine_url(self) -> str:
        with self.admin() as c:
            return str(c.get("/admin/engine").json()["url"])


def _wait_healthy(server: Server, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            break
        try:
            if httpx.get(f"{server.url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    tail = server.log.read_text(errors="replace")[-4000:]
    engine_log = server.home / "logs" / "engine.log"
    if engine_log.exists():
        tail += "\n--- engine log ---\n" + engine_log.read_text(errors="replace")[-4000:]
    raise RuntimeError(f"loraplex up did not become healthy:\n{tail}")


@contextmanager
def running_server(base_model: Path, home: Path, **env_overrides: str) -> Iterator[Server]:
    """`loraplex up` as a user runs it, on a free port; Ctrl-C (and a check) when done."""
    port = free_port()
    env = up_environment(base_model, home, port, **env_overrides)
    log = home / "gateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "loraplex"), "up"], env=env,
                                stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    srv = Server(f"http://127.0.0.1:{port}", home, proc, log)
    try:
        _wait_healthy(srv, 600)
        yield srv
    finally:
        _stop_and_check_no_orphans(proc)


@pytest.fixture(scope="session")
def server(base_model: Path, adapter_dirs: list[Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    allow = str(adapter_dirs[0].parent)  # comma-separated, as documented
    with running_server(base_model, tmp_path_factory.mktemp("home"),
                        LORAPLEX_LOCAL_SOURCE_ALLOWLIST=allow) as srv:
        yield srv


def _stop_and_check_no_orphans(proc: subprocess.Popen[bytes]) -> None:
    """Ctrl-C must stop the gateway and every engine process it started."""
    if proc.poll() is not None:
        return
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    _, alive = psutil.wait_procs(children, timeout=30)
    for p in alive:
        p.kill()
    assert not alive, f"engine processes outlived the gateway: {[p.pid for p in alive]}"


@dataclass
class TenantHandle:
    id: str
    key: str
    client: OpenAI


def make_tenant(server: Server, tenant_id: str) -> TenantHandle:
    with server.admin() as c:
        r = c.post("/admin/tenants", json={"id": tenant_id})
        assert r.status_code in (201, 409), r.text
        key = c.post(f"/admin/tenants/{tenant_id}/keys", json={}).json()["key"]
    client = OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=300,
                    default_headers={"X-Tenant-ID": tenant_id})
    return TenantHandle(tenant_id, key, client)


def upload_adapter(server: Server, tenant: str, name: str, folder: Path) -> dict:
    files = {n: (n, (folder / n).read_bytes())
             for n in ("adapter_config.json", "adapter_model.safetensors")}
    with server.admin() as c:
        r = c.post(f"/admin/tenants/{tenant}/adapters/{name}/versions", files=files)
    assert r.status_code == 201, r.text
    return r.json()


def scrape_metric(base_url: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` at `base_url`/metrics whose labels include `labels`
    (the engine's own metrics, or the gateway's)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{base_url}/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


# -- `loraplex up` under a test's own control (kill it, start it again on the same folder) ------


def up_environment(base_model: Path, home: Path, port: int, **env_overrides: str) -> dict[str, str]:
    """The variables `running_server` gives `loraplex up`."""
    env = dict(os.environ)
    env.update({
        "LORAPLEX_HOME": str(home),
        "LORAPLEX_PORT": str(port),
        "LORAPLEX_ADMIN_TOKEN": ADMIN_TOKEN,
        "LORAPLEX_MODEL_PATH": str(base_model),
        "LORAPLEX_MAX_LORAS": "2",
        "LORAPLEX_MAX_RESIDENT_ADAPTERS": str(RESIDENT_SLOTS),
        "LORAPLEX_MAX_LORA_RANK": "16",
        "LORAPLEX_WORKER_LEASE_S": "6",
        **env_overrides,
    })
    return env


def start_up(base_model: Path, home: Path, *args: str, log_name: str = "gateway.log",
             **env_overrides: str) -> Server:
    """`loraplex up ARGS` on a free port, not waited for (see `wait_healthy`); the caller
    stops it (`stop_up`) or kills it."""
    port = free_port()
    log = home / log_name
    home.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "loraplex"), "up", *args],
            env=up_environment(base_model, home, port, **env_overrides),
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    return Server(f"http://127.0.0.1:{port}", home, proc, log)


def wait_healthy(server: Server, timeout_s: float = 600) -> None:
    _wait_healthy(server, timeout_s)


def is_engine_process(p: psutil.Process) -> bool:
    """A process of a vLLM server: its API server (or the guard running it), EngineCore and
    workers (titled "VLLM::...")."""
    try:
        line = " ".join(p.cmdline())
    except psutil.Error:
        return False
    return "vllm" in line or "VLLM::" in line


def engine_processes_under(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True) if is_engine_process(p)]


def stop_up(server: Server) -> None:
    """Ctrl-C, as a user stops it; every process it started must be gone (checked)."""
    _stop_and_check_no_orphans(server.proc)
