"""Side-by-side benchmark: the same workload straight to vLLM and through the gateway, one run.

It starts `loraplex up` itself (temporary data folder, the default model), so the figures
include the engine start time, and then measures:
  - cold-adapter first request (register -> first use loads it into the engine) vs warm,
  - throughput and p50/p99 time to first token and latency at each concurrency,
    direct to the engine and through the gateway, and their ratios,
  - optionally (`--adapters N`) the same with requests spread over N adapters;
  - optionally (`--cpu-split SHORT LONG`) the CPU time of the gateway against vLLM's own
    front end (its API-server process), each split into a per-request and a per-token part.

    .venv/bin/python loadtest/bench.py --concurrency 1 16 --requests 32 --max-tokens 64
    .venv/bin/python loadtest/bench.py --concurrency 16 --requests 48 --cpu-split 8 96

Traffic goes to loopback only, bounded by --requests per level and round.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adapters.base_model import ensure_default_model  # noqa: E402
from adapters.synthetic import make_random_adapters  # noqa: E402
from server.engine.process import free_port  # noqa: E402
from server.settings import DEFAULT_MODEL_NAME  # noqa: E402

ADMIN = "bench-admin"
PROMPT = [{"role": "user", "content": "Write a short story about a robot learning to paint."}]


@dataclass
class Sample:
    ttft: float
    latency: float
    tokens: int
    unit: str | None = None  # X-Loraplex-Unit: which serving unit answered (behind Envoy)


@dataclass
class Summary:
    label: str
    requests: int
    wall: float
    tokens: int
    ttft_p50: float
    ttft_p99: float
    lat_p50: float
    lat_p99: float
    cpu_s: float | None = None  # CPU time the gateway process spent on these requests

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def one_stream(client: httpx.AsyncClient, url: str, headers: dict[str, str], model: str,
                     max_tokens: int) -> Sample:
    body = {"model": model, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url, json=body, headers=headers) as r:
        r.raise_for_status()
        unit = r.headers.get("x-loraplex-unit")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - start
    return Sample(ttft if ttft is not None else latency, latency, tokens, unit)


async def run_level(url: str, headers: dict[str, str], models: list[str], concurrency: int,
                    requests: int, max_tokens: int,
                    spacing_s: float = 0.0) -> tuple[list[Sample], float]:
    """`requests` streams, `concurrency` at a time (closed loop): the samples and the wall time.
    Client k starts `k * spacing_s` after the first (0: all at once)."""
    samples: list[Sample] = []
    queue = list(range(requests))
    async with httpx.AsyncClient(timeout=600) as client:
        async def worker(k: int) -> None:
            await asyncio.sleep(k * spacing_s)
            while queue:
                i = queue.pop()
                samples.append(await one_stream(client, url, headers, models[i % len(models)],
                                                max_tokens))
        start = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        wall = time.perf_counter() - start
    return samples, wall


def summarize(label: str, runs: list[tuple[list[Sample], float]],
              cpu_s: float | None = None) -> Summary:
    samples = [s for run, _ in runs for s in run]
    ttfts, lats = [s.ttft for s in samples], [s.latency for s in samples]
    return Summary(label, len(samples), sum(wall for _, wall in runs),
                   sum(s.tokens for s in samples), pct(ttfts, 0.5), pct(ttfts, 0.99),
                   pct(lats, 0.5), pct(lats, 0.99), cpu_s)


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


async def arrival_spacing(direct: tuple[str, dict[str, str], list[str]], conc: int,
                          max_tokens: int, arrivals: str) -> float:
    """Seconds between client starts: 0 for "burst" (clients start together and, with equal
    lengths, stay in step: the worst case); for "staggered", one request's duration over
    `conc`, as a steady closed loop settles into."""
    if arrivals != "staggered":
        return 0.0
    (one,), _ = await run_level(*direct, 1, 1, max_tokens)
    return one.latency / conc


async def side_by_side(name: str, conc: int, direct: tuple[str, dict[str, str], list[str]],
                       gateway: tuple[str, dict[str, str], list[str]], gateway_process: psutil.Process,
                       args: argparse.Namespace) -> tuple[Summary, Summary]:
    """Direct and gateway runs alternate for `--rounds` rounds, so that drift in a shared,
    noisy machine lands on both sides alike. The gateway's own CPU time is counted too: unlike
    latency, it hardly depends on what else the machine is doing."""
    spacing = await arrival_spacing(direct, conc, args.max_tokens, args.arrivals)
    d_runs, g_runs, cpu = [], [], 0.0
    for _ in range(args.rounds):
        d_runs.append(await run_level(*direct, conc, args.requests, args.max_tokens, spacing))
        before = cpu_seconds(gateway_process)
        g_runs.append(await run_level(*gateway, conc, args.requests, args.max_tokens, spacing))
        cpu += cpu_seconds(gateway_process) - before
    return (summarize(f"direct  {name} @ {conc}", d_runs),
            summarize(f"gateway {name} @ {conc}", g_runs, cpu))


# -- CPU split: the gateway against vLLM's own front end (`--cpu-split`) ----------------------

FRONT_END = "vLLM front end"
TARGET_PER_TOKEN = 0.25  # issue 12: gateway CPU per token at most this times the front end's
TARGET_PER_REQUEST = 0.5  # ... and per request at most this
IDLE_S = 10.0  # the no-traffic window that measures each process's background CPU


def engine_front_end(root: psutil.Process, port: int) -> psutil.Process:
    """vLLM's API-server process: the descendant of `loraplex up` that listens on the engine
    port (not the guard above it, nor EngineCore below it, even if one inherited the socket)."""
    listening: dict[int, psutil.Process] = {}
    for child in root.children(recursive=True):
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in child.net_connections(kind="tcp")):
                listening[child.pid] = child
        except psutil.Error:
            continue
    top = [p for p in listening.values() if p.ppid() not in listening]
    if len(top) != 1:
        raise RuntimeError(f"expected one process listening on port {port}, found "
                           f"{sorted(listening)}")
    return top[0]


def cpu_snapshot(processes: dict[str, psutil.Process]) -> dict[str, float]:
    return {name: cpu_seconds(p) for name, p in processes.items()}


async def idle_rates(processes: dict[str, psutil.Process], seconds: float) -> dict[str, float]:
    """CPU seconds per second each process spends with no traffic (health and registry
    polling, stats logging): time-proportional, so a fit would count it per token."""
    before = cpu_snapshot(processes)
    await asyncio.sleep(seconds)
    after = cpu_snapshot(processes)
    return {name: (after[name] - before[name]) / seconds for name in processes}


@dataclass
class Totals:
    """What the runs of one path at one length served, and the CPU time (user + system) each
    watched process spent meanwhile."""

    requests: int = 0
    tokens: int = 0
    wall: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)

    def add(self, samples: list[Sample], wall: float, cpu_s: dict[str, float]) -> None:
        self.requests += len(samples)
        self.tokens += sum(s.tokens for s in samples)
        self.wall += wall
        for name, seconds in cpu_s.items():
            self.cpu_s[name] = self.cpu_s.get(name, 0.0) + seconds


@dataclass(frozen=True)
class Split:
    """One process's CPU time during one path's runs, as cpu = requests x per_request +
    tokens x per_token, solved from the runs at the two lengths; `net_*` the same with the
    process's idle rate x wall time taken out first."""

    process: str
    path: str
    per_request_s: float
    per_token_s: float
    net_per_request_s: float
    net_per_token_s: float
    short_ms_per_request: float  # the measurements the fit is made of
    long_ms_per_request: float


