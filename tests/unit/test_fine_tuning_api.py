"""The files and fine-tuning jobs API (no worker, no training) and the job queue's leases."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import update

from adapters.errors import Conflict
from adapters.registry import Registry
from adapters.registry.models import FineTuneJob
from adapters.training.jobs import JobStore
from tests.unit.conftest import BASE_MODEL, Gw

FILES, JOBS = "/v1/files", "/v1/fine_tuning/jobs"


def dataset(n: int = 12) -> bytes:
    return "\n".join(json.dumps({"messages": [
        {"role": "user", "content": f"question {i}"},
        {"role": "assistant", "content": f"Arr matey! answer {i}"}]}) for i in range(n)).encode()


@pytest.fixture
async def tenant(gw: Gw, monkeypatch: pytest.MonkeyPatch) -> tuple[str, dict[str, str]]:
    async def no_tokenizer() -> None:  # the fake base model has no tokenizer
        return None

    monkeypatch.setattr(gw.services, "tokenizer", no_tokenizer)
    key = await gw.new_tenant("acme")
    return "acme", gw.headers("acme", key)


async def upload(gw: Gw, headers: dict[str, str], data: bytes, purpose: str = "fine-tune"):
    return await gw.client.post(FILES, headers=headers, data={"purpose": purpose},
                                files={"file": ("train.jsonl", data, "application/jsonl")})


async def test_file_upload_and_listing(gw: Gw, tenant) -> None:
    _, headers = tenant
    r = await upload(gw, headers, dataset())
    assert r.status_code == 200, r.text
    f = r.json()
    assert f["object"] == "file" and f["purpose"] == "fine-tune" and f["bytes"] == len(dataset())
    listed = (await gw.client.get(FILES, headers=headers)).json()["data"]
    assert [x["id"] for x in listed] == [f["id"]]
    assert (await gw.client.get(f"{FILES}/{f['id']}", headers=headers)).json()["id"] == f["id"]


async def test_bad_files_are_refused_with_line_numbers(gw: Gw, tenant) -> None:
    _, headers = tenant
    bad = b'{"messages": [{"role": "user", "content": "hi"}]}\n{oops\n[1, 2]\n'
    err = gw.expect_error(await upload(gw, headers, bad), 400, code="invalid_dataset")
    for line in ("line 1", "line 2", "line 3"):
        assert line in err["message"]
    gw.expect_error(await upload(gw, headers, dataset(), purpose="assistants"), 400)
    gw.expect_error(await gw.client.post(FILES, headers=headers, json={"x": 1}), 400)


async def test_job_creation_validates_everything(gw: Gw, tenant) -> None:
    _, headers = tenant
    file_id = (await upload(gw, headers, dataset())).json()["id"]
    few = (await upload(gw, headers, dataset(3))).json()["id"]
    cases = [
        ({"model": "gpt-4o", "training_file": file_id}, "model"),
        ({"model": BASE_MODEL, "training_file": few}, "10"),
        ({"model": BASE_MODEL, "training_file": "file-nope"}, "file-nope"),
        ({"model": BASE_MODEL, "training_file": file_id, "lora": {"use_dora": True}}, "DoRA"),
        ({"model": BASE_MODEL, "training_file": file_id,
          "lora": {"modules_to_save": ["lm_head"]}}, "modules_to_save"),
        ({"model": BASE_MODEL, "training_file": file_id,
          "lora": {"target_modules": ["nope_proj"]}}, "nope_proj"),
        ({"model": BASE_MODEL, "training_file": file_id, "lora": {"r": 64}}, "max_lora_rank"),
        ({"model": BASE_MODEL, "training_file": file_id, "lora": {"bogus": 1}}, "bogus"),
        ({"model": BASE_MODEL, "training_file": file_id, "suffix": "../x"}, "suffix"),
        ({"model": BASE_MODEL, "training_file": file_id,
          "hyperparameters": {"n_epochs": "many"}}, "n_epochs"),
    ]
    for body, needle in cases:
        r = await gw.client.post(JOBS, headers=headers, json=body)
        assert r.status_code in (400, 404), (body, r.text)
        gw.expect_error(r, r.status_code, contains=needle)
    assert (await gw.client.get(JOBS, headers=headers)).json()["data"] == []


async def test_job_lifecycle_without_a_worker(gw: Gw, tenant) -> None:
    _, headers = tenant
    file_id = (await upload(gw, headers, dataset())).json()["id"]
    r = await gw.client.post(JOBS, headers=headers, json={
        "model": BASE_MODEL, "training_file": file_id, "suffix": "pirate",
        "hyperparameters": {"n_epochs": 2, "learning_rate_multiplier": 0.5},
        "lora": {"r": 8, "use_rslora": True}})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["object"] == "fine_tuning.job" and job["status"] == "queued"
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": 4,
                                      "learning_rate_multiplier": 0.5}
    assert job["lora"]["r"] == 8 and job["lora"]["use_rslora"] is True
    events = (await gw.client.get(f"{JOBS}/{job['id']}/events", headers=headers)).json()
    assert [e["message"] for e in events["data"]][-1] == "Validating training file"
    r = await gw.client.post(f"{JOBS}/{job['id']}/cancel", headers=headers)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    again = await gw.client.post(f"{JOBS}/{job['id']}/cancel", headers=headers)
    assert again.status_code == 200 and again.json()["status"] == "cancelled"  # idempotent


async def test_other_tenants_see_nothing(gw: Gw, tenant) -> None:
    _, headers = tenant
    file_id = (await upload(gw, headers, dataset())).json()["id"]
    job = (await gw.client.post(JOBS, headers=headers, json={
        "model": BASE_MODEL, "training_file": file_id})).json()
    other = gw.headers("globex", await gw.new_tenant("globex"))
    for method, path in (("GET", f"{FILES}/{file_id}"), ("GET", f"{JOBS}/{job['id']}"),
                         ("POST", f"{JOBS}/{job['id']}/cancel"),
                         ("GET", f"{JOBS}/{job['id']}/events"),
                         ("DELETE", f"{FILES}/{file_id}")):
        gw.expect_error(await gw.client.request(method, path, headers=other), 404)
    assert (await gw.client.get(JOBS, headers=other)).json()["data"] == []
    assert (await gw.client.get(FILES, headers=other)).json()["data"] == []
    r = await gw.client.post(JOBS, headers=other, json={"model": BASE_MODEL,
                                                        "training_file": file_id})
    gw.expect_error(r, 404)


# -- the queue -------------------------------------------------------------------------------

@pytest.fixture
async def queue(tmp_path: Path):
    registry = Registry(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}")
    await registry.create_schema()
    await registry.create_tenant("acme")
    jobs = JobStore(registry, tmp_path / "files")
    f = await jobs.create_file("acme", "t.jsonl", "fine-tune", dataset())
    yield jobs, f.id
    await registry.close()


async def _new_job(jobs: JobStore, file_id: str) -> FineTuneJob:
    return await jobs.create_job("acme", model=BASE_MODEL, training_file=file_id,
                                 adapter_name="x", hyperparameters={}, lora={})


async def test_two_workers_never_claim_one_job(queue) -> None:
    jobs, file_id = queue
    job = await _new_job(jobs, file_id)
    claimed = await asyncio.gather(*(jobs.claim(f"w{i}", 30) for i in range(6)))
    winners = [c for c in claimed if c is not None]
    assert len(winners) == 1 and winners[0].id == job.id and winners[0].status == "running"
    events, _ = await jobs.list_events("acme", job.id, None, 10)
    assert events[0].message.startswith("Job started by worker")


async def test_expired_lease_is_taken_over_and_old_worker_stops(queue) -> None:
    jobs, file_id = queue
    job = await _new_job(jobs, file_id)
    assert (await jobs.claim("w1", 30)).id == job.id
    assert await jobs.claim("w2", 30) is None  # lease still valid
    async with jobs.registry.transaction() as s:  # w1 stops renewing: its lease runs out
        await s.execute(update(FineTuneJob).where(FineTuneJob.id == job.id).values(
            lease_expires_at=datetime.now(timezone.utc) - timedelta(seconds=1)))
    taken = await jobs.claim("w2", 30)
    assert taken is not None and taken.worker_id == "w2" and taken.attempts == 2
    events, _ = await jobs.list_events("acme", job.id, None, 10)
    assert events[0].message.startswith("Job resumed by worker w2")
    assert await jobs.renew(job.id, "w1", 30) is False  # w1 learns it lost the job
    assert await jobs.finish(job.id, "w1", "succeeded", "late") is False
    assert await jobs.finish(job.id, "w2", "succeeded", "done") is True
    with pytest.raises(Conflict):  # a finished job cannot be cancelled
        await jobs.cancel_job("acme", job.id)


async def test_cancel_stops_lease_renewal(queue) -> None:
    jobs, file_id = queue
    job = await _new_job(jobs, file_id)
    await jobs.claim("w1", 30)
    await jobs.cancel_job("acme", job.id)
    assert await jobs.renew(job.id, "w1", 30) is False
    assert (await jobs.get_job("acme", job.id)).status == "cancelled"
