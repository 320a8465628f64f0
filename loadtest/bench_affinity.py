"""Adapter affinity against round robin, behind a real Envoy, measured in one run.

Two serving units (`loraplex unit`: the real gateway, each with a stand-in engine that takes
`--load-ms` to load an adapter and streams at `--gap-ms` per token), a real S3 endpoint on
loopback as the adapter store, a shared SQLite registry, and a real Envoy rendered by
`server.cluster.envoy` in front. 40 adapters, requests drawn with Zipf popularity (exponent
`--zipf`), `--slots` engine slots per unit. For each policy (round robin, then affinity) the
units start afresh (empty disk caches and engine slots) and get the same request sequence:

    .venv/bin/python loadtest/bench_affinity.py --adapters 40 --slots 4 --requests 400

Reported per policy: adapter loads into the engines (and per 100 requests), disk-cache
fetches from S3, throughput, TTFT p50/p99. Loopback only, bounded by --requests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from bench import ADMIN, Sample, one_stream, pct  # noqa: E402

from adapters.base_model import ensure_default_model  # noqa: E402
from adapters.synthetic import make_random_adapters  # noqa: E402
from server.cluster.envoy import EnvoyTuning, envoy_command, render_envoy_config, to_yaml  # noqa: E402
from server.engine.process import free_port  # noqa: E402
from server.settings import DEFAULT_MODEL_NAME  # noqa: E402
from tests.s3_server import DUMMY_ENV, MotoS3Server  # noqa: E402

BUCKET = "bench-affinity"


@dataclass
class Result:
    policy: str
    samples: list[Sample]
    wall: float
    loads: int
    fetches: int
    per_unit: list[int]  # requests each unit served

    @property
    def tok_s(self) -> float:
        return sum(s.tokens for s in self.samples) / self.wall


def zipf_sequence(adapters: int, requests: int, exponent: float, seed: int) -> list[int]:
    weights = [1 / (rank ** exponent) for rank in range(1, adapters + 1)]
    return random.Random(seed).choices(range(adapters), weights, k=requests)


def wait_for(url: str, procs: list[subprocess.Popen[bytes]], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a process exited while waiting for {url}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.25)
    raise RuntimeError(f"{url} not ready in time")


@contextlib.contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def start_units(home: Path, run: str, engines: list[str], model: Path, s3: MotoS3Server,
                slots: int, procs: list[subprocess.Popen[bytes]]) -> list[str]:
    units = []
    for i, engine in enumerate(engines):
        port = free_port()
        unit_dir = home / "units" / f"{run}-{i}"  # its own disk cache: every run starts cold
        unit_dir.mkdir(parents=True)
        env = dict(os.environ, **DUMMY_ENV, LORAPLEX_HOME=str(home), LORAPLEX_PORT=str(port),
                   LORAPLEX_UNIT_DIR=str(unit_dir), LORAPLEX_ENGINE_URL=engine,
                   LORAPLEX_MODEL_PATH=str(model), LORAPLEX_ADMIN_TOKEN=ADMIN,
                   LORAPLEX_STORE=f"s3://{BUCKET}/adapters",
                   LORAPLEX_S3_ENDPOINT_URL=s3.endpoint_url,
                   LORAPLEX_MAX_LORAS=str(min(slots, 4)),
                   LORAPLEX_MAX_RESIDENT_ADAPTERS=str(slots))
        log = (unit_dir / "unit.log").open("wb")
        procs.append(subprocess.Popen([str(Path(sys.executable).parent / "loraplex"), "unit"],
                                      env=env, stdout=log, stderr=subprocess.STDOUT))
        units.append(f"127.0.0.1:{port}")
    for unit in units:
        wait_for(f"http://{unit}/healthz", procs)
    return units


def start_envoy(home: Path, run: str, units: list[str], affinity: bool,
                procs: list[subprocess.Popen[bytes]]) -> str:
    port = free_port()
    config = home / f"envoy-{run}.yaml"
    config.write_text(to_yaml(render_envoy_config(
        units, listen_port=port, listen_host="127.0.0.1", admin_port=free_port(),
        tuning=EnvoyTuning(affinity=affinity))))
    log = (home / f"envoy-{run}.log").open("wb")
    procs.append(subprocess.Popen(envoy_command(config, concurrency=1), stdout=log,
                                  stderr=subprocess.STDOUT))
    front = f"http://127.0.0.1:{port}"
    wait_for(f"{front}/healthz", procs)
    return front


async def drive(front: str, headers: dict[str, str], names: list[str], sequence: list[int],
                concurrency: int, max_tokens: int) -> tuple[list[Sample], float]:
    queue = list(sequence)
    samples: list[Sample] = []
    url = f"{front}/v1/chat/completions"

    async def client() -> None:
        async with httpx.AsyncClient(timeout=120) as http:
            while queue:
                adapter = queue.pop(0)
                samples.append(await one_stream(http, url, headers, names[adapter], max_tokens))

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return samples, time.perf_counter() - started


def engine_counters(units: list[str]) -> tuple[int, int]:
    loads = fetches = 0
    for unit in units:
        status = httpx.get(f"http://{unit}/admin/engine", timeout=10,
                           headers={"Authorization": f"Bearer {ADMIN}"}).json()
        loads += status["adapters"]["stats"]["loads"]
        fetches += (status["disk_cache"] or {}).get("fetches", 0)
    return loads, fetches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--adapters", type=int, default=40)
    p.add_argument("--slots", type=int, default=4, help="engine adapter slots per unit")
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--gap-ms", type=float, default=20.0, help="stand-in engine: per token")
    p.add_argument("--load-ms", type=float, default=200.0,
                   help="stand-in engine: per adapter load (a GPU load of a mid-size adapter)")
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args()

    model = ensure_default_model(HERE.parent / ".cache" / "models")
    sequence = zipf_sequence(args.adapters, args.requests, args.zipf, args.seed)
    with tempfile.TemporaryDirectory(prefix="bench-affinity-") as tmp, \
            MotoS3Server() as s3, processes() as procs:
        home = Path(tmp)
        s3.client().create_bucket(Bucket=BUCKET)
        engines = []
        for _ in range(2):
            port = free_port()
            procs.append(subprocess.Popen(
                [sys.executable, str(HERE / "fake_engine.py"), "--port", str(port),
                 "--gap-ms", str(args.gap_ms), "--load-ms", str(args.load_ms)]))
            engines.append(f"http://127.0.0.1:{port}")
        for engine in engines:
            wait_for(f"{engine}/health", procs)
        adapter = make_random_adapters(model, home / "made", 1, rank=8, std=0.01,
                                       base_model_name=DEFAULT_MODEL_NAME)[0]
        names = [f"skill-{i:02d}" for i in range(args.adapters)]
        results = []
        for run, affinity in (("round-robin", False), ("affinity", True)):
            with processes() as run_procs:
                units = start_units(home, run, engines, model, s3, args.slots, run_procs)
                front = start_envoy(home, run, units, affinity, run_procs)
                admin = httpx.Client(base_url=front, timeout=120,
                                     headers={"Authorization": f"Bearer {ADMIN}"})
                if not results:  # the registry and the store outlive the units
                    admin.post("/admin/tenants", json={"id": "bench"}).raise_for_status()
                    for name in names:
                        files = {f.name: f.read_bytes() for f in adapter.iterdir()
                                 if f.name.startswith("adapter_")}
                        admin.post(f"/admin/tenants/bench/adapters/{name}/versions",
                                   files=files).raise_for_status()
                key = admin.post("/admin/tenants/bench/keys", json={}).json()["key"]
                headers = {"X-Tenant-ID": "bench", "Authorization": f"Bearer {key}"}
                samples, wall = asyncio.run(drive(
                    front, headers, names, sequence, args.concurrency, args.max_tokens))
                loads, fetches = engine_counters(units)
                results.append(Result(run, samples, wall, loads, fetches,
                                      [sum(s.unit == u for s in samples) for u in units]))
                print(f"{run}: done in {wall:.1f}s", flush=True)

    print(f"\n2 units, {args.adapters} adapters (Zipf {args.zipf}), {args.slots} slots per unit, "
          f"{args.requests} requests x {args.max_tokens} tokens at {args.concurrency} streams, "
          f"adapter load {args.load_ms:.0f} ms\n")
    print(f"{'policy':<12} {'loads':>6} {'/100 req':>9} {'S3 fetches':>11} {'tok/s':>8} "
          f"{'TTFT p50':>9} {'TTFT p99':>9}  requests per unit")
    for r in results:
        ttft = [s.ttft for s in r.samples]
        print(f"{r.policy:<12} {r.loads:>6} {100 * r.loads / len(r.samples):>9.1f} "
              f"{r.fetches:>11} {r.tok_s:>8.1f} {pct(ttft, 0.5) * 1000:>7.1f}ms "
              f"{pct(ttft, 0.99) * 1000:>7.1f}ms  {r.per_unit}")
    rr, aff = results
    print(f"\naffinity / round robin: loads {aff.loads / max(rr.loads, 1):.2f}x, "
          f"S3 fetches {aff.fetches / max(rr.fetches, 1):.2f}x, "
          f"throughput {aff.tok_s / rr.tok_s:.3f}x")


if __name__ == "__main__":
    main()
