"""Throughput of one unit with 1, 2 and 4 gateway processes (LORAPLEX_GATEWAY_PROCESSES), in one
run, against the stand-in engine (loadtest/fake_engine.py: it streams at a fixed pace, so the
gateway is what is measured), with the stand-in straight as the reference.

For each process count it starts `loraplex unit` on the stand-in and a real Redis (more than one
process needs it; one process gets it too, for the same work per request), then runs each
concurrency level: closed-loop streamed chat requests of `--max-tokens` tokens, from
`--client-processes` client processes (one Python client cannot keep up with 256 streams). It
reports output tokens/s, TTFT p50/p99 and the unit's CPU per token (all its processes).

    .venv/bin/python loadtest/bench_processes.py --processes 1 2 4 --concurrency 64 256

The machine's core count bounds what more processes can give: the figures are for this box.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adapters.base_model import ensure_default_model  # noqa: E402
from loadtest.bench import (  # noqa: E402
    ADMIN,
    PROMPT,
    bench_tenant,
    cpu_seconds,
    pct,
    started,
    wait_healthy,
    wait_ok,
)
from server.engine.process import free_port  # noqa: E402
from server.settings import DEFAULT_MODEL_NAME  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402


async def _stream(client: httpx.AsyncClient, headers: dict[str, str],
                  max_tokens: int) -> tuple[float, int]:
    """One streamed request: (time to first token, completion tokens). Events are counted,
    not parsed: the client must cost less than what it measures."""
    body = {"model": DEFAULT_MODEL_NAME, "messages": PROMPT, "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, events, tail = 0.0, 0, b""
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        r.raise_for_status()
        async for data in r.aiter_raw():
            if not ttft:
                ttft = time.perf_counter() - start
            events += (tail + data).count(b"\n\n")  # event ends, one split over two reads too
            tail = b"\n" if data.endswith(b"\n") and not data.endswith(b"\n\n") else b""
    return ttft, max(0, events - 3)  # less the role, the usage and [DONE] events


def _client(url: str, headers: dict[str, str], streams: int, requests: int, max_tokens: int,
            out: multiprocessing.Queue[list[tuple[float, int]]]) -> None:
    async def run() -> list[tuple[float, int]]:
        left = [requests]
        results: list[tuple[float, int]] = []
        limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
            async def worker() -> None:
                while left[0] > 0:
                    left[0] -= 1
                    try:
                        results.append(await _stream(client, headers, max_tokens))
                    except httpx.HTTPError as exc:  # counted and shown, not fatal
                        print(f"request failed: {type(exc).__name__}: {exc}", flush=True)
                        results.append((-1.0, 0))
            await asyncio.gather(*(worker() for _ in range(streams)))
        return results

    out.put(asyncio.run(run()))


def load(url: str, headers: dict[str, str], concurrency: int, requests: int, max_tokens: int,
         clients: int) -> tuple[list[tuple[float, int]], float]:
    """`requests` streams, `concurrency` at a time, split over `clients` processes."""
    out: multiprocessing.Queue[list[tuple[float, int]]] = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_client, args=(
        url, headers, concurrency // clients, requests // clients, max_tokens, out))
        for _ in range(clients)]
    start = time.perf_counter()
    for p in procs:
        p.start()
    samples = [s for _ in procs for s in out.get()]
    wall = time.perf_counter() - start
    for p in procs:
        p.join()
    return samples, wall


def unit_cpu(root: psutil.Process) -> float:
    """CPU seconds of the unit: its own process and its gateway processes."""
    return cpu_seconds(root) + sum(cpu_seconds(c) for c in root.children(recursive=True))


def report(label: str, samples: list[tuple[float, int]], wall: float,
           cpu_s: float | None) -> float:
    failed = sum(1 for t, _ in samples if t < 0)
    samples = [s for s in samples if s[0] >= 0]
    tokens = sum(t for _, t in samples)
    ttfts = [t for t, _ in samples] or [0.0]
    per_token = f"{cpu_s / tokens * 1e6:7.1f}" if cpu_s is not None and tokens else "      -"
    print(f"{label:28} {len(samples):5} {tokens / wall:9.0f} {pct(ttfts, 0.5) * 1e3:8.1f}ms "
          f"{pct(ttfts, 0.99) * 1e3:8.1f}ms {per_token}"
          + (f"  ({failed} failed)" if failed else ""), flush=True)
    return tokens / wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    p.add_argument("--requests", type=int, default=512, help="per concurrency level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--gap-ms", type=float, default=10.0, help="stand-in: ms between tokens")
    p.add_argument("--client-processes", type=int, default=2)
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-processes-"))
    model = ensure_default_model(REPO / ".cache" / "models")
    engine_port = free_port()
    engine = f"http://127.0.0.1:{engine_port}"
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; stand-in "
          f"gap {args.gap_ms} ms, {args.max_tokens} tokens per request, "
          f"{args.client_processes} client processes")
    print(f"{'':28} {'req':>5} {'tok/s':>9} {'TTFT p50':>10} {'TTFT p99':>10} {'us CPU/tok':>10}")
    results: dict[tuple[str, int], float] = {}
    with RedisServer() as redis, started(
            [sys.executable, str(REPO / "loadtest" / "fake_engine.py"), "--port",
             str(engine_port), "--gap-ms", str(args.gap_ms)], work / "engine.log") as stand_in:
        wait_ok(f"{engine}/health", stand_in)
        for conc in args.concurrency:
            samples, wall = load(engine, {}, conc, args.requests, args.max_tokens,
                                 args.client_processes)
            results[("direct", conc)] = report(f"stand-in direct @ {conc}", samples, wall, None)
        for n in args.processes:
            home = work / f"unit-{n}"
            home.mkdir()
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            env = dict(os.environ, LORAPLEX_HOME=str(home), LORAPLEX_PORT=str(port),
                       LORAPLEX_ADMIN_TOKEN=ADMIN, LORAPLEX_MODEL_PATH=str(model),
                       LORAPLEX_ENGINE_URL=engine, LORAPLEX_GATEWAY_PROCESSES=str(n),
                       LORAPLEX_REDIS_URL=redis.url(n), LORAPLEX_MAX_IN_FLIGHT="1024",
                       LORAPLEX_TENANT_MAX_IN_FLIGHT="1024")
            argv = [str(Path(sys.executable).parent / "loraplex"), "unit"]
            with started(argv, home / "unit.log", env) as unit:
                wait_healthy(url, unit)
                _, headers = bench_tenant(url)
                root = psutil.Process(unit.pid)
                for conc in args.concurrency:
                    before = unit_cpu(root)
                    samples, wall = load(url, headers, conc, args.requests, args.max_tokens,
                                         args.client_processes)
                    results[(f"{n}", conc)] = report(f"unit, {n} gateway process(es) @ {conc}",
                                                     samples, wall, unit_cpu(root) - before)
    print()
    for conc in args.concurrency:
        base = results.get(("1", conc))
        for n in args.processes:
            ratio = results[(f"{n}", conc)] / base if base else float("nan")
            print(f"@ {conc} streams: {n} process(es) {results[(f'{n}', conc)]:8.0f} tok/s = "
                  f"{ratio:.2f}x of 1 process, {results[(f'{n}', conc)] / results[('direct', conc)]:.2f}x "
                  "of the stand-in direct")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