def solve(r1: int, t1: int, c1: float, r2: int, t2: int, c2: float) -> tuple[float, float]:
    """(a, b) with r1 a + t1 b = c1 and r2 a + t2 b = c2, by Cramer's rule."""
    det = r1 * t2 - r2 * t1
    if det == 0:
        raise RuntimeError("the two lengths served the same tokens per request: no split")
    return (c1 * t2 - c2 * t1) / det, (r1 * c2 - r2 * c1) / det


def solve_split(process: str, path: str, short: Totals, long: Totals, idle_per_s: float) -> Split:
    c1, c2 = short.cpu_s[process], long.cpu_s[process]
    a, b = solve(short.requests, short.tokens, c1, long.requests, long.tokens, c2)
    net_a, net_b = solve(short.requests, short.tokens, c1 - idle_per_s * short.wall,
                         long.requests, long.tokens, c2 - idle_per_s * long.wall)
    return Split(process, path, a, b, net_a, net_b, c1 / short.requests * 1000,
                 c2 / long.requests * 1000)


async def measured_run(target: tuple[str, dict[str, str], list[str]],
                       processes: dict[str, psutil.Process], conc: int, requests: int,
                       max_tokens: int, spacing: float,
                       ) -> tuple[tuple[list[Sample], float], dict[str, float]]:
    """One closed-loop run, and the CPU time each watched process spent during it."""
    before = cpu_snapshot(processes)
    run = await run_level(*target, conc, requests, max_tokens, spacing)
    after = cpu_snapshot(processes)
    return run, {name: after[name] - before[name] for name in processes}


