"""The vLLM OpenAI server as a supervised child process, which never outlives its unit.

It listens on loopback only, with the hub offline (an unknown name never triggers a download)
and runtime LoRA loading on. vLLM runs under a small guard (`python -m server.engine.process`,
this module) in a process group of its own, so the gateway decides the shutdown order:

- the guard is a child subreaper: vLLM's EngineCore and worker processes re-parent to it when
  vLLM's API server dies, and once the API server is gone (it exited, it was killed, or the
  grace period after SIGTERM ran out) the guard SIGKILLs every process left in its group.
  Orphaned EngineCore processes ignore SIGTERM and keep their memory (and a GPU) otherwise;
- the guard gets SIGTERM when the gateway dies without cleaning up (PR_SET_PDEATHSIG), even on
  SIGKILL, and the vLLM server gets SIGTERM when the guard dies;
- every stop path of the gateway ends the whole group (SIGKILL after the grace period);
- the engine's process group is written to a pid file in the unit's folder; a gateway that
  starts finds an engine a killed predecessor left behind (both it and its guard SIGKILLed
  at once, by the OOM killer or `kill -9`) and ends it before starting its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the guard imports this module and needs none of the gateway
    from server.settings import Settings

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
# How long the guard lets vLLM shut down after SIGTERM before it SIGKILLs the group; the
# gateway's own grace in `EngineProcess.stop` is longer.
GUARD_GRACE_S = 8.0
# Words in the command line of every process of a vLLM server: the API server's module, the
# titles vLLM gives its EngineCore and worker processes ("VLLM::EngineCore"), and Python's
# multiprocessing resource tracker that vLLM starts.
_VLLM_MARKERS = ("vllm", "VLLM::", "multiprocessing.resource_tracker")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _prctl(option: int, value: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, value)


def _die_with_parent() -> None:
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


# -- processes, read from /proc ---------------------------------------------------------------


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    sid: int
    start: int
    """Start time in clock ticks since boot: with the pid, names one process across pid reuse."""
    state: str


def proc_info(pid: int) -> ProcInfo | None:
    """The process `pid` as /proc shows it, None when there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after "(comm)", which may itself hold spaces and parentheses: state ppid pgrp
    # session ... starttime (the 22nd field of the whole line).
    rest = stat[stat.rindex(")") + 2:].split()
    return ProcInfo(pid=pid, ppid=int(rest[1]), pgid=int(rest[2]), sid=int(rest[3]),
                    start=int(rest[19]), state=rest[0])


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace").strip()
    except OSError:
        return ""


def _all_processes() -> Iterable[ProcInfo]:
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (info := proc_info(int(entry))) is not None:
            yield info


def group_members(pgid: int) -> list[ProcInfo]:
    """Live processes of the process group `pgid` (zombies hold nothing and are left out)."""
    return [p for p in _all_processes() if p.pgid == pgid and p.state != "Z"]


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _is_gone(p: ProcInfo) -> bool:
    now = proc_info(p.pid)
    return now is None or now.start != p.start or now.state == "Z"


