"""A unit never leaves an engine behind: the guard, the stop paths and the pid file.

A stand-in engine plays vLLM: a "vllm.entrypoints" process (it exits on SIGTERM) with an
"VLLM::EngineCore" child that ignores SIGTERM, as vLLM's orphaned EngineCore processes do.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.engine.process import (
    EngineProcess,
    EngineRecord,
    ProcInfo,
    boot_id,
    end_stale_engine,
    engine_processes,
    group_members,
    proc_info,
)
from server.settings import Settings

CORE = textwrap.dedent("""
    import signal, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("ready", flush=True)
    time.sleep(600)
""")
LEADER = textwrap.dedent(f"""
    import os, signal, subprocess, sys, time
    core = subprocess.Popen([sys.executable, "-c", {CORE!r}, "VLLM::EngineCore"],
                            stdout=subprocess.PIPE)
    core.stdout.readline()
    print(core.pid, flush=True)
    if "--crash" in sys.argv:
        os._exit(3)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    time.sleep(600)
""")
MODEL = "/models/stand-in"


def engine_command(port: int, *extra: str) -> list[str]:
    return [sys.executable, "-c", LEADER, "vllm.entrypoints.openai.api_server",
            "--model", MODEL, "--port", str(port), *extra]


class StandInEngine(EngineProcess):
    def command(self) -> list[str]:
        return engine_command(self.port)


def wait_for(predicate, what: str, limit_s: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def alive(p: ProcInfo) -> bool:
    now = proc_info(p.pid)
    return now is not None and now.start == p.start and now.state != "Z"


@pytest.fixture
def stand_ins() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Stand-in engines started by a test, each in a group of its own; all ended afterwards."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        for p in group_members(proc.pid):
            os.kill(p.pid, signal.SIGKILL)
        proc.kill()
        proc.wait()


def start_stand_in(started: list[subprocess.Popen[bytes]], port: int = 4321,
                   command: list[str] | None = None) -> tuple[subprocess.Popen[bytes], ProcInfo]:
    proc = subprocess.Popen(command or engine_command(port), stdout=subprocess.PIPE,
                            start_new_session=True)
    started.append(proc)
    assert proc.stdout is not None
    core = proc_info(int(proc.stdout.readline()))
    assert core is not None and core.pgid == proc.pid
    return proc, core


def record_of(proc: subprocess.Popen[bytes], port: int = 4321) -> EngineRecord:
    info = proc_info(proc.pid)
    assert info is not None
    return EngineRecord(pgid=proc.pid, start=info.start, boot_id=boot_id(), port=port,
                        model_path=MODEL)


def test_a_stale_engine_is_ended_and_its_pid_file_removed(tmp_path: Path, stand_ins) -> None:  # type: ignore[no-untyped-def]
    proc, core = start_stand_in(stand_ins)
    pid_file = tmp_path / "engine.pid"
    record_of(proc).write(pid_file)
    assert EngineRecord.read(pid_file) == record_of(proc)

    assert end_stale_engine(pid_file) == 2
    assert proc.wait(5) == -signal.SIGKILL
    assert not alive(core)
    assert not pid_file.exists()


def test_orphans_of_a_dead_engine_server_are_found_by_their_group(tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                 stand_ins) -> None:
    # What a SIGKILLed unit leaves: the API server is gone, its EngineCore lives on, orphaned,
    # and SIGTERM does nothing to it.
    proc, core = start_stand_in(stand_ins)
    record = record_of(proc)
    proc.kill()
    proc.wait()
    os.kill(core.pid, signal.SIGTERM)
    time.sleep(0.2)
    assert alive(core)
    assert [p.pid for p in engine_processes(record)] == [core.pid]

    pid_file = tmp_path / "engine.pid"
    record.write(pid_file)
    assert end_stale_engine(pid_file) == 1
    wait_for(lambda: not alive(core), "the orphan to be gone", 5)


@pytest.mark.parametrize("change", ["start", "port", "model_path", "boot_id"])
def test_a_pid_file_naming_someone_else_kills_nothing(tmp_path: Path, stand_ins,  # type: ignore[no-untyped-def]
                                                      change: str) -> None:
    # A reused pid (other start time), another unit's engine (port, model), another boot.
    proc, core = start_stand_in(stand_ins)
    fields = vars(record_of(proc))
    fields[change] = {"start": fields["start"] + 1, "port": 1, "model_path": "/other",
                      "boot_id": "another-boot"}[change]
    pid_file = tmp_path / "engine.pid"
    EngineRecord(**fields).write(pid_file)

    assert end_stale_engine(pid_file) == 0
    assert proc.poll() is None and alive(core)
    assert not pid_file.exists()


def test_a_group_that_is_not_vllm_is_never_killed(tmp_path: Path, stand_ins) -> None:  # type: ignore[no-untyped-def]
    proc = subprocess.Popen(["sleep", "600"], start_new_session=True)
    stand_ins.append(proc)
    info = proc_info(proc.pid)
    assert info is not None
    record = EngineRecord(pgid=proc.pid, start=info.start, boot_id=boot_id(), port=4321,
                          model_path=MODEL)
    assert engine_processes(record) == []
    proc.kill()
    proc.wait()
    assert engine_processes(record) == []


def test_unreadable_or_missing_pid_files_are_harmless(tmp_path: Path) -> None:
    assert end_stale_engine(tmp_path / "none.pid") == 0
    bad = tmp_path / "bad.pid"
    bad.write_text("{not json")
    assert end_stale_engine(bad) == 0
    assert not bad.exists()


# -- the guard and the gateway's stop paths ---------------------------------------------------


def stand_in_engine(tmp_path: Path) -> StandInEngine:
    return StandInEngine(Settings(home=tmp_path), Path(MODEL), tmp_path / "logs" / "engine.log",
                         tmp_path / "engine.pid")


def engine_group(engine: EngineProcess) -> list[ProcInfo]:
    record = EngineRecord.read(engine.pid_path)
    assert record is not None
    return group_members(record.pgid)


async def test_stop_ends_every_process_of_the_engine(tmp_path: Path) -> None:
    engine = stand_in_engine(tmp_path)
    await engine.start()
    record = EngineRecord.read(engine.pid_path)
    assert record is not None and engine_processes(record)
    await asyncio.to_thread(wait_for, lambda: len(engine_group(engine)) == 3,
                            "guard, server and core")
    members = engine_group(engine)

    started = time.monotonic()
    await engine.stop()
    assert time.monotonic() - started < 5, "the server stops at once; the core is SIGKILLed"
    assert not any(alive(p) for p in members)
    assert not engine.pid_path.exists()


async def test_a_crashed_engine_leaves_nothing_and_is_restarted(tmp_path: Path) -> None:
    groups: list[int] = []

    class Crashing(StandInEngine):
        def command(self) -> list[str]:
            return engine_command(self.port, *(["--crash"] if self.restarts == 0 else []))

        async def start(self) -> None:
            await super().start()
            record = EngineRecord.read(self.pid_path)
            assert record is not None
            groups.append(record.pgid)

    engine = Crashing(Settings(home=tmp_path), Path(MODEL), tmp_path / "engine.log",
                      tmp_path / "engine.pid")
    restarted = asyncio.Event()
    supervise = asyncio.create_task(engine.supervise(on_restart=restarted.set))
    try:
        await asyncio.wait_for(restarted.wait(), 15)
        # The first server exited at once; its core, which ignores SIGTERM, is gone too.
        assert group_members(groups[0]) == []
        await asyncio.to_thread(wait_for, lambda: len(groups) == 2 and engine.running,
                                "the restart")
    finally:
        await engine.stop()
        await supervise
    assert not engine.running and group_members(groups[-1]) == []


UNIT = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from tests.unit.test_engine_processes import stand_in_engine

    async def main() -> None:
        engine = stand_in_engine(Path(sys.argv[1]))
        await engine.start()
        print("started", flush=True)
        await asyncio.sleep(600)

    asyncio.run(main())
""")


