"""`loraplex up --units N`: N serving units on one box behind a real Envoy, and the workers.

Each unit is a `loraplex unit` process (one gateway + its vLLM engine) on its own loopback
port, with its own folder `<home>/units/<i>/` (engine log, engine pid file, disk cache); the
registry, the store and the secrets stay shared in the data folder. Unit i gets GPU i when the
box has GPUs, otherwise N small CPU engines share the host memory. Envoy
(`server.cluster.envoy`) listens on `LORAPLEX_PORT` in front of them.

Supervision: a unit, Envoy or a worker that exits is started again after a pause that grows
with each exit in a row (2 s .. 60 s) and the log says so. Stopping stops Envoy, then the units
(each stops its own engine), then the workers. Every child gets SIGTERM when this process dies
(PR_SET_PDEATHSIG), even on SIGKILL; a unit's engine guard and pid file do the rest
(`server.engine.process`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from server.cluster.envoy import (
    EnvoyError,
    envoy_command,
    render_envoy_config,
    to_yaml,
    validate_envoy_config,
)
from server.engine.process import _die_with_parent, end_stale_engine, free_port
from server.settings import Settings

Say = Callable[[str], None]

FIRST_BACKOFF_S = 2.0
MAX_BACKOFF_S = 60.0
STEADY_S = 60.0
"""A child that ran this long without exiting starts over from the first pause."""
UNIT_STOP_S = 40.0
"""A unit's graceful stop: uvicorn's drain (10 s), then its engine's (12 s); SIGKILL after."""
ENVOY_STOP_S = 10.0
WORKER_STOP_S = 15.0
HEALTH_POLL_S = 2.0


class ClusterError(RuntimeError):
    """`up --units N` cannot start as asked (the message says why); nothing was started."""


@dataclass(frozen=True)
class Unit:
    index: int
    port: int
    folder: Path
    gpu: str | None
    """CUDA device of the unit (CUDA_VISIBLE_DEVICES), None on a box without GPUs."""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def name(self) -> str:
        return f"unit {self.index}"


# -- planning: what runs where ------------------------------------------------------------------