async def cpu_split_level(name: str, conc: int, direct: tuple[str, dict[str, str], list[str]],
                          gateway: tuple[str, dict[str, str], list[str]],
                          processes: dict[str, psutil.Process], args: argparse.Namespace,
                          ) -> tuple[list[Summary], dict[tuple[str, int], Totals]]:
    """For `--rounds` rounds: at each of the two lengths, a direct run then a gateway run,
    with every watched process's CPU time counted during each. Answers the usual summaries
    (direct, gateway per length) and the totals per (path, length)."""
    lengths = args.cpu_split
    spacing = {n: await arrival_spacing(direct, conc, n, args.arrivals) for n in lengths}
    runs: dict[tuple[str, int], list[tuple[list[Sample], float]]] = {}
    totals: dict[tuple[str, int], Totals] = {}
    for _ in range(args.rounds):
        for n in lengths:
            for path, target in (("direct", direct), ("gateway", gateway)):
                run, cpu = await measured_run(target, processes, conc, args.requests, n,
                                              spacing[n])
                runs.setdefault((path, n), []).append(run)
                totals.setdefault((path, n), Totals()).add(*run, cpu)
    rows = []
    for n in lengths:
        rows.append(summarize(f"direct  {name} {n} tok @ {conc}", runs["direct", n]))
        rows.append(summarize(f"gateway {name} {n} tok @ {conc}", runs["gateway", n],
                              totals["gateway", n].cpu_s["gateway"]))
    return rows, totals


def splits_of(totals: dict[tuple[str, int], Totals], lengths: list[int],
              processes: dict[str, psutil.Process], idle: dict[str, float]) -> list[Split]:
    """The gateway during its own runs; vLLM's front end during the direct runs (its own
    job) and during the gateway runs (it serves the gateway's requests too)."""
    short, long = lengths
    wanted = [("gateway", "gateway")]
    if FRONT_END in processes:
        wanted += [(FRONT_END, "direct"), (FRONT_END, "gateway")]
    return [solve_split(proc, path, totals[path, short], totals[path, long], idle[proc])
            for proc, path in wanted]


def verdict(ratio: float, target: float) -> str:
    return f"{ratio:.2f}x (target <= {target}x: {'met' if ratio <= target else 'NOT met'})"


def print_ratios_split(gw: tuple[float, float], fe: tuple[float, float], what: str) -> None:
    """gw, fe: (per request, per token) of the gateway and the front end."""
    print(f"  gateway / front end {what}: per token "
          f"{verdict(gw[1] / fe[1], TARGET_PER_TOKEN)}, per request "
          f"{verdict(gw[0] / fe[0], TARGET_PER_REQUEST)}")


