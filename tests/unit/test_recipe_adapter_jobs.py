"""Skill merging and merged-model export through the admin API (server/adapter_jobs.py) and
the worker: a merge request is checked at once (400s) and answered 202 with its job; the worker
registers the result like any version; an export is a job whose folder lands in the store,
checksummed. PEFT's merge and the export are stand-ins here (tests/unit/test_recipe_merging.py
runs the real ones on a tiny model)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import adapters.training.export as export_module
import adapters.training.merging as merging_module
from adapters.base_model import BaseModelInfo
from adapters.training.worker import Worker
from adapters.validation import AdapterLimits, sha256_file
from tests.unit.conftest import BASE_MODEL, Gw, write_adapter

VERSIONS = "/admin/tenants/acme/adapters/{}/versions"


@pytest.fixture
async def acme(gw: Gw, make_adapter: Callable[..., Path]) -> None:
    await gw.new_tenant("acme")
    await gw.register("acme", "french", make_adapter(r=8, seed=1))
    await gw.register("acme", "french", make_adapter(r=8, seed=2))
    await gw.register("acme", "polite", make_adapter(r=8, seed=3, targets=("q_proj", "k_proj")))
    await gw.register("acme", "wide", make_adapter(r=16, seed=4))


@pytest.fixture
def worker(gw: Gw, base_model_dir: Path, tmp_path: Path) -> Worker:
    return Worker(gw.services.jobs, gw.services.registry, gw.services.store, base_model_dir,
                  BaseModelInfo.from_folder(base_model_dir), AdapterLimits(16, 10**9),
                  BASE_MODEL, tmp_path / "work", worker_id="w1",
                  threads=torch.get_num_threads())


async def run_next_job(gw: Gw, worker: Worker) -> None:
    job = await gw.services.jobs.claim(worker.worker_id, 30)
    assert job is not None
    await worker.run_job(job)


def merge_body(method: str = "ties", density: float | None = 0.5,
               sources: tuple[str, ...] = ("french@2", "polite@1")) -> dict[str, Any]:
    body: dict[str, Any] = {"method": method,
                            "sources": [{"model": m, "weight": 1.0} for m in sources]}
    if density is not None:
        body["density"] = density
    return {"merge": body}


async def test_a_merge_is_a_job_that_registers_a_version(gw: Gw, acme, worker,
                                                         monkeypatch) -> None:
    calls: list[dict[str, Any]] = []

    def fake_merge(base: Path, sources: list[Path], weights: list[float], method: str,
                   out: Path, **options: Any) -> Path:
        calls.append({"sources": sources, "weights": weights, "method": method, **options})
        return write_adapter(out, r=8, targets=("q_proj", "k_proj", "v_proj"))

    monkeypatch.setattr(merging_module, "merge_adapters", fake_merge)
    r = await gw.admin("POST", VERSIONS.format("combo"), json=merge_body())
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["object"] == "fine_tuning.job" and job["kind"] == "merge"
    assert job["status"] == "queued" and job["organization_id"] == "acme"
    assert job["params"]["method"] == "ties" and job["params"]["rank"] == 8
    assert [s["model"] for s in job["params"]["sources"]] == ["french@2", "polite@1"]
    assert "store_key" not in str(job)  # internal

    await run_next_job(gw, worker)
    r = await gw.admin("GET", f"/admin/fine_tuning/jobs/{job['id']}")
    assert r.status_code == 200, r.text
    done = r.json()
    assert done["status"] == "succeeded", done["error"]
    assert done["fine_tuned_model"] == "combo@1"
    [call] = calls
    assert call["method"] == "ties" and call["density"] == 0.5 and call["weights"] == [1.0, 1.0]
    assert call["majority_sign_method"] == "total" and len(call["sources"]) == 2
    version = (await gw.admin("GET", VERSIONS.format("combo") + "/1")).json()
    assert version["rank"] == 8 and version["source"] == f"merge:{job['id']}"
    # ... and it is served like any version.
    key = await gw.new_tenant("other")
    del key
    tenant_key = (await gw.admin("POST", "/admin/tenants/acme/keys")).json()["key"]
    r = await gw.chat("acme", tenant_key, "combo@1")
    assert r.status_code == 200, r.text


async def test_a_merge_the_files_refuse_fails_its_job_clearly(gw: Gw, acme, worker,
                                                              monkeypatch) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> Path:
        raise merging_module.MergeError("french@2: rsLoRA adapters cannot be merged")

    monkeypatch.setattr(merging_module, "merge_adapters", refuse)
    job = (await gw.admin("POST", VERSIONS.format("combo"), json=merge_body())).json()
    await run_next_job(gw, worker)
    done = (await gw.admin("GET", f"/admin/fine_tuning/jobs/{job['id']}")).json()
    assert done["status"] == "failed"
    assert done["error"]["code"] == "unmergeable" and "rsLoRA" in done["error"]["message"]
    gw.expect_error(await gw.admin("GET", "/admin/tenants/acme/adapters/combo"), 404)


@pytest.mark.parametrize(("body", "status", "param", "needle"), [
    (merge_body(sources=("french@7", "polite@1")), 400, "merge.sources.0.model", "french@7"),
    (merge_body(sources=("nope", "polite@1")), 400, "merge.sources.0.model", "nope"),
    (merge_body(sources=("french@2", "wide@1")), 400, "merge.sources", "one rank"),
    (merge_body("cat", None, ("french@2", "wide@1")), 400, "merge.method", "24"),
    (merge_body(density=None), 400, "merge.density", "density"),
    (merge_body("linear"), 400, "merge.density", "density"),
    (merge_body("svd"), 400, "merge.method", None),
    (merge_body(density=1.5), 400, "merge.density", None),
    ({"merge": {"method": "linear", "sources": [{"model": "french@1"}]}}, 400,
     "merge.sources", None),
    ({"merge": {"method": "linear", "sources": [{"model": "french@1", "weight": "x"},
                                                {"model": "french@2"}]}}, 400,
     "merge.sources.0.weight", None),
    ({"merge": {"method": "linear", "sources": [], "extra": 1}}, 400, None, None),
    ({"merge": "ties"}, 400, "merge", None),
])
async def test_what_cannot_be_merged_is_a_400_before_any_job(
        gw: Gw, acme, body: dict[str, Any], status: int, param: str | None,
        needle: str | None) -> None:
    r = await gw.admin("POST", VERSIONS.format("combo"), json=body)
    err = gw.expect_error(r, status, contains=needle)
    if param is not None:
        assert err["param"] == param, err
    assert not (await gw.admin("GET", "/admin/fine_tuning/jobs")).json()["data"]


async def test_merging_for_an_unknown_tenant_or_a_bad_name(gw: Gw, acme) -> None:
    gw.expect_error(await gw.admin("POST", "/admin/tenants/nobody/adapters/x/versions",
                                   json=merge_body()), 404)
    gw.expect_error(await gw.admin("POST", VERSIONS.format("bad%20name"), json=merge_body()),
                    400)


async def test_an_export_is_a_checksummed_folder_in_the_store(gw: Gw, acme, worker,
                                                              monkeypatch) -> None:
    def fake_export(base: Path, adapter: Path, out: Path, info: dict[str, Any],
                    dtype: str) -> dict[str, dict[str, Any]]:
        assert dtype == "auto"
        out.mkdir(parents=True)
        (out / "config.json").write_text('{"model_type": "llama"}')
        (out / "model.safetensors").write_bytes(b"weights of " + adapter.name.encode())
        return {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
                for p in out.iterdir()}

    monkeypatch.setattr(export_module, "export_merged", fake_export)
    url = VERSIONS.format("french") + "/2/export"
    gw.expect_error(await gw.admin("GET", url), 404, code="export_not_found")
    r = await gw.admin("POST", url)
    assert r.status_code == 202, r.text
    started = r.json()
    assert started["object"] == "adapter.export" and started["status"] == "queued"
    assert started["adapter"] == "french" and started["version"] == 2
    assert started["location"] is None
    again = await gw.admin("POST", url)  # queued already: the same export
    assert again.json()["job_id"] == started["job_id"]

    await run_next_job(gw, worker)
    done = (await gw.admin("GET", url)).json()
    assert done["status"] == "succeeded" and done["job_id"] == started["job_id"]
    folder = Path(done["location"])
    assert done["store_key"].startswith("exports/acme/french/2/")
    assert set(done["files"]) == {"config.json", "model.safetensors"}
    for name, meta in done["files"].items():
        assert sha256_file(folder / name) == meta["sha256"]
    assert (await gw.admin("POST", url)).json()["job_id"] == started["job_id"]  # done: reused

    other = await gw.admin("POST", url, json={"dtype": "float32"})  # another dtype: another
    assert other.status_code == 202 and other.json()["job_id"] != started["job_id"]
    assert other.json()["dtype"] == "float32"
    gw.expect_error(await gw.admin("POST", url, json={"dtype": "int3"}), 400)
    gw.expect_error(await gw.admin("POST", VERSIONS.format("french") + "/9/export"), 404)
    gw.expect_error(await gw.admin("GET", VERSIONS.format("nope") + "/1/export"), 404)


async def test_an_export_downloads_file_by_file_and_goes_with_its_adapter(
        gw: Gw, acme, worker, monkeypatch) -> None:
    exported: dict[str, bytes] = {}

    def fake_export(base: Path, adapter: Path, out: Path, info: dict[str, Any],
                    dtype: str) -> dict[str, dict[str, Any]]:
        (out / "tokenizer").mkdir(parents=True)
        exported.update({"config.json": b'{"model_type": "llama"}',
                         "model.safetensors": bytes(range(256)) * 5000,
                         "tokenizer/tokenizer.json": b'{"vocab": "\xc3\xa9"}'})
        for rel, data in exported.items():
            (out / rel).write_bytes(data)
        return {rel: {"size": len(data), "sha256": sha256_file(out / rel)}
                for rel, data in exported.items()}

    monkeypatch.setattr(export_module, "export_merged", fake_export)
    url = VERSIONS.format("french") + "/2/export"
    assert (await gw.admin("POST", url)).status_code == 202
    gw.expect_error(await gw.admin("GET", url + "/files/config.json"), 409,
                    code="export_not_ready")
    await run_next_job(gw, worker)
    done = (await gw.admin("GET", url)).json()
    for rel, meta in done["files"].items():
        r = await gw.admin("GET", meta["url"])
        assert r.status_code == 200, (rel, r.text)
        assert r.content == exported[rel] and r.headers["x-loraplex-sha256"] == meta["sha256"]
        assert r.headers["content-length"] == str(meta["size"])
        assert r.headers["content-type"] == "application/octet-stream"
    assert done["files"]["tokenizer/tokenizer.json"]["url"].endswith(
        "/export/files/tokenizer/tokenizer.json?dtype=auto")
    for missing in ("nope.bin", "complete.json", "..%2F..%2F1%2Fexport", "tokenizer"):
        gw.expect_error(await gw.admin("GET", f"{url}/files/{missing}"), 404)
    gw.expect_error(await gw.admin("GET", f"{url}/files/config.json?dtype=float32"), 404,
                    code="export_not_found")
    gw.expect_error(await gw.admin("GET", f"{url}/files/config.json?dtype=int3"), 400)
    assert (await gw.client.get(f"{url}/files/config.json")).status_code == 401  # admin only

    # Deleting the adapter erases its exports; one made again with the same name and version
    # numbers never sees the old ones.
    folder = Path(done["location"])
    assert folder.is_dir()
    assert (await gw.admin("DELETE", "/admin/tenants/acme/adapters/french")).status_code == 200
    await gw.settle()
    assert not folder.exists()
    await gw.register("acme", "french", worker_adapter := write_adapter(
        Path(str(folder) + "-new-src"), r=8))
    await gw.register("acme", "french", worker_adapter)
    gw.expect_error(await gw.admin("GET", url), 404, code="export_not_found")
    gw.expect_error(await gw.admin("GET", url + "/files/config.json"), 404,
                    code="export_not_found")


async def test_an_rslora_source_is_refused_before_any_job(gw: Gw, acme, make_adapter) -> None:
    await gw.register("acme", "scaled", make_adapter(r=8, seed=9,
                                                     config_overrides={"use_rslora": True}))
    before = len((await gw.admin("GET", "/admin/fine_tuning/jobs")).json()["data"])
    r = await gw.admin("POST", VERSIONS.format("combo"),
                       json=merge_body("linear", None, ("french@2", "scaled@1")))
    error = gw.expect_error(r, 400, code="rslora_not_mergeable")
    assert error["param"] == "merge.sources.1.model" and "scaled@1" in error["message"]
    assert len((await gw.admin("GET", "/admin/fine_tuning/jobs")).json()["data"]) == before