def gpu_ids() -> list[str]:
    """The GPUs units may use: CUDA_VISIBLE_DEVICES when set, else every GPU `nvidia-smi -L`
    lists; [] on a box without an NVIDIA driver."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    try:
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if done.returncode != 0:
        return []
    return [str(i) for i, line in enumerate(
        line for line in done.stdout.splitlines() if line.startswith("GPU "))]


def plan_units(settings: Settings, count: int, gpus: Sequence[str]) -> list[Unit]:
    """Unit i: a free loopback port (kept across its restarts), `<home>/units/<i>`, GPU i."""
    if count < 1:
        raise ClusterError("--units must be at least 1")
    if settings.engine_url is not None:
        raise ClusterError("--units N runs one engine per unit: unset LORAPLEX_ENGINE_URL")
    if gpus and count > len(gpus):
        raise ClusterError(f"--units {count} needs {count} GPUs; this box has {len(gpus)} "
                           f"({', '.join(gpus)})")
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports and port != settings.port:
            ports.append(port)
    return [Unit(i, ports[i], settings.home / "units" / str(i), gpus[i] if gpus else None)
            for i in range(count)]


def unit_environment(settings: Settings, unit: Unit, count: int, model_path: Path,
                     base: dict[str, str]) -> dict[str, str]:
    """The variables of unit `unit`'s `loraplex unit` process, on top of `base`."""
    env = {**base,
           "LORAPLEX_HOME": str(settings.home),
           "LORAPLEX_MODEL_PATH": str(model_path),
           "LORAPLEX_HOST": "127.0.0.1",
           "LORAPLEX_PORT": str(unit.port),
           "LORAPLEX_UNIT_DIR": str(unit.folder),
           "LORAPLEX_UNIT_NAME": unit.address,
           "LORAPLEX_ENGINE_PORT": str(settings.engine_port + unit.index
                                       if settings.engine_port else 0),
           "LORAPLEX_PARENT_PID": str(os.getpid()),
           "HF_HUB_OFFLINE": "1"}
    if unit.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = unit.gpu
    elif "engine_cpu_kvcache_gib" not in settings.model_fields_set:
        # N CPU engines share the host memory: each gets its share of the default KV cache.
        env["LORAPLEX_ENGINE_CPU_KVCACHE_GIB"] = str(
            max(1, settings.engine_cpu_kvcache_gib // count))
    return env


def worker_environment(settings: Settings, model_path: Path,
                       base: dict[str, str]) -> dict[str, str]:
    return {**base, "LORAPLEX_HOME": str(settings.home), "LORAPLEX_MODEL_PATH": str(model_path),
            "HF_HUB_OFFLINE": "1"}


def write_envoy_config(settings: Settings, units: Sequence[Unit]) -> Path:
    """The front's configuration in `<home>/envoy.yaml`, checked by Envoy itself."""
    config = render_envoy_config([u.address for u in units], listen_port=settings.port,
                                 listen_host=settings.host, admin_port=0)
    path = settings.home / "envoy.yaml"
    path.write_text(to_yaml(config, "Written by `loraplex up --units N` at each start."))
    try:
        validate_envoy_config(path)
    except EnvoyError as exc:
        raise ClusterError(str(exc)) from exc
    return path


def check_port_free(host: str, port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ClusterError(f"cannot listen on {host}:{port} ({exc.strerror}): "
                               "set LORAPLEX_PORT to a free port") from exc


# -- supervision --------------------------------------------------------------------------------


class Child:
    """One supervised process: started in a session of its own (Ctrl-C reaches only `up`,
    which stops children in order), killed with `up` (PR_SET_PDEATHSIG), restarted when it
    exits, after a growing pause."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._backoff = FIRST_BACKOFF_S
        self._started_at = 0.0
        self._restart_at: float | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        self._started_at = time.monotonic()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self, now: float, say: Say) -> bool:
        """Restart the process if it exited and its pause is over; answers whether it exited
        since the last check."""
        if self.proc is None:
            return False
        if self._restart_at is not None:
            if now >= self._restart_at:
                self._restart_at = None
                self.start()
                say(f"{self.name} restarted (pid {self.proc.pid})")
            return False
        code = self.proc.poll()
        if code is None:
            if now - self._started_at >= STEADY_S:
                self._backoff = FIRST_BACKOFF_S
            return False
        self.restarts += 1
        last = last_line(self.log_path)
        say(f"{self.name} exited with {describe_exit(code)}; restarting in "
            f"{self._backoff:.0f}s (log: {self.log_path}{': ' + last if last else ''})")
        self._restart_at = now + self._backoff
        self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)
        return True

    def terminate(self) -> None:
        self._restart_at = None
        if self.running:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()


def last_line(path: Path, max_bytes: int = 4096) -> str:
    """The last line a child wrote (often the reason it exited), shortened."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - max_bytes))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].strip()[:300] if lines else ""


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


def stop_all(children: Sequence[Child], grace_s: float, say: Say) -> None:
    """SIGTERM to each, then wait for all together; SIGKILL whatever is left after `grace_s`."""
    for child in children:
        child.terminate()
    deadline = time.monotonic() + grace_s
    for child in children:
        if child.proc is None:
            continue
        try:
            child.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            say(f"{child.name} did not stop within {grace_s:.0f}s; killing it")
            child.proc.kill()
            child.proc.wait()


def healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.5).status_code == 200
    except httpx.HTTPError:
        return False


def loraplex_command(subcommand: str) -> list[str]:
    return [sys.executable, "-m", "server.cli", subcommand]


@dataclass
class Cluster:
    settings: Settings
    units: list[Unit]
    envoy_config: Path
    unit_command: list[str] = field(default_factory=lambda: loraplex_command("unit"))
    worker_command: list[str] = field(default_factory=lambda: loraplex_command("worker"))

    @classmethod
    def plan(cls, settings: Settings, count: int) -> Cluster:
        """Check everything that can be checked before starting anything (clear errors):
        engine settings, GPUs, the front port, Envoy's acceptance of its configuration. A
        stale engine of an earlier `loraplex up` on this folder is ended."""
        units = plan_units(settings, count, gpu_ids())
        check_port_free(settings.host, settings.port)
        settings.home.mkdir(parents=True, exist_ok=True)
        envoy_config = write_envoy_config(settings, units)
        end_stale_engine(settings.engine_pid_path)  # of a `loraplex up` with one unit
        return cls(settings, units, envoy_config)

    @property
    def front_url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    def run(self, model_path: Path, say: Say, stop: threading.Event | None = None) -> int:
        """Start units, Envoy and workers (serving the base model at `model_path`), supervise
        them until SIGTERM/SIGINT (or `stop`), then stop them in that order."""
        stop = stop or threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop.set())
        base = dict(os.environ)
        logs = self.settings.home / "logs"
        units = [Child(u.name, self.unit_command,
                       unit_environment(self.settings, u, len(self.units), model_path, base),
                       u.folder / "logs" / "unit.log") for u in self.units]
        envoy = Child("envoy", envoy_command(self.envoy_config, admin_address_path=(
            self.settings.home / "envoy-admin-address")), base, logs / "envoy.log")
        workers = [Child(f"training worker {i}", self.worker_command,
                         worker_environment(self.settings, model_path, base),
                         logs / f"worker-{i}.log") for i in range(self.settings.workers)]
        try:
            for unit, child in zip(self.units, units, strict=True):
                child.start()
                where = f" on GPU {unit.gpu}" if unit.gpu is not None else ""
                say(f"{unit.name} on {unit.address}{where} (log: {child.log_path}, engine log: "
                    f"{unit.folder / 'logs' / 'engine.log'})")
            envoy.start()
            say(f"envoy on {self.front_url} (log: {envoy.log_path})")
            for child in workers:
                child.start()
                say(f"{child.name} started (log: {child.log_path})")
            self._supervise(units, envoy, workers, say, stop)
        finally:
            say("stopping: envoy, then units, then workers")
            stop_all([envoy], ENVOY_STOP_S, say)
            stop_all(units, UNIT_STOP_S, say)
            stop_all(workers, WORKER_STOP_S, say)
            say("stopped")
        return 0

    def _supervise(self, units: list[Child], envoy: Child, workers: list[Child], say: Say,
                   stop: threading.Event) -> None:
        ready = [False] * len(units)
        front_ready = False
        while not stop.wait(HEALTH_POLL_S):
            now = time.monotonic()
            for i, (unit, child) in enumerate(zip(self.units, units, strict=True)):
                if child.check(now, say):
                    ready[i] = False
                elif not ready[i] and child.running and healthy(
                        f"http://{unit.address}/healthz"):
                    ready[i] = True
                    say(f"{unit.name} ready ({unit.address})")
            if envoy.check(now, say):
                front_ready = False
            elif not front_ready and any(ready) and healthy(f"{self.front_url}/healthz"):
                front_ready = True
                say(f"front ready: {self.front_url}")
            for child in workers:
                child.check(now, say)
