"""Adapters from S3: a real S3 endpoint on loopback (moto server) behind a TCP proxy the tests
can cut, and a real `loraplex up` whose store is that S3."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import (
    BASE,
    Server,
    TenantHandle,
    make_tenant,
    running_server,
    scrape_metric,
    upload_adapter,
)
from tests.s3_server import DUMMY_ENV, MotoS3Server
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

STORE_BUCKET, SOURCE_BUCKET = "adapters", "sources"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


class S3Env:
    def __init__(self, moto: MotoS3Server, proxy: TcpProxy, server: Server) -> None:
        self.moto, self.proxy, self.server = moto, proxy, server
        self.s3 = moto.client()


@pytest.fixture(scope="module")
def s3env(base_model: Path, tmp_path_factory: pytest.TempPathFactory,
          monkeypatch_module: pytest.MonkeyPatch) -> Iterator[S3Env]:
    for k, v in DUMMY_ENV.items():
        monkeypatch_module.setenv(k, v)
    with MotoS3Server() as moto, TcpProxy(moto.port) as proxy:
        client = moto.client()
        for bucket in (STORE_BUCKET, SOURCE_BUCKET, "elsewhere"):
            client.create_bucket(Bucket=bucket)
        home = tmp_path_factory.mktemp("s3home")
        with running_server(
            base_model, home,
            LORAPLEX_STORE=f"s3://{STORE_BUCKET}/loraplex",
            LORAPLEX_S3_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}",
            LORAPLEX_S3_SOURCE_ALLOWLIST=f"s3://{SOURCE_BUCKET}/team-a",
            LORAPLEX_S3_CONNECT_TIMEOUT_S="1", LORAPLEX_S3_READ_TIMEOUT_S="5",
            LORAPLEX_S3_MAX_ATTEMPTS="2",
            # Room for about two 3.7 MB adapters: churn evicts from the disk tier too.
            LORAPLEX_CACHE_MAX_BYTES=str(9 * 1024 * 1024),
        ) as server:
            yield S3Env(moto, proxy, server)


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def tenant(s3env: S3Env) -> TenantHandle:
    return make_tenant(s3env.server, "s3t")


def chat(t: TenantHandle, model: str) -> httpx.Response:
    return httpx.post(f"{t.client.base_url}chat/completions", timeout=300,
                      headers={"X-Tenant-ID": t.id, "Authorization": f"Bearer {t.key}"},
                      json={"model": model, "messages": QUESTION, "max_tokens": 12,
                            "temperature": 0})


def put_source(env: S3Env, prefix: str, folder: Path) -> None:
    for name in ADAPTER_FILES:
        env.s3.put_object(Bucket=SOURCE_BUCKET, Key=f"{prefix}/{name}",
                          Body=(folder / name).read_bytes())


def register_source(env: S3Env, name: str, uri: str) -> httpx.Response:
    with env.server.admin() as c:
        return c.post(f"/admin/tenants/s3t/adapters/{name}/versions", json={"source": uri})


def gateway_metric(server: Server, name: str, **labels: str) -> float:
    return scrape_metric(server.url, name, **labels)


def test_register_from_s3_and_serve(s3env: S3Env, tenant: TenantHandle,
                                    adapter_dirs: list[Path]) -> None:
    put_source(s3env, "team-a/bot1", adapter_dirs[0])
    r = register_source(s3env, "bot1", f"s3://{SOURCE_BUCKET}/team-a/bot1/")
    assert r.status_code == 201, r.text
    assert r.json()["source"].startswith("s3://")
    answer = chat(tenant, "bot1")
    assert answer.status_code == 200, answer.text
    base = chat(tenant, BASE).json()["choices"][0]["message"]["content"]
    assert answer.json()["choices"][0]["message"]["content"] != base
    # The managed, immutable layout: files and a manifest with their sha256.
    keys = [o["Key"] for o in s3env.s3.list_objects_v2(
        Bucket=STORE_BUCKET, Prefix="loraplex/s3t/bot1/")["Contents"]]
    manifest_key = next(k for k in keys if k.endswith("manifest.json"))
    manifest = json.loads(s3env.s3.get_object(Bucket=STORE_BUCKET,
                                              Key=manifest_key)["Body"].read())
    assert set(manifest["files"]) == set(ADAPTER_FILES)
    assert manifest["files"]["adapter_model.safetensors"]["sha256"] == r.json()["sha256"]


def test_source_allowlist_is_enforced(s3env: S3Env, tenant: TenantHandle,
                                      adapter_dirs: list[Path]) -> None:
    for bucket, prefix in ((SOURCE_BUCKET, "team-b/x"), (SOURCE_BUCKET, "team-a-evil/x"),
                           ("elsewhere", "team-a/x")):
        for name in ADAPTER_FILES:
            s3env.s3.put_object(Bucket=bucket, Key=f"{prefix}/{name}",
                                Body=(adapter_dirs[0] / name).read_bytes())
        r = register_source(s3env, "sneaky", f"s3://{bucket}/{prefix}/")
        assert r.status_code == 403, (prefix, r.text)
        assert r.json()["error"]["code"] == "source_not_allowed"


def test_upload_lands_in_s3(s3env: S3Env, tenant: TenantHandle,
                            adapter_dirs: list[Path]) -> None:
    v = upload_adapter(s3env.server, "s3t", "uploaded", adapter_dirs[1])
    listed = s3env.s3.list_objects_v2(Bucket=STORE_BUCKET, Prefix="loraplex/s3t/uploaded/")
    assert {k["Key"].rsplit("/", 1)[-1] for k in listed["Contents"]} == \
        {*ADAPTER_FILES, "manifest.json"}
    assert chat(tenant, f"uploaded@{v['version']}").status_code == 200


def test_churn_evicts_and_downloads_again(s3env: S3Env, tenant: TenantHandle,
                                          adapter_dirs: list[Path]) -> None:
    names = [f"churn{i}" for i in range(4)]
    for name, folder in zip(names, adapter_dirs[2:], strict=True):
        upload_adapter(s3env.server, "s3t", name, folder)
    srv = s3env.server
    fetched = gateway_metric(srv, "loraplex_adapter_cache_events_total", tier="disk", event="load")
    for name in names + names[:1]:
        r = chat(tenant, name)
        assert r.status_code == 200, r.text
    assert gateway_metric(srv, "loraplex_adapter_cache_events_total", tier="disk",
                          event="eviction") > 0
    assert gateway_metric(srv, "loraplex_adapter_cache_events_total", tier="engine",
                          event="eviction") > 0
    # churn0 was downloaded, evicted from disk, and downloaded again.
    assert gateway_metric(srv, "loraplex_adapter_cache_events_total", tier="disk",
                          event="load") - fetched == len(names) + 1


def test_corrupted_object_is_refused(s3env: S3Env, tenant: TenantHandle,
                                     adapter_dirs: list[Path]) -> None:
    v = upload_adapter(s3env.server, "s3t", "tampered", adapter_dirs[5])
    listed = s3env.s3.list_objects_v2(Bucket=STORE_BUCKET, Prefix="loraplex/s3t/tampered/")
    weights = next(o["Key"] for o in listed["Contents"]
                   if o["Key"].endswith("adapter_model.safetensors"))
    body = bytearray(s3env.s3.get_object(Bucket=STORE_BUCKET, Key=weights)["Body"].read())
    body[-100:] = bytes(100)  # same size, different bytes
    s3env.s3.put_object(Bucket=STORE_BUCKET, Key=weights, Body=bytes(body))
    r = chat(tenant, "tampered")
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "adapter_corrupt"
    engine = httpx.get(f"{s3env.server.engine_url()}/v1/models").json()["data"]
    assert v["engine_name"] not in {m["id"] for m in engine}


def test_s3_outage_keeps_warm_adapters_serving(s3env: S3Env, tenant: TenantHandle,
                                               adapter_dirs: list[Path]) -> None:
    upload_adapter(s3env.server, "s3t", "warm", adapter_dirs[3])
    upload_adapter(s3env.server, "s3t", "cold", adapter_dirs[4])
    assert chat(tenant, "warm").status_code == 200
    s3env.proxy.cut()
    try:
        assert chat(tenant, "warm").status_code == 200
        r = chat(tenant, "cold")
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "store_unavailable"
        assert int(r.headers["Retry-After"]) > 0
        assert chat(tenant, BASE).status_code == 200
    finally:
        s3env.proxy.restore()
    deadline = time.monotonic() + 30
    r = chat(tenant, "cold")
    while r.status_code == 503 and time.monotonic() < deadline:
        time.sleep(1)
        r = chat(tenant, "cold")
    assert r.status_code == 200, r.text