def print_splits(label: str, splits: list[Split], lengths: list[int],
                 idle: dict[str, float]) -> None:
    short, long = lengths
    print(f"CPU split {label} (cpu = requests x a + tokens x b, from {short} and {long} "
          f"tokens per request; net: less the idle rate x wall time):")
    print(f"  {'process':16} {'during':8} {f'ms/req @{short}':>11} {f'ms/req @{long}':>11} "
          f"{'a: ms/req':>10} {'b: us/tok':>10} {'net a':>7} {'net b':>7}")
    for s in splits:
        print(f"  {s.process:16} {s.path:8} {s.short_ms_per_request:>11.2f} "
              f"{s.long_ms_per_request:>11.2f} {s.per_request_s * 1000:>10.2f} "
              f"{s.per_token_s * 1e6:>10.1f} {s.net_per_request_s * 1000:>7.2f} "
              f"{s.net_per_token_s * 1e6:>7.1f}")
    print("  idle (no traffic, " + ", ".join(f"{name} {rate * 1000:.1f}" for name, rate
                                             in idle.items()) + " ms of CPU per second)")
    by = {(s.process, s.path): s for s in splits}
    gw = by["gateway", "gateway"]
    if (FRONT_END, "direct") not in by:
        print("  (stand-in engine: there is no vLLM front end to compare with; the gateway's "
              "own split only)")
        return
    for path in ("direct", "gateway"):
        fe = by[FRONT_END, path]
        what = "during its own direct runs" if path == "direct" else "during the gateway runs"
        print_ratios_split((gw.per_request_s, gw.per_token_s),
                           (fe.per_request_s, fe.per_token_s), what)
    fe = by[FRONT_END, "direct"]
    print_ratios_split((gw.net_per_request_s, gw.net_per_token_s),
                       (fe.net_per_request_s, fe.net_per_token_s), "(direct runs), net of idle")


def start_server(home: Path, model: Path, port: int, slots: int,
                 **extra_env: str) -> subprocess.Popen[bytes]:
    """`loraplex up` on loopback with a temporary data folder and no training worker."""
    env = dict(os.environ, LORAPLEX_HOME=str(home), LORAPLEX_PORT=str(port),
               LORAPLEX_ADMIN_TOKEN=ADMIN, LORAPLEX_MODEL_PATH=str(model),
               LORAPLEX_MAX_LORAS=str(min(slots, 4)),
               LORAPLEX_MAX_RESIDENT_ADAPTERS=str(slots), LORAPLEX_WORKERS="0", **extra_env)
    log = (home / "gateway.log").open("wb")
    return subprocess.Popen([str(Path(sys.executable).parent / "loraplex"), "up"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)


@contextlib.contextmanager
def started(argv: list[str], log: Path,
            env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A child process, stopped (SIGINT, then SIGKILL) when the block ends."""
    proc = subprocess.Popen(argv, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_ok(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> float:
    """Poll `url` until it answers 200 (seconds it took); fail if `proc` exits first."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited while waiting for {url}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - start
        time.sleep(0.25)
    raise RuntimeError(f"{url} not ready in time")


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 900) -> float:
    return wait_ok(f"{url}/healthz", proc, timeout)


def bench_tenant(url: str) -> tuple[httpx.Client, dict[str, str]]:
    """An admin client and the headers of a fresh tenant `bench`."""
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120)
    admin.post("/admin/tenants", json={"id": "bench"}).raise_for_status()
    key = admin.post("/admin/tenants/bench/keys", json={}).json()["key"]
    return admin, {"X-Tenant-ID": "bench", "Authorization": f"Bearer {key}"}


def print_table(rows: list[Summary]) -> None:
    print(f"{'workload':38} {'req':>4} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'lat p50':>8} {'lat p99':>8}")
    for s in rows:
        print(f"{s.label:38} {s.requests:>4} {s.tok_s:>8.1f} {s.ttft_p50 * 1000:>7.1f}ms "
              f"{s.ttft_p99 * 1000:>7.1f}ms {s.lat_p50:>7.2f}s {s.lat_p99:>7.2f}s")


