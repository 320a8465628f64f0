"""Noisy neighbour: does a quiet tenant keep its latency while another tenant floods the engine?

One run starts the stand-in engine (`fake_engine.py --slots N`, an idealised continuous-
batching engine: N sequences at once, first token after `step + prefill x prompt tokens`, then
one token per `decode` step), then for each scenario a fresh gateway (`loraplex unit`, a temp
data folder, tenants `q` and `f` made through the admin API) with
LORAPLEX_MAX_IN_FLIGHT = LORAPLEX_TENANT_MAX_IN_FLIGHT = N (the waiting happens in the gateway,
where the admission policy acts, and a lone tenant may use the whole engine), a short
LORAPLEX_ADMISSION_WAIT_S (a flood's excess gets 429s, not unbounded queues), and:

  alone        Q only: streaming chat, short prompts, Poisson arrivals well under capacity
  fifo         Q + F, LORAPLEX_ADMISSION_POLICY=fifo (admission ignores tenants)
  round_robin  Q + F, tenants in turn, a request each
  token_fair   Q + F, Virtual Token Counter (the tenant served the fewest weighted tokens)

F floods open-loop (Poisson) at --f-factor times the engine's capacity, with long prompts.
Reported per scenario: Q's TTFT p50/p99 (to the first content chunk) and its ratio to Q alone,
Q's completed and failed requests, F's served tokens per second, the engine's slot
utilisation, and Jain's fairness index (the formula is printed with the table).

    .venv/bin/python loadtest/bench_fairness.py                 # about 3.5 minutes

Against a real vLLM engine (`--engine-url`; e.g. the one `loraplex up` spawned: its URL is in
GET /admin/engine). Capacity is then unknown, so give F's rate; the real CPU engine makes about
10 tokens/s per sequence, so keep everything small, for example:

    .venv/bin/python loadtest/bench_fairness.py --engine-url http://127.0.0.1:PORT \\
        --slots 4 --q-rate 0.5 --q-max-tokens 4 --f-rate 5 --f-max-tokens 4 \\
        --f-prompt-tokens 400 --duration 60 --warmup 10 --admission-wait-s 10

(F should be several times what the engine serves: compare F requests sent with F completed.)

Loopback only; the load is bounded by --duration.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from httpx_aiohttp import AiohttpTransport

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from bench import ADMIN, pct, started, wait_ok  # noqa: E402

from adapters.base_model import ensure_default_model  # noqa: E402
from server.engine.process import free_port  # noqa: E402
from server.settings import DEFAULT_MODEL_NAME  # noqa: E402

WORDS = ("the", "river", "light", "stone", "quiet", "market", "paper", "window", "garden",
         "engine", "signal", "winter", "number", "orange", "harbor", "silver", "letter")
TEXT = " ".join(random.Random(0).choices(WORDS, k=40_000))  # ~250k characters
POLICIES = ("fifo", "round_robin", "token_fair")


@dataclass(frozen=True)
class Load:
    """One tenant's traffic: Poisson arrivals; prompt and output lengths vary by up to
    +-`spread` around their means (equal lengths would keep the engine's slots in lock-step)."""

    tenant: str
    rate: float
    prompt_tokens: int
    max_tokens: int
    spread: float

    def draw(self, rng: random.Random) -> tuple[int, int]:
        def vary(mean: int) -> int:
            return max(1, round(mean * rng.uniform(1 - self.spread, 1 + self.spread)))
        return vary(self.prompt_tokens), vary(self.max_tokens)


@dataclass
class Req:
    """One request as the client saw it (times from time.perf_counter)."""

    tenant: str
    sent: float
    prompt_est: int
    max_tokens: int
    status: int | None = None
    first: float | None = None
    done: bool = False  # ended with [DONE] and no in-band error
    prompt_tokens: int | None = None  # from usage
    end: float | None = None
    window_tokens: int = 0  # content chunks received inside the measurement window


@dataclass
class Run:
    name: str
    reqs: list[Req]
    window: tuple[float, float]
    util: float | None  # engine slot-seconds busy / available, inside the window
    cpu: dict[str, float] = field(default_factory=dict)  # % of one core, inside the window

    def of(self, tenant: str) -> list[Req]:
        """The tenant's requests sent inside the window."""
        lo, hi = self.window
        return [r for r in self.reqs if r.tenant == tenant and lo <= r.sent <= hi]

    def served(self, tenant: str, w: float) -> float:
        """Weighted tokens per second served inside the window: prompt tokens (counted when
        the first token comes) + w x completion tokens (counted as they stream)."""
        lo, hi = self.window
        cost = sum(w * r.window_tokens for r in self.reqs if r.tenant == tenant)
        cost += sum(r.prompt_tokens or r.prompt_est for r in self.reqs
                    if r.tenant == tenant and r.first is not None and lo <= r.first <= hi)
        return cost / (hi - lo)

    def demand(self, tenant: str, w: float) -> float:
        """Weighted tokens per second asked for by the requests sent inside the window."""
        lo, hi = self.window
        return sum(r.prompt_est + w * r.max_tokens for r in self.of(tenant)) / (hi - lo)

    def tokens_s(self, tenant: str) -> float:
        lo, hi = self.window
        return sum(r.window_tokens for r in self.reqs if r.tenant == tenant) / (hi - lo)


def prompt_text(tokens: int, rng: random.Random) -> str:
    """About 4 characters a token, cut from a fixed text at a random place, with a random head
    so that no two prompts share a cached prefix (the real engine's prefix cache)."""
    at = rng.randrange(len(TEXT) // 2)
    return f"#{rng.getrandbits(40):010x} " + TEXT[at: at + max(0, 4 * tokens - 12)]


async def one(client: httpx.AsyncClient, url: str, headers: dict[str, str], model: str,
              req: Req, text: str, window: tuple[float, float]) -> None:
    """One streamed chat request. Events are matched as bytes (vLLM's compact JSON) rather
    than parsed: the flood's client must stay cheap on a machine it shares with the gateway."""
    body = {"model": model, "messages": [{"role": "user", "content": text}],
            "max_tokens": req.max_tokens, "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            req.status = r.status_code
            if r.status_code != 200:
                await r.aread()
                return
            pending = b""
            async for data in r.aiter_raw():
                *events, pending = (pending + data).split(b"\n\n")
                now = time.perf_counter()
                for event in events:
                    if event.startswith(b'data: {"error"'):
                        req.status = 599  # in-band error: the stream was broken off
                        return
                    if event == b"data: [DONE]":
                        req.done = req.first is not None
                    elif _USAGE in event:
                        req.prompt_tokens = json.loads(event[6:])["usage"]["prompt_tokens"]
                    elif _CONTENT in event and _EMPTY not in event:
                        req.first = req.first or now
                        req.window_tokens += int(window[0] <= now <= window[1])
    except httpx.HTTPError:
        req.status = req.status or 598
    finally:
        req.end = time.perf_counter()


_USAGE, _CONTENT, _EMPTY = b'"usage":{', b'"content":"', b'"content":""'


async def drive(url: str, model: str, loads: list[tuple[Load, dict[str, str]]],
                duration: float, warmup: float, wait_s: float, seed: int,
                on_window: list[dict[str, Any]]) -> tuple[list[Req], tuple[float, float]]:
    """Open-loop Poisson senders for `duration` s; statistics cover [warmup, duration]."""
    reqs: list[Req] = []
    start = time.perf_counter()
    window = (start + warmup, start + duration)
    # Explicit: with None, the aiohttp transport falls back to its default of 100 connections.
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=512)
    tasks: dict[str, list[asyncio.Task[None]]] = {}

    async def sender(load: Load, headers: dict[str, str], client: httpx.AsyncClient,
                     rng: random.Random) -> None:
        at = start
        while True:
            at += rng.expovariate(load.rate)
            if at > window[1]:
                return
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            prompt, max_tokens = load.draw(rng)
            req = Req(load.tenant, time.perf_counter(), prompt, max_tokens)
            reqs.append(req)
            tasks[load.tenant].append(asyncio.create_task(one(
                client, f"{url}/v1/chat/completions", headers, model, req,
                prompt_text(prompt, rng), window)))

    async def at_window_edges() -> None:
        for edge in window:
            await asyncio.sleep(max(0.0, edge - time.perf_counter()))
            on_window.append(await asyncio.to_thread(_snapshot))

    # One client per tenant: the flood never queues the quiet tenant in the client's own pool.
    # The flood's goes over aiohttp (as the gateway's engine client does): half httpcore's CPU.
    clients = {load.tenant: httpx.AsyncClient(
        timeout=wait_s + 120, limits=limits,
        transport=None if load.tenant == "q" else AiohttpTransport(limits=limits))
        for load, _ in loads}
    try:
        senders = [sender(load, h, clients[load.tenant], random.Random(f"{seed}-{load.tenant}"))
                   for load, h in loads]
        for load, _ in loads:
            tasks[load.tenant] = []
        await asyncio.gather(at_window_edges(), *senders)
        # Every request is followed to its end (served, or refused after one admission wait).
        _, late = await asyncio.wait([t for ts in tasks.values() for t in ts], timeout=wait_s + 60)
        for task in late:
            task.cancel()
    finally:
        for client in clients.values():
            await client.aclose()
    return reqs, window


_watched: dict[str, psutil.Process] = {}
_engine_stats: list[str] = []


def _snapshot() -> dict[str, Any]:
    """CPU seconds of the watched processes, and the stand-in engine's slot counters."""
    snap: dict[str, Any] = {"t": time.perf_counter(), "machine": psutil.cpu_times()}
    for name, proc in _watched.items():
        times = proc.cpu_times()
        snap[name] = times.user + times.system
    if _engine_stats:
        snap["engine_stats"] = httpx.get(_engine_stats[0], timeout=10).json()
    return snap


def usage_between(a: dict[str, Any], b: dict[str, Any]) -> tuple[dict[str, float], float | None]:
    """CPU % of one core per watched process (and of the whole machine), and the engine's
    slot utilisation, between two snapshots."""
    dt = b["t"] - a["t"]
    cpu = {n: 100 * (b[n] - a[n]) / dt for n in _watched}
    busy = [sum(m) - m.idle - getattr(m, "iowait", 0) for m in (a["machine"], b["machine"])]
    cpu["machine"] = 100 * (busy[1] - busy[0]) / dt / (psutil.cpu_count() or 1)
    util = None
    if "engine_stats" in a:
        sa, sb = a["engine_stats"], b["engine_stats"]
        util = (sb["busy_slot_s"] - sa["busy_slot_s"]) / (sb["slots"] * (sb["time_s"] - sa["time_s"]))
    return cpu, util


def wait_engine_idle(stats_url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = httpx.get(stats_url, timeout=5).json()
        if s["running"] == 0 and s["waiting"] == 0:
            return
        time.sleep(0.5)
    raise RuntimeError("the stand-in engine did not drain")


def gateway_env(args: argparse.Namespace, home: Path, port: int, engine: str, policy: str,
                model_path: Path, queue: int) -> dict[str, str]:
    return dict(os.environ, LORAPLEX_HOME=str(home), LORAPLEX_PORT=str(port),
                LORAPLEX_ADMIN_TOKEN=ADMIN, LORAPLEX_ENGINE_URL=engine,
                LORAPLEX_MODEL_PATH=str(model_path), LORAPLEX_MODEL_NAME=args.model,
                LORAPLEX_MAX_IN_FLIGHT=str(args.slots),
                LORAPLEX_TENANT_MAX_IN_FLIGHT=str(args.tenant_max_in_flight or args.slots),
                LORAPLEX_TENANT_MAX_QUEUE=str(queue),
                LORAPLEX_ADMISSION_WAIT_S=str(args.admission_wait_s),
                LORAPLEX_ADMISSION_POLICY=policy, LORAPLEX_WORKERS="0")


def make_tenants(url: str) -> dict[str, dict[str, str]]:
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    headers = {}
    for tenant in ("q", "f"):
        admin.post("/admin/tenants", json={"id": tenant}).raise_for_status()
        key = admin.post(f"/admin/tenants/{tenant}/keys", json={}).json()["key"]
        headers[tenant] = {"X-Tenant-ID": tenant, "Authorization": f"Bearer {key}"}
    return headers


def fair_shares(capacity: float, demands: dict[str, float]) -> dict[str, float]:
    """Max-min fair shares (water-filling): nobody gets more than it asks for, and what a
    tenant leaves is split evenly among the others."""
    shares, left, todo = {}, capacity, sorted(demands, key=demands.__getitem__)
    while todo:
        tenant = todo.pop(0)
        shares[tenant] = min(demands[tenant], left / (len(todo) + 1))
        left -= shares[tenant]
    return shares


def jain(run: Run, w: float) -> float | None:
    """J = (sum x)^2 / (n sum x^2), x_i = served_i / fair_share_i; capacity = all served."""
    served = {t: run.served(t, w) for t in ("q", "f")}
    if not served["f"]:
        return None
    shares = fair_shares(sum(served.values()), {t: run.demand(t, w) for t in served})
    x = [served[t] / shares[t] for t in served if shares[t] > 0]
    return sum(x) ** 2 / (len(x) * sum(v * v for v in x))


def columns(run: Run, w: float, alone_p99: float | None, f_cap: float | None) -> list[str]:
    """One scenario's column of the table (the order of ROWS)."""
    q, f = run.of("q"), run.of("f")
    ttft = [r.first - r.sent for r in q if r.done and r.first]
    p99 = pct(ttft, 0.99) if ttft else None
    # The floor no admission order can beat: from a Q arrival to the next end of an F stream.
    ends = sorted(r.end for r in run.reqs if r.tenant == "f" and r.done and r.end)
    gaps = [ends[i] - r.sent for r in q if (i := bisect.bisect(ends, r.sent)) < len(ends)]
    floor = f"{pct(gaps, 0.5) * 1000:.0f} / {pct(gaps, 0.99) * 1000:.0f} ms" if gaps else "-"
    j = jain(run, w)
    flood = [str(len(f)), str(sum(r.done for r in f)), str(sum(r.status == 429 for r in f)),
             f"{run.tokens_s('f'):.0f}", f"{run.tokens_s('f') / f_cap:.0%}" if f_cap else "-",
             f"{run.served('f', w):.0f}"] if f else ["-"] * 6
    return [str(len(q)), str(sum(r.done for r in q)), str(sum(not r.done for r in q)),
            *(f"{pct(ttft, x) * 1000:.0f} ms" if ttft else "-" for x in (0.5, 0.9)),
            f"{p99 * 1000:.0f} ms" if p99 else "-",
            f"{p99 / alone_p99:.2f}x" if p99 and alone_p99 else "-", floor,
            f"{run.served('q', w) / max(run.demand('q', w), 1e-9):.2f}", *flood,
            f"{run.util:.1%}" if run.util is not None else "-",
            f"{j:.3f}" if j is not None else "-",
            *(f"{run.cpu[k]:.0f}%" if k in run.cpu else "-"
              for k in ("gateway", "engine", "bench", "machine"))]


ROWS = ("Q requests sent", "Q completed", "Q failed (429, errors)", "Q TTFT p50", "Q TTFT p90",
        "Q TTFT p99", "Q p99 / Q p99 alone", "Q arrival -> next F end p50/99",
        "Q served / Q demand", "F requests sent", "F completed", "F answered 429",
        "F completion tokens/s", "F tokens / engine capacity", "F served weighted tok/s",
        "engine slots busy", "Jain index J", "gateway CPU", "engine CPU", "load generator CPU",
        "machine CPU busy")


def report(runs: list[Run], w: float, f_cap: float | None) -> None:
    """The table, scenarios side by side. `f_cap`: F's completion tokens/s with every slot."""
    alone = next((r for r in runs if r.name == "alone"), None)
    alone_ttft = [r.first - r.sent for r in alone.of("q") if r.done and r.first] if alone else []
    alone_p99 = pct(alone_ttft, 0.99) if alone_ttft else None
    cols = [columns(run, w, alone_p99, f_cap) for run in runs]
    print(f"\n| {'':30} | " + " | ".join(f"{r.name:>13}" for r in runs) + " |")
    print(f"|{'-' * 32}|" + "|".join("-" * 15 for _ in runs) + "|")
    for i, label in enumerate(ROWS):
        print(f"| {label:30} | " + " | ".join(f"{c[i]:>13}" for c in cols) + " |")
    ratios = [f"{run.name} {c[6]}" for run, c in zip(runs, cols, strict=True)
              if run.name != "alone"]
    if alone_p99 and ratios:
        print(f"\nQ p99 TTFT under the flood / Q p99 TTFT alone ({alone_p99 * 1000:.0f} ms): "
              + ", ".join(ratios) + " (the goal for token_fair: within 2x)")
    print(f"""
Weighted tokens = prompt tokens + {w:g} x completion tokens (the cost token_fair equalises).
Jain index J = (x_q + x_f)^2 / (2 (x_q^2 + x_f^2)), x_i = served_i / share_i, where share_i is
tenant i's max-min fair share of the capacity (here: all weighted tokens served in the window)
capped by its demand (the weighted tokens its requests in the window asked for). J = 1: each
tenant got its demand-capped fair share; J -> 1/2: one tenant got everything.
"Q arrival->next F end": while F keeps every slot busy, an arriving Q request cannot start
before some F stream ends; that wait (plus Q's TTFT alone) is the floor of any admission order.
CPU figures are % of one core inside the window (the machine figure: of all its cores).""")


def _interrupt(*_args: object) -> None:
    raise KeyboardInterrupt


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--engine-url", help="a running vLLM OpenAI server instead of the stand-in")
    p.add_argument("--model", default=DEFAULT_MODEL_NAME, help="the engine's base model name")
    p.add_argument("--model-path", type=Path,
                   help="its folder (LORAPLEX_MODEL_PATH); default: the built default model")
    p.add_argument("--scenarios", nargs="+", default=["alone", *POLICIES],
                   choices=["alone", *POLICIES])
    p.add_argument("--slots", type=int, default=32,
                   help="the gateway's in-flight limits, and the stand-in's sequences at once\n"
                        "(real engine: at most what it runs at once, vLLM --max-num-seqs)")
    p.add_argument("--step-ms", type=float, default=30.0, help="stand-in: fixed part of TTFT")
    p.add_argument("--prefill-ms-per-token", type=float, default=0.1, help="stand-in")
    p.add_argument("--decode-ms", type=float, default=30.0, help="stand-in: per further token")
    p.add_argument("--duration", type=float, default=45.0, help="seconds of load per scenario")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds left out of the figures")
    p.add_argument("--q-rate", type=float, default=4.0, help="Q requests/s (Poisson)")
    p.add_argument("--q-prompt-tokens", type=int, default=32)
    p.add_argument("--q-max-tokens", type=int, default=16)
    p.add_argument("--f-prompt-tokens", type=int, default=6000, help="mean, +-50%%")
    p.add_argument("--f-max-tokens", type=int, default=16, help="mean, +-50%%")
    p.add_argument("--f-factor", type=float, default=5.0,
                   help="stand-in: F's request rate in multiples of the engine's capacity")
    p.add_argument("--f-rate", type=float, help="F requests/s (required with --engine-url)")
    p.add_argument("--tenant-max-in-flight", type=int,
                   help="default: --slots (no per-tenant cap: a lone tenant may take every slot)")
    p.add_argument("--admission-wait-s", type=float, default=2.0)
    p.add_argument("--tenant-max-queue", type=int,
                   help="default: twice F's arrivals during one admission wait, plus --slots")
    p.add_argument("--output-weight", type=float, default=2.0,
                   help="w of the weighted tokens (LORAPLEX_FAIR_OUTPUT_TOKEN_WEIGHT's default)")
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args()
    if args.engine_url and args.f_rate is None:
        p.error("--engine-url needs --f-rate (the real engine's capacity is not known here)")
    return args


def run_scenario(args: argparse.Namespace, name: str, home: Path, engine: str, model_path: Path,
                 loads: list[Load], queue: int) -> Run:
    """A fresh gateway with the scenario's policy, its tenants, and the load."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    policy = "token_fair" if name == "alone" else name  # alone: the default, it acts on nobody
    env = gateway_env(args, home, port, engine, policy, model_path, queue)
    home.mkdir()
    with started([str(Path(sys.executable).parent / "loraplex"), "unit"], home / "gateway.log",
                 env) as gateway:
        wait_ok(f"{url}/healthz", gateway)
        _watched["gateway"] = psutil.Process(gateway.pid)
        headers = make_tenants(url)
        edges: list[dict[str, Any]] = []
        reqs, window = asyncio.run(drive(
            url, args.model, [(load, headers[load.tenant]) for load in loads], args.duration,
            args.warmup, args.admission_wait_s, args.seed, edges))
        cpu, util = usage_between(*edges)
    run = Run(name, reqs, window, util, cpu)
    statuses = {t: dict(Counter("done" if r.done else r.status for r in run.of(t)))
                for t in ("q", "f")}
    print(f"{name}: answers in the window {statuses}", flush=True)
    return run


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupt)  # a timeout or kill still stops the children
    args = parse_args()
    # F's mean time in a slot, hence the stand-in's capacity in F requests per second.
    f_busy_s = (args.step_ms + args.prefill_ms_per_token * args.f_prompt_tokens
                + args.decode_ms * (args.f_max_tokens - 1)) / 1000
    capacity = args.slots / f_busy_s
    f_cap = capacity * args.f_max_tokens  # F's completion tokens/s with every slot
    f_rate = args.f_rate or args.f_factor * capacity
    queue = args.tenant_max_queue or math.ceil(2 * f_rate * args.admission_wait_s) + args.slots
    q_load = Load("q", args.q_rate, args.q_prompt_tokens, args.q_max_tokens, 0.0)
    f_load = Load("f", f_rate, args.f_prompt_tokens, args.f_max_tokens, 0.5)

    print(f"engine: {args.engine_url or 'stand-in'}, {args.slots} slots", end="")
    if not args.engine_url:
        print(f"; TTFT = {args.step_ms:g} ms + {args.prefill_ms_per_token:g} ms x prompt "
              f"tokens, then {args.decode_ms:g} ms per token; F holds a slot {f_busy_s:.2f} s "
              f"on average: capacity {capacity:.1f} F requests/s, one slot freed every "
              f"{1000 / capacity:.0f} ms, {f_cap:.0f} F completion tokens/s with every slot",
              end="")
    print(f"\nQ: {args.q_rate:g} req/s, {args.q_prompt_tokens} prompt tokens, "
          f"{args.q_max_tokens} tokens out; F: {f_rate:.1f} req/s, ~{args.f_prompt_tokens} "
          f"prompt tokens, ~{args.f_max_tokens} out (+-50%)")
    print(f"gateway: max_in_flight = {args.slots}, tenant_max_in_flight = "
          f"{args.tenant_max_in_flight or args.slots}, tenant_max_queue = "
          f"{queue}, admission_wait_s = {args.admission_wait_s:g}; {args.duration:g} s per "
          f"scenario, the first {args.warmup:g} s left out\n", flush=True)

    model_path = args.model_path or ensure_default_model(HERE.parent / ".cache" / "models")
    runs: list[Run] = []
    _watched["bench"] = psutil.Process()
    with tempfile.TemporaryDirectory(prefix="bench-fairness-") as tmp, \
            contextlib.ExitStack() as stack:
        home = Path(tmp)
        engine = args.engine_url
        if engine is None:
            port = free_port()
            proc = stack.enter_context(started(
                [sys.executable, str(HERE / "fake_engine.py"), "--port", str(port),
                 "--slots", str(args.slots), "--step-ms", str(args.step_ms),
                 "--prefill-ms-per-token", str(args.prefill_ms_per_token),
                 "--decode-ms", str(args.decode_ms)], home / "engine.log"))
            engine = f"http://127.0.0.1:{port}"
            wait_ok(f"{engine}/health", proc)
            _watched["engine"] = psutil.Process(proc.pid)
            _engine_stats.append(f"{engine}/stats")
        for name in args.scenarios:
            loads = [q_load] if name == "alone" else [q_load, f_load]
            runs.append(run_scenario(args, name, home / name, engine, model_path, loads, queue))
            if _engine_stats:
                wait_engine_idle(_engine_stats[0])
            else:
                time.sleep(5)  # let the real engine settle
    report(runs, args.output_weight, None if args.engine_url else f_cap)
    print(f"\nmachine: {psutil.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at "
          "the end; the gateway, the stand-in engine and the load generator share them with "
          "whatever else runs (see the CPU rows).")


if __name__ == "__main__":
    main()
