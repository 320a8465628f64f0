"""Engine defaults by measurement (issue 12 item 4): the real vLLM CPU engine under loraplex,
one engine configuration after another.

For each configuration (max_lora_rank / max_loras / max_cpu_loras) it starts `loraplex up`
(temporary data folder, the default model), registers random PEFT adapters of one rank
(q/v projections), and measures through the gateway, streamed chat with `ignore_eos`:
  - base-model requests at 1 and at 8 streams,
  - adapter requests at 1 and at 8 streams, spread over min(8, max_loras) adapters, all
    already loaded into the engine,
  - time to first token (p50),
  - the engine's start time (`loraplex up` -> /healthz 200) and the resident memory (RSS,
    psutil) of the engine's processes: once started, and after max_cpu_loras adapters were
    loaded (every residency slot full).

Only one real vLLM engine may run on the machine at a time: before each configuration it
waits until `pgrep -f vllm.entrypoints` finds none, and it stops its engine after each.

    .venv/bin/python loadtest/bench_engine_sweep.py
    .venv/bin/python loadtest/bench_engine_sweep.py --configs 16/4/16 --requests 2 4

A configuration is RANK/MAX_LORAS/MAX_CPU_LORAS. Loopback only, bounded by --requests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from bench import (  # noqa: E402
    ADMIN,
    Summary,
    _interrupt,
    bench_tenant,
    one_stream,
    print_table,
    run_level,
    started,
    summarize,
    wait_healthy,
)

from adapters.base_model import ensure_default_model  # noqa: E402
from adapters.synthetic import make_random_adapters  # noqa: E402
from server.engine.process import free_port  # noqa: E402
from server.settings import DEFAULT_MODEL_NAME  # noqa: E402

# The sweep: max_lora_rank at 4 slots; max_loras at rank 16; max_cpu_loras at rank 16, 4 slots.
DEFAULT_CONFIGS = ["8/4/16", "16/4/16", "32/4/16", "64/4/16", "16/1/16", "16/8/16",
                   "16/4/8", "16/4/32"]
GIB = 1 << 30


@dataclass(frozen=True)
class Config:
    rank: int
    max_loras: int
    cpu_loras: int

    @classmethod
    def parse(cls, text: str) -> Config:
        rank, loras, cpu = (int(x) for x in text.split("/"))
        return cls(rank, loras, cpu)

    @property
    def label(self) -> str:
        return f"rank {self.rank}, loras {self.max_loras}, cpu {self.cpu_loras}"

    @property
    def spread(self) -> int:
        """Adapters the adapter workloads are spread over."""
        return min(8, self.max_loras)


@dataclass
class Result:
    config: Config
    load_before: float
    start_s: float = 0.0
    rss_start: float = 0.0  # bytes, engine processes once healthy
    rss_full: float = 0.0  # bytes, after max_cpu_loras adapters were loaded
    resident: int = 0  # adapters resident in the engine when rss_full was taken
    rows: dict[str, Summary] = field(default_factory=dict)
    error: str | None = None


def load_avg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def wait_for_no_engine(poll_s: float = 10.0) -> None:
    """Block while any vLLM server runs on this machine (ours or anyone's)."""
    while True:
        found = subprocess.run(["pgrep", "-f", "vllm.entrypoints"], capture_output=True,
                               text=True).stdout.split()
        if not found:
            return
        print(f"  waiting: a vLLM engine is running (pids {' '.join(found)}); "
              f"polling every {poll_s:.0f} s", flush=True)
        time.sleep(poll_s)


def engine_processes(gateway: psutil.Process) -> list[psutil.Process]:
    """Everything `loraplex up` started: the guard, vLLM's API server, EngineCore, ..."""
    return list(gateway.children(recursive=True))


def rss_of(processes: list[psutil.Process]) -> float:
    total = 0
    for p in processes:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return float(total)


def rss_by_process(processes: list[psutil.Process]) -> str:
    parts = []
    for p in processes:
        with contextlib.suppress(psutil.Error):
            words = p.cmdline()
            name = next((w for w in words if w.startswith(("vllm.", "server."))), p.name())
            parts.append(f"{name} {p.memory_info().rss / GIB:.2f}")
    return ", ".join(parts)


def status_of(p: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return str(p.status())
    return "gone"


def end_leftovers(processes: list[psutil.Process]) -> None:
    """SIGKILL any process of our engine that outlived `loraplex up` (orphaned vLLM workers
    ignore SIGTERM). psutil names each by pid and start time, so a reused pid is never hit.
    A zombie (already dead, waiting for this container's init to reap it) is only reported."""
    alive = [p for p in processes if p.is_running()]
    names = []
    for p in alive:
        with contextlib.suppress(psutil.Error):
            names.append(f"{p.pid} {p.name()} ({status_of(p)})")
            if p.status() != psutil.STATUS_ZOMBIE:
                p.kill()
    _, still = psutil.wait_procs(alive, timeout=15)
    if still:
        print(f"  WARNING: engine processes {[p.pid for p in still]} still there after 15 s")
    elif alive:
        print(f"  engine processes still there when `loraplex up` had exited (all gone now): "
              f"{', '.join(names)}")


async def fill(url: str, headers: dict[str, str], models: list[str], concurrency: int) -> None:
    """One 1-token request per model, `concurrency` at a time: each gets loaded."""
    await run_level(url, headers, models, min(concurrency, len(models)), len(models), 1)


def measure(config: Config, model: Path, folders: list[Path], args: argparse.Namespace,
            result: Result) -> None:
    home = Path(tempfile.mkdtemp(prefix="loraplex-sweep-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, LORAPLEX_HOME=str(home), LORAPLEX_PORT=str(port),
               LORAPLEX_ADMIN_TOKEN=ADMIN, LORAPLEX_MODEL_PATH=str(model),
               LORAPLEX_WORKERS="0", LORAPLEX_MAX_LORA_RANK=str(config.rank),
               LORAPLEX_MAX_LORAS=str(config.max_loras),
               LORAPLEX_MAX_RESIDENT_ADAPTERS=str(config.cpu_loras))
    seen: list[psutil.Process] = []
    t0 = time.monotonic()
    try:
        with started([str(Path(sys.executable).parent / "loraplex"), "up"],
                     home / "gateway.log", env) as proc:
            wait_healthy(url, proc, args.start_timeout)
            result.start_s = time.monotonic() - t0
            gateway = psutil.Process(proc.pid)
            seen = engine_processes(gateway)
            time.sleep(2)  # let the engine settle after its first health answer
            result.rss_start = rss_of(engine_processes(gateway))
            print(f"  engine start {result.start_s:.1f} s, RSS {result.rss_start / GIB:.2f} GiB "
                  f"in {len(seen)} processes: {rss_by_process(seen)}", flush=True)
            admin, headers = bench_tenant(url)
            count = max(config.spread, config.cpu_loras)
            for i, folder in enumerate(folders[:count]):
                files = {n: (n, (folder / n).read_bytes())
                         for n in ("adapter_config.json", "adapter_model.safetensors")}
                admin.post(f"/admin/tenants/bench/adapters/a{i}/versions",
                           files=files).raise_for_status()
            asyncio.run(workloads(config, url, headers, args, result))
            seen += [p for p in engine_processes(gateway) if p not in seen]
            result.rss_full = rss_of(engine_processes(gateway))
            adapters = admin.get("/admin/engine").json()["adapters"]
            result.resident = len(adapters["resident"])
            print(f"  {result.resident} adapters resident (loads {adapters['stats']}): RSS "
                  f"{result.rss_full / GIB:.2f} GiB", flush=True)
    except Exception as exc:  # noqa: BLE001 - one failed configuration must not end the sweep
        result.error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
        for log in sorted(home.rglob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-15:]
            print(f"  --- {log.name} (last lines)\n    " + "\n    ".join(tail))
    finally:
        end_leftovers(seen)


async def workloads(config: Config, url: str, headers: dict[str, str],
                    args: argparse.Namespace, result: Result) -> None:
    chat = f"{url}/v1/chat/completions"
    names = [f"a{i}" for i in range(config.spread)]
    async with httpx.AsyncClient(timeout=600) as c:
        await one_stream(c, chat, headers, DEFAULT_MODEL_NAME, 4)  # warm the engine
    await fill(chat, headers, names, 8)  # load the workload's adapters
    one, many = args.requests
    plan = [("base @ 1", [DEFAULT_MODEL_NAME], 1, one),
            ("base @ 8", [DEFAULT_MODEL_NAME], 8, many),
            ("adapter @ 1", names, 1, one),
            ("adapter @ 8", names, 8, many)]
    for label, models, conc, n in plan:
        run = await run_level(chat, headers, models, conc, n, args.max_tokens)
        summary = summarize(f"{label} ({len(models)} model{'s' * (len(models) > 1)})", [run])
        result.rows[label] = summary
        print(f"  {summary.label}: {summary.tok_s:.1f} tok/s, TTFT p50 "
              f"{summary.ttft_p50 * 1000:.0f} ms", flush=True)
    # Every residency slot full (max_cpu_loras adapters in the engine), for the memory figure.
    await fill(chat, headers, [f"a{i}" for i in range(max(config.spread, config.cpu_loras))], 8)


def tok_s(result: Result, label: str) -> str:
    row = result.rows.get(label)
    return f"{row.tok_s:.1f}" if row else "-"


def ttft(result: Result, label: str) -> str:
    row = result.rows.get(label)
    return f"{row.ttft_p50 * 1000:.0f}" if row else "-"


def print_summary(results: list[Result]) -> None:
    print(f"{'configuration':30} {'base tok/s':>12} {'adapter tok/s':>13} "
          f"{'TTFT p50 ms base':>17} {'TTFT p50 ms adapter':>20} {'start':>6} "
          f"{'RSS GiB':>13} {'load':>5}")
    print(f"{'(rank, max_loras, max_cpu_loras)':30} {'@1 / @8':>12} {'@1 / @8':>13} "
          f"{'@1 / @8':>17} {'@1 / @8':>20} {'s':>6} {'start / full':>13} {'1min':>5}")
    for r in results:
        if r.error and not r.rows:
            print(f"{r.config.label:30} FAILED: {r.error}")
            continue
        print(f"{r.config.label:30} "
              f"{tok_s(r, 'base @ 1') + ' / ' + tok_s(r, 'base @ 8'):>12} "
              f"{tok_s(r, 'adapter @ 1') + ' / ' + tok_s(r, 'adapter @ 8'):>13} "
              f"{ttft(r, 'base @ 1') + ' / ' + ttft(r, 'base @ 8'):>17} "
              f"{ttft(r, 'adapter @ 1') + ' / ' + ttft(r, 'adapter @ 8'):>20} "
              f"{r.start_s:>6.1f} "
              f"{f'{r.rss_start / GIB:.2f} / {r.rss_full / GIB:.2f}':>13} "
              f"{r.load_before:>5.2f}" + (f"  (error: {r.error})" if r.error else ""))


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupt)  # a timeout or kill still stops the engine
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                   help="RANK/MAX_LORAS/MAX_CPU_LORAS each (default: the whole sweep)")
    p.add_argument("--requests", type=int, nargs=2, default=[8, 24], metavar=("AT1", "AT8"),
                   help="requests per workload at 1 stream and at 8 streams")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--adapter-rank", type=int, default=8,
                   help="rank of every adapter (q_proj, v_proj); the same in every "
                        "configuration, so only the engine settings change")
    p.add_argument("--start-timeout", type=float, default=600)
    args = p.parse_args()
    configs = [Config.parse(c) for c in args.configs]
    if bad := [c.label for c in configs if c.rank < args.adapter_rank]:
        p.error(f"--adapter-rank {args.adapter_rank} is above max_lora_rank of {bad}")

    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"server code: {Path(sys.modules['server'].__file__ or '').parent}")
    print(f"started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, load average {load_avg()}, "
          f"{os.cpu_count()} cores, {psutil.virtual_memory().total / GIB:.0f} GiB", flush=True)
    model = ensure_default_model(HERE.parent / ".cache" / "models")
    count = max(max(c.spread, c.cpu_loras) for c in configs)
    made = Path(tempfile.mkdtemp(prefix="loraplex-sweep-adapters-"))
    folders = make_random_adapters(model, made, count, rank=args.adapter_rank,
                                   targets=("q_proj", "v_proj"),
                                   base_model_name=DEFAULT_MODEL_NAME)
    print(f"{count} adapters of rank {args.adapter_rank} (q_proj, v_proj); "
          f"{args.requests[0]} requests at 1 stream, {args.requests[1]} at 8, "
          f"{args.max_tokens} tokens each (ignore_eos)\n", flush=True)

    results: list[Result] = []
    t_sweep = time.monotonic()
    try:
        for config in configs:
            print(f"== {config.label}", flush=True)
            wait_for_no_engine()
            result = Result(config, os.getloadavg()[0])
            print(f"  load average {load_avg()}", flush=True)
            t = time.monotonic()
            measure(config, model, folders, args, result)
            results.append(result)
            print(f"  ({time.monotonic() - t:.0f} s)\n", flush=True)
    except KeyboardInterrupt:
        print("interrupted")
    print(f"finished {time.strftime('%Y-%m-%d %H:%M:%S %Z')} after "
          f"{(time.monotonic() - t_sweep) / 60:.1f} min, load average {load_avg()}\n")
    for r in results:
        if r.rows:
            print(f"-- {r.config.label}")
            print_table(list(r.rows.values()))
    print()
    print_summary(results)
    print("\nRSS: sum over the engine's processes (guard, vLLM API server, EngineCore), "
          "start = once healthy, full = after max(max_cpu_loras, spread) adapters were "
          "loaded. Adapter @ 8 spreads over min(8, max_loras) adapters; load 1min = load "
          "average when the configuration began.")
    print("command:", " ".join([sys.executable, *sys.argv]))


if __name__ == "__main__":
    main()