def print_ratios(direct: Summary, gateway: Summary) -> None:
    print(f"  gateway/direct @ {direct.label.split('@')[-1].strip()}: throughput "
          f"{gateway.tok_s / direct.tok_s:.3f}x, TTFT p50 "
          f"{(gateway.ttft_p50 - direct.ttft_p50) * 1000:+.1f} ms, latency p50 "
          f"{gateway.lat_p50 / direct.lat_p50:.3f}x, gateway CPU "
          f"{gateway.cpu_s / gateway.requests * 1000:.2f} ms/request = "
          f"{gateway.cpu_s / gateway.tokens * 1e6:.0f} us/token")


async def main_async(args: argparse.Namespace) -> None:
    model = ensure_default_model(REPO / ".cache" / "models")
    home = Path(tempfile.mkdtemp(prefix="loraplex-bench-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    slots = max(2, args.slots)
    extra, fake = {}, None
    if args.engine == "fake":  # the gateway's own cost, without the CPU engine's noise
        fake_port = free_port()
        fake = subprocess.Popen([sys.executable, str(REPO / "loadtest" / "fake_engine.py"),
                                 "--port", str(fake_port), "--gap-ms", str(args.gap_ms)])
        extra["LORAPLEX_ENGINE_URL"] = f"http://127.0.0.1:{fake_port}"
    proc = start_server(home, model, port, slots, **extra)
    try:
        ready_s = wait_healthy(url, proc)
        gateway_process = psutil.Process(proc.pid)  # uvicorn runs in `loraplex up` itself
        print(f"engine start (loraplex up -> /healthz 200): {ready_s:.1f} s")
        admin, headers = bench_tenant(url)
        n_adapters = max(1, args.adapters)
        folders = make_random_adapters(model, home / "made", n_adapters + 1, rank=8,
                                       base_model_name=DEFAULT_MODEL_NAME)
        engine_names = {}
        for i, folder in enumerate(folders):
            files = {n: (n, (folder / n).read_bytes())
                     for n in ("adapter_config.json", "adapter_model.safetensors")}
            r = admin.post(f"/admin/tenants/bench/adapters/a{i}/versions", files=files)
            r.raise_for_status()
            engine_names[f"a{i}"] = r.json()["engine_name"]
        engine = admin.get("/admin/engine").json()["url"]
        processes = {"gateway": gateway_process}
        if args.cpu_split and fake is None:
            front_end = engine_front_end(gateway_process, httpx.URL(engine).port or 80)
            processes[FRONT_END] = front_end
            print(f"vLLM front end: pid {front_end.pid} ({' '.join(front_end.cmdline()[1:4])} "
                  f"...), listening on {engine}")

        async with httpx.AsyncClient(timeout=600) as c:
            gw = f"{url}/v1/chat/completions"
            await one_stream(c, gw, headers, DEFAULT_MODEL_NAME, 4)  # warm the engine
            cold = await one_stream(c, gw, headers, "a0", 16)
            warm = await one_stream(c, gw, headers, "a0", 16)
            base = await one_stream(c, gw, headers, DEFAULT_MODEL_NAME, 16)
        print(f"cold adapter first request: TTFT {cold.ttft * 1000:.0f} ms, "
              f"total {cold.latency * 1000:.0f} ms (16 tokens)")
        print(f"warm adapter:               TTFT {warm.ttft * 1000:.0f} ms, "
              f"total {warm.latency * 1000:.0f} ms")
        print(f"base model:                 TTFT {base.ttft * 1000:.0f} ms, "
              f"total {base.latency * 1000:.0f} ms")

        rows: list[Summary] = []
        workloads = [("base", [DEFAULT_MODEL_NAME], [DEFAULT_MODEL_NAME])]
        if args.adapters:
            names = [f"a{i + 1}" for i in range(n_adapters)]
            workloads.append((f"{n_adapters} adapters", names,
                              [engine_names[n] for n in names]))
            # Load them all once through the gateway so the direct run finds them in the engine.
            async with httpx.AsyncClient(timeout=600) as c:
                for n in names:
                    await one_stream(c, f"{url}/v1/chat/completions", headers, n, 1)
        if args.cpu_split:
            await cpu_split_mode(args, workloads, engine, url, headers, processes)
            return
        for conc in args.concurrency:
            for name, gw_models, direct_models in workloads:
                d, g = await side_by_side(
                    name, conc, (f"{engine}/v1/chat/completions", {}, direct_models),
                    (f"{url}/v1/chat/completions", headers, gw_models), gateway_process, args)
                rows += [d, g]
                print_table([d, g])
                print_ratios(d, g)
        print()
        print_table(rows)
        print()
        for d, g in zip(rows[::2], rows[1::2], strict=False):
            print_ratios(d, g)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        if fake is not None:
            fake.terminate()


async def cpu_split_mode(args: argparse.Namespace, workloads: list[tuple[str, list[str], list[str]]],
                         engine: str, url: str, headers: dict[str, str],
                         processes: dict[str, psutil.Process]) -> None:
    """`--cpu-split`: every level and workload at both lengths, then the splits."""
    # Warm both paths first (connection pools, key and model lookups, first-use imports and
    # schema builds): the split is of the steady state, not of one-time start-up work.
    for _name, gw_models, direct_models in workloads:
        for conc in args.concurrency:
            await run_level(f"{engine}/v1/chat/completions", {}, direct_models, conc, conc, 2)
            await run_level(f"{url}/v1/chat/completions", headers, gw_models, conc, conc, 2)
    idle = await idle_rates(processes, IDLE_S)
    rows: list[Summary] = []
    results: list[tuple[str, list[Split]]] = []
    for conc in args.concurrency:
        for name, gw_models, direct_models in workloads:
            level_rows, totals = await cpu_split_level(
                name, conc, (f"{engine}/v1/chat/completions", {}, direct_models),
                (f"{url}/v1/chat/completions", headers, gw_models), processes, args)
            splits = splits_of(totals, args.cpu_split, processes, idle)
            rows += level_rows
            results.append((f"{name} @ {conc}", splits))
            print_table(level_rows)
            print_splits(f"{name} @ {conc}", splits, args.cpu_split, idle)
    print()
    print_table(rows)
    print()
    for d, g in zip(rows[::2], rows[1::2], strict=False):
        print_ratios(d, g)
    print()
    for label, splits in results:
        print_splits(label, splits, args.cpu_split, idle)


def _interrupt(*_args: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupt)  # a timeout or kill still stops the server
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--requests", type=int, default=32,
                   help="requests per workload, level and round")
    p.add_argument("--rounds", type=int, default=1,
                   help="alternate direct and gateway runs this many times (less drift)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--arrivals", choices=["burst", "staggered"], default="burst",
                   help="burst: all clients start together (worst case for time to first "
                        "token); staggered: spread over one request's duration")
    p.add_argument("--adapters", type=int, default=0,
                   help="also run a workload spread over this many adapters")
    p.add_argument("--slots", type=int, default=8, help="LORAPLEX_MAX_RESIDENT_ADAPTERS")
    p.add_argument("--engine", choices=["vllm", "fake"], default="vllm",
                   help="fake: loadtest/fake_engine.py, streaming at a fixed pace (gateway cost only)")
    p.add_argument("--gap-ms", type=float, default=20.0, help="fake engine: ms between tokens")
    p.add_argument("--cpu-split", type=int, nargs=2, metavar=("SHORT", "LONG"),
                   help="instead of the --max-tokens runs: at both lengths, CPU time of the "
                        "gateway and of vLLM's front end (API-server process), each solved "
                        "for a per-request and a per-token part")
    args = p.parse_args()
    if args.cpu_split:
        args.cpu_split = sorted(args.cpu_split)
        if args.cpu_split[0] == args.cpu_split[1] or args.cpu_split[0] < 1:
            p.error("--cpu-split needs two different lengths, at least 1")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
