"""Many adapters with Zipf popularity against one adapter, through the gateway, in one run.

One gateway (`loraplex unit`, a temporary data folder) in front of one engine, with
LORAPLEX_MAX_RESIDENT_ADAPTERS = `--slots` engine adapter slots. `--adapters` adapters are
registered through the admin API (uploads of a small synthetic PEFT adapter made by
`adapters.synthetic.make_random_adapters`). Closed-loop streaming clients (`--concurrency`,
chat, `ignore_eos`, `--max-tokens` each) then run two workloads of `--requests` requests:

  one    every request to one adapter (the most popular one of the Zipf workload)
  zipf   each request's adapter drawn from a seeded Zipf law: adapter of rank k with
         probability proportional to 1 / k^s (`--zipf-s`)

After an unmeasured Zipf warm-up (the slots start full, as in steady state), the two alternate
for `--rounds` rounds in ABBA order (one zipf, zipf one, ...), so that drift on a shared
machine lands on both alike. Reported per workload: tokens/s and requests/s, TTFT p50/p99,
latency p50/p99, adapter loads / hits / evictions per 100 requests (the gateway's
`/admin/engine` counters, before and after), the mean engine adapter load time and the mean
number of requests waiting for an adapter slot (`/metrics`), and the ratio zipf/one. For the
Zipf workload, TTFT by popularity (rank 1, ranks 2..slots, the rest), how often the most
popular adapters held a slot (`/admin/engine`, sampled every 0.25 s), and, for comparison, the
loads per 100 requests an offline replay of the same request sequence through `--slots` slots
would make, one request at a time, under LRU, under a static set of the `slots - 1` most
popular plus one rotating slot (a frequency policy that knows the fixed popularity) and under
Belady's optimum.

The stand-in engine (default) is `fake_engine.py`: a token every `--gap-ms`, `--load-ms` per
adapter load and, unless `--no-load-blocks`, a load holds the whole engine (vLLM runs
`add_lora` inside its engine-core loop, between two steps). It does not read the adapters.

    .venv/bin/python loadtest/bench_zipf.py                              # stand-in, ~3.5 min
    .venv/bin/python loadtest/bench_zipf.py --engine vllm --concurrency 16 --requests 32 \\
        --max-tokens 8 --warmup 16 --rounds 2                            # real CPU engine, ~6 min

`--engine vllm` spawns vLLM (`loraplex unit` without LORAPLEX_ENGINE_URL), with rank-8 adapters
(`--rank`) and LORAPLEX_MAX_LORAS = `--max-loras` (default: `--slots`, so that one batch can
mix every resident adapter). Loopback only; the load is bounded by the request counts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from bench import ADMIN, PROMPT, pct, started, wait_ok  # noqa: E402

from adapters.base_model import ensure_default_model  # noqa: E402
from adapters.synthetic import make_random_adapters  # noqa: E402
from server.engine.process import free_port  # noqa: E402
from server.settings import DEFAULT_MODEL_NAME  # noqa: E402


@dataclass
class Sample:
    adapter: int  # popularity rank - 1
    status: int
    ttft: float | None = None
    latency: float = 0.0
    tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.ttft is not None


@dataclass
class Phase:
    workload: str
    samples: list[Sample]
    wall: float
    stats: dict[str, int]  # /admin/engine residency counters, after - before
    load_s: float | None  # mean engine adapter load (eviction included), from /metrics
    watched: Watched
    cpu: dict[str, float] = field(default_factory=dict)  # % of one core; machine: of all


@dataclass
class Totals:
    workload: str
    phases: list[Phase]

    @property
    def samples(self) -> list[Sample]:
        return [s for p in self.phases for s in p.samples]

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.ok]

    @property
    def wall(self) -> float:
        return sum(p.wall for p in self.phases)

    @property
    def tok_s(self) -> float:
        return sum(s.tokens for s in self.ok) / self.wall

    @property
    def req_s(self) -> float:
        return len(self.ok) / self.wall

    def stat(self, name: str) -> int:
        return sum(p.stats.get(name, 0) for p in self.phases)

    def per_100(self, name: str) -> float:
        return 100 * self.stat(name) / max(1, len(self.samples))

    def cpu(self, name: str) -> float:
        return statistics.fmean(p.cpu.get(name, 0.0) for p in self.phases)


def zipf_weights(n: int, s: float) -> list[float]:
    w = [1 / (rank ** s) for rank in range(1, n + 1)]
    total = sum(w)
    return [x / total for x in w]


def expected_distinct(weights: list[float], draws: int) -> float:
    """Expected number of different adapters among `draws` independent requests."""
    return sum(1 - (1 - p) ** draws for p in weights)


def replay(warmup: list[int], sequence: list[int], slots: int, policy: str) -> int:
    """Loads of an offline replay of `sequence` after `warmup` (whose loads are not counted),
    one request at a time (no concurrency): lru; top (the `slots - 1` most popular always
    resident, one spare slot for the rest); belady (evict the adapter needed again furthest
    ahead: the fewest loads any policy can make)."""
    requests = warmup + sequence
    counted = [False] * len(warmup) + [True] * len(sequence)
    loads = 0
    if policy == "lru":
        resident: dict[int, None] = {}
        for a, count in zip(requests, counted, strict=True):
            if a in resident:
                resident.pop(a)
            else:
                loads += count
                if len(resident) >= slots:
                    resident.pop(next(iter(resident)))
            resident[a] = None
        return loads
    if policy == "top":
        kept, spare = set(range(slots - 1)), None
        warm = set(warmup)
        for a, count in zip(requests, counted, strict=True):
            if a not in kept and a != spare:
                loads += count
                spare = a
        return loads + len((kept - warm) & set(sequence))  # the kept ones, loaded once
    assert policy == "belady"
    positions: dict[int, list[int]] = {}
    for i, a in enumerate(requests):
        positions.setdefault(a, []).append(i)
    nxt = {a: 0 for a in positions}
    cache: set[int] = set()
    for a, count in zip(requests, counted, strict=True):
        nxt[a] += 1
        if a in cache:
            continue
        loads += count
        if len(cache) >= slots:
            def next_use(b: int) -> float:
                k = nxt[b]
                return positions[b][k] if k < len(positions[b]) else float("inf")
            cache.remove(max(cache, key=next_use))
        cache.add(a)
    return loads


_CONTENT, _EMPTY, _USAGE = b'"content":"', b'"content":""', b'"usage":{'


async def one_stream(client: httpx.AsyncClient, url: str, headers: dict[str, str], model: str,
                     adapter: int, max_tokens: int) -> Sample:
    """One streamed chat request; events are matched as bytes (vLLM's compact JSON), so the
    client stays cheap on the cores it shares with the gateway and the engine."""
    body = {"model": model, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    sample = Sample(adapter, 0)
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            sample.status = r.status_code
            if r.status_code != 200:
                await r.aread()
                return sample
            pending = b""
            async for data in r.aiter_raw():
                *events, pending = (pending + data).split(b"\n\n")
                for event in events:
                    if event.startswith(b'data: {"error"'):
                        sample.status = 599  # broken off in-band
                    elif _USAGE in event:
                        sample.tokens = json.loads(event[6:])["usage"]["completion_tokens"]
                    elif sample.ttft is None and _CONTENT in event and _EMPTY not in event:
                        sample.ttft = time.perf_counter() - start
    except httpx.HTTPError:
        sample.status = sample.status or 598
    finally:
        sample.latency = time.perf_counter() - start
    return sample


@dataclass
class Watched:
    """Sampled every 0.25 s during a phase: requests waiting for an adapter slot (the gateway's
    gauge), and which adapters (popularity rank - 1) held an engine slot (`/admin/engine`)."""

    waiting: list[float] = field(default_factory=list)
    resident: list[set[int]] = field(default_factory=list)


async def drive(url: str, headers: dict[str, str], names: list[str], sequence: list[int],
                concurrency: int, max_tokens: int,
                ranks: dict[str, int] | None = None) -> tuple[list[Sample], float, Watched]:
    """Closed loop: `concurrency` clients take the next request of `sequence` as soon as their
    last one ends. Returns the samples, the wall time and what was sampled meanwhile (the
    resident adapters only with `ranks`, engine name -> rank - 1)."""
    todo = iter(sequence)
    samples: list[Sample] = []
    watched = Watched()
    admin = {"Authorization": f"Bearer {ADMIN}"}
    done = asyncio.Event()
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker() -> None:
            for adapter in todo:
                samples.append(await one_stream(client, f"{url}/v1/chat/completions", headers,
                                                names[adapter], adapter, max_tokens))

        async def sampler() -> None:
            while not done.is_set():
                with contextlib.suppress(httpx.HTTPError):
                    text = (await client.get(f"{url}/metrics")).text
                    m = re.search(r"^loraplex_adapter_slot_waiting (\S+)$", text, re.M)
                    if m:
                        watched.waiting.append(float(m.group(1)))
                    if ranks:
                        slots = (await client.get(f"{url}/admin/engine", headers=admin)
                                 ).json()["adapters"]["resident"]
                        watched.resident.append({ranks[r["engine_name"]] for r in slots
                                                 if r["engine_name"] in ranks})
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(done.wait(), 0.25)

        watch = asyncio.create_task(sampler())
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        done.set()
        await watch
    return samples, wall, watched


def residency_stats(admin: httpx.Client) -> dict[str, int]:
    return dict(admin.get("/admin/engine").json()["adapters"]["stats"])


def load_seconds(url: str) -> tuple[float, float]:
    """(sum, count) of the gateway's engine-tier adapter load histogram."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    out = []
    for part in ("sum", "count"):
        m = re.search(rf'^loraplex_adapter_load_seconds_{part}\{{[^}}]*tier="engine"[^}}]*\}} (\S+)$',
                      text, re.M)
        out.append(float(m.group(1)) if m else 0.0)
    return out[0], out[1]


class CpuWatch:
    """CPU time of some processes (each with its children, or without) and of the machine."""

    def __init__(self, procs: dict[str, tuple[psutil.Process, bool]]) -> None:
        self.procs = procs

    def read(self) -> dict[str, float]:
        out = {"t": time.perf_counter()}
        for name, (proc, children) in self.procs.items():
            total = 0.0
            for p in [proc, *(proc.children(recursive=True) if children else [])]:
                with contextlib.suppress(psutil.Error):
                    times = p.cpu_times()
                    total += times.user + times.system
            out[name] = total
        m = psutil.cpu_times()
        out["machine"] = sum(m) - m.idle - getattr(m, "iowait", 0)
        return out

    def between(self, a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        dt = b["t"] - a["t"]
        cpu = {n: 100 * (b[n] - a[n]) / dt for n in self.procs}
        cpu["machine"] = 100 * (b["machine"] - a["machine"]) / dt / (psutil.cpu_count() or 1)
        return cpu


def run_phase(workload: str, url: str, admin: httpx.Client, headers: dict[str, str],
              names: list[str], ranks: dict[str, int], sequence: list[int],
              args: argparse.Namespace, watch: CpuWatch) -> Phase:
    before, load_before, cpu_before = residency_stats(admin), load_seconds(url), watch.read()
    samples, wall, watched = asyncio.run(drive(url, headers, names, sequence, args.concurrency,
                                               args.max_tokens, ranks))
    after, load_after, cpu_after = residency_stats(admin), load_seconds(url), watch.read()
    loads = load_after[1] - load_before[1]
    phase = Phase(workload, samples, wall, {k: after[k] - before[k] for k in after},
                  (load_after[0] - load_before[0]) / loads if loads else None, watched,
                  watch.between(cpu_before, cpu_after))
    errors = sum(not s.ok for s in samples)
    print(f"  {workload:4}: {len(samples)} requests ({errors} failed) in {wall:.1f} s, "
          f"loads {phase.stats['loads']}, evictions {phase.stats['evictions']}, "
          f"machine CPU {phase.cpu['machine']:.0f}%", flush=True)
    return phase


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f} ms"


def report(args: argparse.Namespace, totals: dict[str, Totals], weights: list[float],
           warmup: list[int], zipf_requests: list[int]) -> None:
    one, many = totals["one"], totals["zipf"]
    print("\n| workload | requests (failed) | tokens/s | requests/s | TTFT p50 | TTFT p99 | "
          "latency p50 | latency p99 | loads / 100 req | hits / 100 req | evictions / 100 req "
          "| mean load | mean waiting for a slot | gateway CPU | engine CPU | machine CPU |")
    print("|" + "---|" * 16)
    for t in (one, many):
        ttft = [s.ttft for s in t.ok]
        lat = [s.latency for s in t.ok]
        loads = [p.load_s for p in t.phases if p.load_s is not None]
        print(f"| {t.workload} | {len(t.samples)} ({len(t.samples) - len(t.ok)}) | "
              f"{t.tok_s:.1f} | {t.req_s:.2f} | {ms(pct(ttft, 0.5))} | {ms(pct(ttft, 0.99))} | "
              f"{pct(lat, 0.5):.2f} s | {pct(lat, 0.99):.2f} s | {t.per_100('loads'):.1f} | "
              f"{t.per_100('hits'):.1f} | {t.per_100('evictions'):.1f} | "
              f"{ms(statistics.fmean(loads)) if loads else '-'} | "
              f"{statistics.fmean(w for p in t.phases for w in p.watched.waiting):.1f} | "
              f"{t.cpu('gateway'):.0f}% | "
              f"{t.cpu('engine'):.0f}% | {t.cpu('machine'):.0f}% |")
    print(f"\nzipf / one: throughput {many.tok_s / one.tok_s:.3f}x tokens/s, "
          f"{many.req_s / one.req_s:.3f}x requests/s (goal: >= 0.90x); TTFT p50 "
          f"{pct([s.ttft for s in many.ok], 0.5) / pct([s.ttft for s in one.ok], 0.5):.2f}x, "
          f"p99 {pct([s.ttft for s in many.ok], 0.99) / pct([s.ttft for s in one.ok], 0.99):.2f}x")
    per_round = [f"{z.wall and sum(s.tokens for s in z.samples if s.ok) / z.wall:.0f}"
                 f"/{sum(s.tokens for s in o.samples if s.ok) / o.wall:.0f}"
                 for o, z in zip(one.phases, many.phases, strict=True)]
    print(f"per round, zipf/one tokens/s: {', '.join(per_round)}")

    groups = (("rank 1", 0, 1), (f"ranks 2-{args.slots}", 1, args.slots),
              (f"ranks {args.slots + 1}-{args.adapters}", args.slots, args.adapters))
    print("\nzipf workload by popularity:")
    for label, lo, hi in groups:
        if lo >= hi:
            continue
        ss = [s for s in many.samples if lo <= s.adapter < hi]
        ok = [s.ttft for s in ss if s.ok]
        print(f"  {label:13} {len(ss):5} requests ({100 * len(ss) / len(many.samples):4.1f}%, "
              f"law {100 * sum(weights[lo:hi]):4.1f}%), failed {len(ss) - len(ok)}, TTFT p50 "
              f"{ms(pct(ok, 0.5) if ok else None)}, p99 {ms(pct(ok, 0.99) if ok else None)}")
    resident = [r for p in many.phases for r in p.watched.resident]
    if resident:
        top = min(args.slots, args.adapters)
        def held(k: int) -> float:  # slots held by the k most popular, on average
            return statistics.fmean(len(r & set(range(k))) for r in resident)
        print(f"  sampled {len(resident)} times: rank 1 held a slot in "
              f"{100 * sum(0 in r for r in resident) / len(resident):.0f}% of samples; slots "
              f"held by ranks 1-{top}: {held(top):.1f} of {args.slots} on average, by ranks "
              f"1-4: {held(4):.1f}")
    print(f"  distinct adapters requested: {len(set(zipf_requests))}; expected distinct "
          f"adapters among {args.concurrency} requests in flight: "
          f"{expected_distinct(weights, args.concurrency):.1f} (against {args.slots} slots)")
    n = len(zipf_requests)
    print(f"  offline replay of the same {n} Zipf requests (after the warm-up's) through "
          f"{args.slots} slots, one at a time, loads / 100 requests: " + ", ".join(
              f"{policy} {100 * replay(warmup, zipf_requests, args.slots, policy) / n:.1f}"
              for policy in ("lru", "top", "belady"))
          + f" (top: the {args.slots - 1} most popular kept, one slot for the rest)")


def _interrupt(*_args: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupt)  # a timeout or kill still stops the children
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--engine", choices=["fake", "vllm"], default="fake")
    p.add_argument("--adapters", type=int, default=100)
    p.add_argument("--slots", type=int, default=8, help="LORAPLEX_MAX_RESIDENT_ADAPTERS")
    p.add_argument("--max-loras", type=int, help="LORAPLEX_MAX_LORAS (default: --slots)")
    p.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop streams")
    p.add_argument("--requests", type=int, default=960, help="per workload and round")
    p.add_argument("--rounds", type=int, default=2, help="one/zipf alternations (ABBA)")
    p.add_argument("--warmup", type=int, default=320, help="unmeasured Zipf requests first")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rank", type=int, help="adapter rank (default: 1 stand-in, 8 vllm)")
    p.add_argument("--gap-ms", type=float, default=20.0, help="stand-in: ms per token")
    p.add_argument("--load-ms", type=float, default=25.0, help="stand-in: ms per adapter load")
    p.add_argument("--no-load-blocks", action="store_true",
                   help="stand-in: a load delays only the requests that wait for it")
    p.add_argument("--pin-top", type=int, default=0, metavar="K",
                   help="pin the K most popular adapters (admin API) before the warm-up: a\n"
                        "static frequency policy, to compare with plain LRU")
    p.add_argument("--slot-wait-s", type=float, default=30.0,
                   help="LORAPLEX_ADAPTER_SLOT_WAIT_S (the gateway's default: 30)")
    args = p.parse_args()
    rank = args.rank or (1 if args.engine == "fake" else 8)

    weights = zipf_weights(args.adapters, args.zipf_s)
    rng = random.Random(args.seed)
    warmup = rng.choices(range(args.adapters), weights, k=args.warmup)
    zipf_seqs = [rng.choices(range(args.adapters), weights, k=args.requests)
                 for _ in range(args.rounds)]
    engine_desc = (f"stand-in: {args.gap_ms:g} ms/token, {args.load_ms:g} ms/adapter load, "
                   f"loads {'do not block' if args.no_load_blocks else 'block'} the engine"
                   if args.engine == "fake" else "vLLM (CPU build), spawned by loraplex unit")
    print(f"{args.adapters} adapters (rank {rank}), Zipf s={args.zipf_s:g}, seed {args.seed}; "
          f"{args.slots} engine slots, max_loras {args.max_loras or args.slots}; "
          f"{args.concurrency} streams x {args.max_tokens} tokens, {args.requests} requests per "
          f"workload and round, {args.rounds} rounds, {args.warmup} warm-up; {engine_desc}"
          + (f"; the {args.pin_top} most popular pinned" if args.pin_top else ""))
    print(f"machine: {psutil.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the "
          "start", flush=True)

    model = ensure_default_model(HERE.parent / ".cache" / "models")
    with tempfile.TemporaryDirectory(prefix="bench-zipf-") as tmp, contextlib.ExitStack() as stack:
        home = Path(tmp)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = dict(os.environ, LORAPLEX_HOME=str(home), LORAPLEX_PORT=str(port),
                   LORAPLEX_ADMIN_TOKEN=ADMIN, LORAPLEX_MODEL_PATH=str(model),
                   LORAPLEX_MAX_RESIDENT_ADAPTERS=str(args.slots),
                   LORAPLEX_MAX_LORAS=str(args.max_loras or args.slots),
                   LORAPLEX_ADAPTER_SLOT_WAIT_S=str(args.slot_wait_s), LORAPLEX_WORKERS="0")
        procs: dict[str, tuple[psutil.Process, bool]] = {}
        if args.engine == "fake":
            fake_port = free_port()
            argv = [sys.executable, str(HERE / "fake_engine.py"), "--port", str(fake_port),
                    "--gap-ms", str(args.gap_ms), "--load-ms", str(args.load_ms)]
            fake = stack.enter_context(started(
                argv + ([] if args.no_load_blocks else ["--load-blocks"]), home / "engine.log"))
            env["LORAPLEX_ENGINE_URL"] = f"http://127.0.0.1:{fake_port}"
            wait_ok(f"{env['LORAPLEX_ENGINE_URL']}/health", fake, 60)
            procs["engine"] = (psutil.Process(fake.pid), False)
        unit = stack.enter_context(started([str(Path(sys.executable).parent / "loraplex"),
                                            "unit"], home / "gateway.log", env))
        ready = wait_ok(f"{url}/healthz", unit, 900)
        print(f"gateway ready in {ready:.1f} s", flush=True)
        gateway = psutil.Process(unit.pid)
        procs["gateway"] = (gateway, False)
        if args.engine == "vllm":  # the engine's supervisor is the unit's child
            (supervisor,) = gateway.children()
            procs["engine"] = (supervisor, True)
        watch = CpuWatch(procs)

        admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"},
                             timeout=300)
        admin.post("/admin/tenants", json={"id": "bench"}).raise_for_status()
        key = admin.post("/admin/tenants/bench/keys", json={}).json()["key"]
        headers = {"X-Tenant-ID": "bench", "Authorization": f"Bearer {key}"}
        folder = make_random_adapters(model, home / "made", 1, rank=rank, std=0.01,
                                      base_model_name=DEFAULT_MODEL_NAME)[0]
        files = {f.name: f.read_bytes() for f in folder.iterdir() if f.name.startswith("adapter_")}
        size = sum(len(b) for b in files.values())
        names = [f"z{i:03d}" for i in range(args.adapters)]  # z000: the most popular
        ranks: dict[str, int] = {}
        started_at = time.monotonic()
        for i, name in enumerate(names):
            r = admin.post(f"/admin/tenants/bench/adapters/{name}/versions", files=files)
            r.raise_for_status()
            ranks[r.json()["engine_name"]] = i
        print(f"registered {args.adapters} adapters of {size / 1e6:.2f} MB in "
              f"{time.monotonic() - started_at:.1f} s", flush=True)
        for name in names[:args.pin_top]:
            admin.put(f"/admin/tenants/bench/adapters/{name}/versions/1/pin").raise_for_status()

        asyncio.run(drive(url, headers, [DEFAULT_MODEL_NAME], [0] * 2, 2, 4))  # warm the engine
        print(f"warm-up: {args.warmup} Zipf requests", flush=True)
        asyncio.run(drive(url, headers, names, warmup, args.concurrency, args.max_tokens))
        phases: dict[str, list[Phase]] = {"one": [], "zipf": []}
        for r in range(args.rounds):
            print(f"round {r + 1}:", flush=True)
            order = ("one", "zipf") if r % 2 == 0 else ("zipf", "one")
            for workload in order:
                seq = [0] * args.requests if workload == "one" else zipf_seqs[r]
                phases[workload].append(run_phase(workload, url, admin, headers, names, ranks,
                                                  seq, args, watch))
    totals = {w: Totals(w, ps) for w, ps in phases.items()}
    report(args, totals, weights, warmup, [a for seq in zipf_seqs for a in seq])
    print(f"\nmachine: {psutil.cpu_count()} cores, load average "
          f"{' / '.join(f'{x:.2f}' for x in os.getloadavg())} (1/5/15 min) at the end; CPU "
          "columns are % of one core (machine: of all cores) during the measured phases")


if __name__ == "__main__":
    main()
