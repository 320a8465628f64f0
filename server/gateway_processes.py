"""A unit with several gateway processes (`gateway_processes` > 1) on one port.

One gateway process forwards a stream's tokens on one core; a unit in front of a fast GPU
needs several. This process binds the unit's port once and starts N gateway processes that
all accept on that socket (the kernel hands each connection to one of them). Process 0 spawns
and supervises the engine and owns its adapter slots (`server.slots_link`); the others send
inference straight to the engine and hold adapters through process 0. Metrics use
prometheus_client's multiprocess mode in a folder of the unit's own.

A unit fails as a whole: when one of its processes exits, the others are stopped and the unit
exits non-zero, for its supervisor (Kubernetes, `loraplex up --units`) to start again.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import uvicorn
from prometheus_client import multiprocess

from server.engine.process import free_port
from server.settings import Settings

log = logging.getLogger(__name__)
LISTEN_FD_ENV = "LORAPLEX_LISTEN_FD"
STOP_GRACE_S = 30.0  # a process's own drain (uvicorn 10 s, the engine's 12 s) and a margin


def process_environments(settings: Settings, model_path: Path, listen_fd: int,
                         metrics_dir: Path) -> list[dict[str, str]]:
    """The environment of each gateway process: its index, the one engine they share, the
    listening socket and the metrics folder."""
    engine_port = settings.engine_port or free_port()
    engine_url = settings.engine_url or f"http://127.0.0.1:{engine_port}"
    envs = []
    for index in range(settings.gateway_processes):
        env = dict(os.environ)
        env.update({
            "LORAPLEX_GATEWAY_PROCESS_INDEX": str(index),
            "LORAPLEX_MODEL_PATH": str(model_path),
            "LORAPLEX_ENGINE_PORT": str(engine_port),
            LISTEN_FD_ENV: str(listen_fd),
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        })
        if index > 0 or settings.engine_url:
            env["LORAPLEX_ENGINE_URL"] = engine_url  # process 0 spawns it unless external
        envs.append(env)
    return envs


def run_gateway_processes(settings: Settings, model_path: Path) -> int:
    """Serve the unit's port with `settings.gateway_processes` processes until stopped."""
    config = uvicorn.Config(app="unused", host=settings.host, port=settings.port)  # binds only
    sock = config.bind_socket()
    sock.set_inheritable(True)
    metrics_dir = settings.unit_home / "prometheus"
    shutil.rmtree(metrics_dir, ignore_errors=True)  # counts of a previous run of the unit
    metrics_dir.mkdir(parents=True)
    command = [sys.executable, "-m", "server.cli", "gateway-process"]
    processes = [subprocess.Popen(command, env=env, pass_fds=(sock.fileno(),))
                 for env in process_environments(settings, model_path, sock.fileno(),
                                                 metrics_dir)]
    sock.close()  # the processes hold it now
    stopping = threading.Event()

    def stop(_signum: int, _frame: object) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    failed = 0
    try:
        while not stopping.wait(0.5):
            for index, proc in enumerate(processes):
                if proc.poll() is not None:
                    log.error("gateway process %d exited (%s); stopping the unit", index,
                              proc.returncode)
                    failed = proc.returncode or 1
                    stopping.set()
                    break
    finally:
        for proc in processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in processes:
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            multiprocess.mark_process_dead(proc.pid, str(metrics_dir))  # type: ignore[no-untyped-call]
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return failed


def listen_fd() -> int | None:
    """The socket a gateway process of a multi-process unit accepts on (None: bind its own)."""
    value = os.environ.pop(LISTEN_FD_ENV, "")
    return int(value) if value else None
