"""The vLLM OpenAI server as a supervised child process.

It listens on loopback only, with the hub offline (an unknown name never triggers a download)
and runtime LoRA loading on. It runs in its own process group, so the gateway decides the
shutdown order, and it gets SIGTERM if the gateway dies without cleaning up (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shlex
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from server.settings import Settings

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EngineProcess:
    def __init__(self, settings: Settings, model_path: Path, log_path: Path) -> None:
        self.settings = settings
        self.model_path = model_path
        self.log_path = log_path
        self.port = settings.engine_port or free_port()
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._stopping = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        s = self.settings
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_path),
            "--served-model-name", s.model_name,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--enable-lora",
            "--max-loras", str(s.max_loras),
            "--max-cpu-loras", str(s.max_resident_adapters),
            "--max-lora-rank", str(s.max_lora_rank),
            "--max-model-len", str(s.max_model_len),
            "--gpu-memory-utilization", str(s.engine_memory_fraction),
            "--disable-uvicorn-access-log",
            *shlex.split(s.engine_extra_args),
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_CPU_KVCACHE_SPACE": str(self.settings.engine_cpu_kvcache_gib),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        })
        return env

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logfile = self.log_path.open("ab")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.command(), env=self.environment(), stdin=asyncio.subprocess.DEVNULL,
                stdout=logfile, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent)
        finally:
            logfile.close()
        log.info("engine started (pid %s) on %s, log %s", self._proc.pid, self.url, self.log_path)

    async def supervise(self, on_restart: Callable[[], None] = lambda: None) -> None:
        """Restart the engine whenever it exits, with a growing pause, until `stop`."""
        backoff = 2.0
        while not self._stopping:
            if not self.running:
                await self.start()
            assert self._proc is not None
            code = await self._proc.wait()
            if self._stopping:
                return
            self.restarts += 1
            on_restart()
            log.error("engine exited with %s; restarting in %.0fs (see %s)", code, backoff,
                      self.log_path)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 60.0)

    async def stop(self, grace_s: float = 10.0) -> None:
        self._stopping = True
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        log.info("engine stopped")

    def tail_log(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
