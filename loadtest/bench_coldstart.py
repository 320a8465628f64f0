"""Cold-adapter cost with an S3 store, measured side by side in one run.

Starts a real S3 endpoint on loopback (moto server) and `loraplex up` with `LORAPLEX_STORE`
on it, registers many adapters, then measures:
  - time to first token of an adapter's first request (S3 -> disk cache -> engine -> token)
    against its second request (warm), for several adapters;
  - churn: requests cycling through N distinct adapters with fewer engine slots and a small
    disk cache (every request cold) against the same number of requests over as many
    adapters as there are slots (all warm).

    .venv/bin/python loadtest/bench_coldstart.py --adapters 50 --slots 4 --requests 50

Loopback only, bounded by --requests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from bench import bench_tenant, one_stream, start_server, wait_healthy  # noqa: E402

from adapters.base_model import ensure_default_model  # noqa: E402
from adapters.synthetic import make_random_adapters  # noqa: E402
from server.engine.process import free_port  # noqa: E402
from server.settings import DEFAULT_MODEL_NAME  # noqa: E402
from tests.s3_server import DUMMY_ENV, MotoS3Server  # noqa: E402


def ms(values: list[float]) -> str:
    return f"p50 {statistics.median(values) * 1000:.0f} ms, max {max(values) * 1000:.0f} ms"


async def main_async(args: argparse.Namespace) -> None:
    os.environ.update(DUMMY_ENV)
    model = ensure_default_model(HERE.parent / ".cache" / "models")
    home = Path(tempfile.mkdtemp(prefix="loraplex-cold-"))
    folders = make_random_adapters(model, home / "made", args.adapters, rank=8,
                                   targets=("q_proj", "v_proj"),
                                   base_model_name=DEFAULT_MODEL_NAME)
    size = sum(f.stat().st_size for f in folders[0].iterdir())
    with MotoS3Server() as s3:
        s3.client().create_bucket(Bucket="adapters")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(home, model, port, args.slots,
                            LORAPLEX_STORE="s3://adapters/bench",
                            LORAPLEX_S3_ENDPOINT_URL=s3.endpoint_url,
                            # A disk cache that holds a little more than the engine slots.
                            LORAPLEX_CACHE_MAX_BYTES=str(max(size * (args.slots + 2), 1 << 20)))
        try:
            print(f"engine start: {wait_healthy(url, proc):.1f} s; adapter size {size / 1e6:.1f} MB")
            admin, headers = bench_tenant(url)
            started = time.perf_counter()
            for i, folder in enumerate(folders):
                files = {n: (n, (folder / n).read_bytes())
                         for n in ("adapter_config.json", "adapter_model.safetensors")}
                admin.post(f"/admin/tenants/bench/adapters/a{i}/versions",
                           files=files).raise_for_status()
            print(f"registered {len(folders)} adapters into S3 in "
                  f"{time.perf_counter() - started:.1f} s")
            chat = f"{url}/v1/chat/completions"
            async with httpx.AsyncClient(timeout=600) as c:
                await one_stream(c, chat, headers, DEFAULT_MODEL_NAME, 2)  # warm the engine
                cold, warm = [], []
                for i in range(args.probe):
                    cold.append((await one_stream(c, chat, headers, f"a{i}", 1)).ttft)
                    warm.append((await one_stream(c, chat, headers, f"a{i}", 1)).ttft)
                print(f"\nTTFT, cold adapter (S3 -> disk -> engine): {ms(cold)}")
                print(f"TTFT, warm adapter (same adapter again):   {ms(warm)}")
                print(f"cold/warm p50: {statistics.median(cold) / statistics.median(warm):.2f}x, "
                      f"+{(statistics.median(cold) - statistics.median(warm)) * 1000:.0f} ms")

                async def cycle(names: list[str]) -> tuple[float, list[float]]:
                    t0, ttfts = time.perf_counter(), []
                    for r in range(args.requests):
                        ttfts.append((await one_stream(c, chat, headers, names[r % len(names)],
                                                       args.max_tokens)).ttft)
                    return time.perf_counter() - t0, ttfts

                hot = [f"a{i}" for i in range(args.slots)]
                for name in hot:  # load them
                    await one_stream(c, chat, headers, name, 1)
                warm_s, warm_ttft = await cycle(hot)
                churn_s, churn_ttft = await cycle([f"a{i}" for i in range(args.adapters)])
            print(f"\n{args.requests} requests, {args.max_tokens} tokens each, one at a time:")
            print(f"  over {args.slots} resident adapters: {warm_s:.1f} s, TTFT {ms(warm_ttft)}")
            print(f"  churning {args.adapters} adapters through {args.slots} slots: "
                  f"{churn_s:.1f} s, TTFT {ms(churn_ttft)}")
            print(f"  churn cost: {churn_s / warm_s:.2f}x wall time, "
                  f"+{(churn_s - warm_s) / args.requests * 1000:.0f} ms per request")
            stats = admin.get("/admin/engine").json()
            print(f"  engine tier: {stats['adapters']['stats']}")
            disk = stats["disk_cache"]
            print(f"  disk tier: hits {disk['hits']}, misses {disk['misses']}, "
                  f"fetches {disk['fetches']}, evictions {disk['evictions']}")
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--adapters", type=int, default=50)
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--probe", type=int, default=8, help="adapters for the cold/warm TTFT pairs")
    p.add_argument("--max-tokens", type=int, default=8)
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