def kill_and_wait(procs: list[ProcInfo], timeout_s: float = 15.0) -> list[ProcInfo]:
    """SIGKILL each process (named by pid and start time, so a reused pid is never hit) and
    wait until they are gone; answers those still there after `timeout_s`."""
    for p in procs:
        if not _is_gone(p):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p.pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    left = [p for p in procs if not _is_gone(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if not _is_gone(p)]
    return left


# -- the pid file -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineRecord:
    """What the pid file says about a running engine: enough to find all of its processes, and
    to tell them from unrelated processes that got the same ids after a reboot or pid reuse."""

    pgid: int
    """Process group of the engine (the guard's pid: it leads the group)."""
    start: int
    """The group leader's start time (clock ticks since boot)."""
    boot_id: str
    port: int
    model_path: str

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.rename(path)

    @classmethod
    def read(cls, path: Path) -> EngineRecord | None:
        try:
            data = json.loads(path.read_text())
            return cls(pgid=int(data["pgid"]), start=int(data["start"]),
                       boot_id=str(data["boot_id"]), port=int(data["port"]),
                       model_path=str(data["model_path"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


def engine_processes(record: EngineRecord) -> list[ProcInfo]:
    """The live processes of the engine `record` names; [] when none is left, or when the
    process group now belongs to something else (pid reuse, another boot)."""
    if record.boot_id != boot_id():
        return []
    members = [p for p in group_members(record.pgid) if p.sid == record.pgid]
    leader = next((p for p in members if p.pid == record.pgid), None)
    if leader is not None:
        # The leader lives: it is the very process that was started (pid and start time),
        # running the engine of that model on that port.
        line = cmdline(leader.pid)
        ours = (leader.start == record.start and "vllm.entrypoints" in line
                and record.model_path in line and f"--port {record.port}" in line)
        return members if ours else []
    # The leader is gone and the group lives on: these are the orphans the pid file is for.
    # Its id cannot have been reused while they live; they started after the leader and are
    # vLLM's own processes.
    return [p for p in members
            if p.start >= record.start and any(m in cmdline(p.pid) for m in _VLLM_MARKERS)]


def end_stale_engine(pid_path: Path) -> int:
    """End the engine a previous gateway of this folder left behind, if any (SIGKILL: its
    orphaned processes ignore SIGTERM), and remove the pid file. Answers how many processes
    were ended."""
    record = EngineRecord.read(pid_path)
    if record is None:
        with contextlib.suppress(FileNotFoundError):
            pid_path.unlink()
        return 0
    stale = engine_processes(record)
    if stale:
        log.warning("ending %d processes of a stale engine (process group %d, from %s)",
                    len(stale), record.pgid, pid_path)
        left = kill_and_wait(stale)
        if left:
            raise RuntimeError(f"stale engine processes {[p.pid for p in left]} (named by "
                               f"{pid_path}) did not end after SIGKILL")
    with contextlib.suppress(FileNotFoundError):
        pid_path.unlink()
    return len(stale)


# -- the engine, as the gateway sees it ---------------------------------------------------------


class EngineProcess:
    def __init__(self, settings: Settings, model_path: Path, log_path: Path,
                 pid_path: Path | None = None) -> None:
        self.settings = settings
        self.model_path = model_path
        self.log_path = log_path
        self.pid_path = pid_path or log_path.with_suffix(".pid")
        self.port = settings.engine_port or free_port()
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._stopping = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """The vLLM server's command line."""
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

    def launch_command(self) -> list[str]:
        """What is spawned: the guard, running the vLLM server."""
        return [sys.executable, "-m", "server.engine.process", "--grace", str(GUARD_GRACE_S),
                "--", *self.command()]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_CPU_KVCACHE_SPACE": str(self.settings.engine_cpu_kvcache_gib),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "LORAPLEX_ENGINE_PARENT": str(os.getpid()),
        })
        return env

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        ended = await asyncio.to_thread(end_stale_engine, self.pid_path)
        if ended:
            log.warning("ended %d processes of a stale engine left by an earlier gateway", ended)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logfile = self.log_path.open("ab")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.launch_command(), env=self.environment(), stdin=asyncio.subprocess.DEVNULL,
                stdout=logfile, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent)
        finally:
            logfile.close()
        info = proc_info(self._proc.pid)
        if info is not None:
            EngineRecord(pgid=self._proc.pid, start=info.start, boot_id=boot_id(), port=self.port,
                         model_path=str(self.model_path)).write(self.pid_path)
        log.info("engine started (pid %s) on %s, log %s", self._proc.pid, self.url, self.log_path)

    async def supervise(self, on_restart: Callable[[], None] = lambda: None) -> None:
        """Restart the engine whenever it exits, with a growing pause, until `stop`."""
        backoff = 2.0
        while not self._stopping:
            if not self.running:
                await self.start()
            assert self._proc is not None
            code = await self._proc.wait()
            await self._end_group(self._proc.pid)  # whatever the guard could not end
            if self._stopping:
                return
            self.restarts += 1
            on_restart()
            log.error("engine exited with %s; restarting in %.0fs (see %s)", code, backoff,
                      self.log_path)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 60.0)

    async def stop(self, grace_s: float = GUARD_GRACE_S + 4) -> None:
        """SIGTERM to the guard (which stops vLLM and ends the rest), SIGKILL to the whole
        group after `grace_s`; returns once no process of the engine is left."""
        self._stopping = True
        proc = self._proc
        if proc is not None:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), grace_s)
                except asyncio.TimeoutError:
                    log.warning("engine did not stop within %.0fs; killing it", grace_s)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    await proc.wait()
            await self._end_group(proc.pid)
            log.info("engine stopped")
        with contextlib.suppress(FileNotFoundError):
            self.pid_path.unlink()

    async def _end_group(self, pgid: int) -> None:
        left = await asyncio.to_thread(kill_and_wait, group_members(pgid))
        if left:
            log.error("engine processes %s survived SIGKILL", [p.pid for p in left])

    def tail_log(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# -- the guard: `python -m server.engine.process --grace S -- CMD...` ----------------------------


def _descendants_and_group(me: int) -> list[ProcInfo]:
    """Every other process of this group, and this process's children (orphans re-parented to
    this subreaper, whatever their group)."""
    return [p for p in _all_processes()
            if p.pid != me and p.state != "Z" and (p.pgid == me or p.ppid == me)]


def _reap_orphans(me: int, keep: int) -> None:
    """Reap the exited orphans re-parented here (not `keep`, whose status Popen reads)."""
    for p in _all_processes():
        if p.ppid == me and p.pid != keep and p.state == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(p.pid, os.WNOHANG)


def guard(command: list[str], grace_s: float) -> int:
    """Run `command` and, once it has exited (or `grace_s` after SIGTERM/SIGINT, which it is
    passed on to), SIGKILL everything it left; answers its exit status."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    parent = int(os.environ.pop("LORAPLEX_ENGINE_PARENT", "0") or 0)
    if parent and os.getppid() != parent:
        return 1  # the gateway died before it could ask to take this process with it
    stop_at: list[float] = []
    child: subprocess.Popen[bytes] | None = None

    def on_signal(signum: int, _frame: object) -> None:
        if not stop_at:
            stop_at.append(time.monotonic() + grace_s)
        if child is not None and child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    child = subprocess.Popen(command, preexec_fn=_die_with_parent)
    if stop_at:  # a signal came before the child existed
        child.send_signal(signal.SIGTERM)
    me = os.getpid()
    code: int | None = None
    while code is None and not (stop_at and time.monotonic() > stop_at[0]):
        with contextlib.suppress(subprocess.TimeoutExpired):
            code = child.wait(0.5)
    for _ in range(3):  # SIGKILLed processes' children may re-parent here meanwhile
        left = _descendants_and_group(me)
        if not left:
            break
        kill_and_wait(left, timeout_s=5.0)
        _reap_orphans(me, child.pid)
    code = child.wait()
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m server.engine.process",
                                     usage="%(prog)s [--grace S] -- COMMAND...",
                                     description=guard.__doc__)
    parser.add_argument("--grace", type=float, default=GUARD_GRACE_S)
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        parser.error("no command to run")
    return guard(command, args.grace)


if __name__ == "__main__":
    sys.exit(main())
