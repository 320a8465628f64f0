"""Locust scenario: several tenants, streaming and not, Zipf-skewed adapter popularity.

    LORAPLEX_TARGETS=loadtest/targets.json .venv/bin/locust -f loadtest/locustfile.py \
        --headless -u 8 -r 4 -t 60s --host http://127.0.0.1:8000

LORAPLEX_TARGETS comes from loadtest/prepare.py. Besides locust's own request statistics it
reports a `TTFT` entry (time to the first streamed token) and, at the end, completion
tokens/s and the error count. Loopback only; bounded by -t.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

from locust import HttpUser, between, events, task

TARGETS = json.loads(Path(os.environ.get("LORAPLEX_TARGETS", "loadtest/targets.json")).read_text())
MAX_TOKENS = int(os.environ.get("LORAPLEX_MAX_TOKENS", "16"))
ZIPF_S = float(os.environ.get("LORAPLEX_ZIPF_S", "1.1"))
STREAM_SHARE = float(os.environ.get("LORAPLEX_STREAM_SHARE", "0.5"))

CHOICES = [(t, m) for t in TARGETS["tenants"] for m in [TARGETS["base_model"], *t["models"]]]
WEIGHTS = [1 / (rank + 1) ** ZIPF_S for rank in range(len(CHOICES))]
TOTALS = {"completion_tokens": 0, "errors": 0, "started": time.monotonic()}


class Tenant(HttpUser):
    wait_time = between(0, 0.1)

    @task
    def chat(self) -> None:
        tenant, model = random.choices(CHOICES, WEIGHTS)[0]
        stream = random.random() < STREAM_SHARE
        body = {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0.7, "stream": stream,
                "messages": [{"role": "user", "content": "Tell me one fact about the sea."}]}
        if stream:
            body["stream_options"] = {"include_usage": True}
        headers = {"X-Tenant-ID": tenant["id"], "Authorization": f"Bearer {tenant['key']}"}
        name = "chat (stream)" if stream else "chat"
        started = time.perf_counter()
        with self.client.post("/v1/chat/completions", json=body, headers=headers, name=name,
                              stream=stream, catch_response=True, timeout=300) as r:
            if r.status_code != 200:
                TOTALS["errors"] += 1
                r.failure(f"status {r.status_code}")
                return
            usage = None
            if stream:
                first = None
                for line in r.iter_lines(decode_unicode=True):
                    if not line or not line.startswith("data: {"):
                        continue
                    if first is None and '"content":"' in line and '"content":""' not in line:
                        first = time.perf_counter()
                        events.request.fire(request_type="TTFT", name=name,
                                            response_time=(first - started) * 1000,
                                            response_length=0, exception=None, context={})
                    if '"usage":{' in line:
                        usage = json.loads(line[6:]).get("usage")
            else:
                usage = r.json().get("usage")
            if usage:
                TOTALS["completion_tokens"] += usage["completion_tokens"]
            r.success()


@events.quitting.add_listener
def _report(environment, **_kwargs) -> None:  # type: ignore[no-untyped-def]
    secs = time.monotonic() - TOTALS["started"]
    print(f"loraplex locust: completion tokens/s {TOTALS['completion_tokens'] / secs:.1f}, "
          f"errors {TOTALS['errors']}")