def test_a_sigkilled_unit_leaves_no_engine_behind(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    unit = subprocess.Popen([sys.executable, "-c", UNIT, str(tmp_path), str(repo)],
                            stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert unit.stdout is not None and unit.stdout.readline().strip() == b"started"
        record = EngineRecord.read(tmp_path / "engine.pid")
        assert record is not None
        wait_for(lambda: len(group_members(record.pgid)) == 3, "guard, server and core")
        members = group_members(record.pgid)

        unit.kill()  # no cleanup code of the unit runs
        unit.wait()
        wait_for(lambda: not any(alive(p) for p in members), "the engine to be gone", 10)
    finally:
        unit.kill()
        unit.wait()


async def test_start_ends_the_stale_engine_of_the_same_folder(tmp_path: Path, stand_ins) -> None:  # type: ignore[no-untyped-def]
    proc, core = start_stand_in(stand_ins)
    engine = stand_in_engine(tmp_path)
    record_of(proc).write(engine.pid_path)
    await engine.start()
    try:
        await asyncio.to_thread(wait_for, lambda: not alive(core) and proc.poll() is not None,
                                "the stale engine to be ended", 5)
        new = EngineRecord.read(engine.pid_path)
        assert new is not None and new.pgid != proc.pid and engine_processes(new)
    finally:
        await engine.stop()


def test_the_guard_passes_on_the_exit_status_and_ends_the_rest(tmp_path: Path) -> None:
    guard = subprocess.Popen([sys.executable, "-m", "server.engine.process", "--grace", "1",
                              "--", *engine_command(4321, "--crash")],
                             stdout=subprocess.PIPE, start_new_session=True)
    assert guard.stdout is not None
    core = proc_info(int(guard.stdout.readline()))
    assert core is not None
    assert guard.wait(10) == 3
    assert not alive(core)
    assert group_members(guard.pid) == []
