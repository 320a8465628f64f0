"""Metrics, request logs, the dashboard, and the k6 / locust scenarios against the real server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import (
    ADMIN_TOKEN,
    REPO,
    Server,
    TenantHandle,
    make_tenant,
    upload_adapter,
)

pytestmark = pytest.mark.integration
DASHBOARD = REPO / "deploy" / "grafana" / "loraplex-dashboard.json"


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(snapshot: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in snapshot.items() if n == name and want <= set(ls))


@pytest.fixture(scope="module")
def observed(server: Server, adapter_dirs: list[Path]) -> TenantHandle:
    t = make_tenant(server, "obs")
    upload_adapter(server, "obs", "watched", adapter_dirs[4])
    return t


def test_metrics_move_with_traffic(server: Server, observed: TenantHandle) -> None:
    before = samples(httpx.get(f"{server.url}/metrics").text)
    r1 = observed.client.chat.completions.create(model="watched", messages=[
        {"role": "user", "content": "Hello"}], max_tokens=5, temperature=0)
    chunks = list(observed.client.chat.completions.create(
        model="watched", messages=[{"role": "user", "content": "Hello"}], max_tokens=7,
        temperature=0, stream=True))
    assert not any(c.usage for c in chunks), "usage was not asked for, so it is not sent"
    with pytest.raises(openai.NotFoundError):
        observed.client.chat.completions.create(model="nope", messages=[
            {"role": "user", "content": "x"}], max_tokens=2)
    after = samples(httpx.get(f"{server.url}/metrics").text)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    ok = {"tenant": "obs", "adapter": "watched", "endpoint": "chat", "status": "200"}
    assert delta("loraplex_requests_total", **ok) == 2
    assert delta("loraplex_requests_total", tenant="obs", status="404") == 1
    assert delta("loraplex_completion_tokens_total", tenant="obs", adapter="watched") == \
        r1.usage.completion_tokens + 7
    assert delta("loraplex_prompt_tokens_total", tenant="obs", adapter="watched") > 0
    assert delta("loraplex_time_to_first_token_seconds_count", tenant="obs") == 1
    assert delta("loraplex_inter_token_latency_seconds_count") >= 5
    assert delta("loraplex_adapter_cache_events_total", tier="engine", event="load") >= 1
    assert delta("loraplex_adapter_cache_events_total", tier="engine", event="hit") >= 1
    assert value(after, "loraplex_engine_up") == 1
    assert value(after, "loraplex_resident_adapters", tier="engine") >= 1


def test_request_id_and_access_log(server: Server, observed: TenantHandle) -> None:
    headers = {"X-Tenant-ID": "obs", "Authorization": f"Bearer {observed.key}",
               "X-Request-ID": "trace-123"}
    secret_prompt = "my secret prompt text 42"
    r = httpx.post(f"{server.url}/v1/chat/completions", headers=headers, json={
        "model": "watched", "messages": [{"role": "user", "content": secret_prompt}],
        "max_tokens": 3})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-123"
    generated = httpx.get(f"{server.url}/healthz").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    lines = [json.loads(line[line.index("{"):])
             for line in server.log.read_text().splitlines() if '"request_id": "trace-123"' in line]
    assert lines, "no access log line for the request"
    entry = lines[-1]
    assert entry["tenant"] == "obs" and entry["adapter"] == "watched"
    assert entry["status"] == 200 and entry["completion_tokens"] > 0
    assert secret_prompt not in server.log.read_text()


def test_dashboard_queries_name_exported_metrics(server: Server, observed: TenantHandle) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = set()
    for text in (httpx.get(f"{server.url}/metrics").text,
                 httpx.get(f"{server.url}/metrics/engine").text):
        for family in text_string_to_metric_families(text):
            # A labelled family with no series yet (no running job, no 429 so far) is still
            # exported: a counter's series would be named <family>_total.
            exported |= {s.name for s in family.samples} | {family.name}
            if family.type == "counter":
                exported.add(family.name + "_total")
    # row panels group others and query nothing
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    names = {n for e in exprs for n in re.findall(r"\b(?:loraplex_|vllm:)[A-Za-z0-9_:]+", e)}
    missing = sorted(names - exported)
    assert not missing, f"dashboard queries metrics the server does not export: {missing}"


@pytest.fixture(scope="module")
def targets(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("load") / "targets.json"
    subprocess.run([sys.executable, str(REPO / "loadtest" / "prepare.py"), "--url", server.url,
                    "--admin-token", ADMIN_TOKEN, "--tenants", "2", "--adapters", "2",
                    "--out", str(path)], check=True, timeout=300)
    return path


def test_k6_scenario_runs_clean(targets: Path) -> None:
    k6 = Path(sys.executable).parent / "k6"
    out = subprocess.run([str(k6), "run", "-q", "-e", f"TARGETS={targets}", "-e", "VUS=2",
                          "-e", "DURATION=8s", "-e", "MAX_TOKENS=8",
                          str(REPO / "loadtest" / "k6" / "chat.js")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "loraplex k6:" in out.stdout and "errors: 0.00%" in out.stdout, out.stdout
    assert "TTFT ms p50" in out.stdout


def test_locust_scenario_runs_clean(server: Server, targets: Path) -> None:
    locust = Path(sys.executable).parent / "locust"
    out = subprocess.run([str(locust), "-f", str(REPO / "loadtest" / "locustfile.py"),
                          "--headless", "-u", "2", "-r", "2", "-t", "8s", "--host", server.url,
                          "--only-summary"],
                         env={**os.environ, "LORAPLEX_TARGETS": str(targets)},
                         capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "TTFT" in text and "loraplex locust:" in text and "errors 0" in text, text
