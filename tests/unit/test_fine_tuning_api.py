"""The files and fine-tuning jobs API (no worker, no training) and the job queue's leases.

A job is answered in validating_files; its datasets are checked in the background (the
tokenizer is replaced by a stand-in that the tests can hold up), then it is queued or failed.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from adapters.errors import Conflict
from adapters.registry import Registry
from adapters.registry.models import FineTuneJob
from adapters.store import LocalStore
from adapters.training.jobs import JobStatus, JobStore
from adapters.training.recipe import TrainingRecipe
from tests.unit.conftest import BASE_MODEL, Gw, wait_until

FILES, JOBS = "/v1/files", "/v1/fine_tuning/jobs"


def dataset(n: int = 12) -> bytes:
    return "\n".join(json.dumps({"messages": [
        {"role": "user", "content": f"question {i}"},
        {"role": "assistant", "content": f"Arr matey! answer {i}"}]}) for i in range(n)).encode()


class HeldTokenizer:
    """Stands in for the base model's tokenizer loader (the fake base model has none): gives
    None (no length checks), once `release` is set; set from the start unless a test holds it."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.release.set()
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1
        await self.release.wait()


@pytest.fixture
def tokenizer(gw: Gw, monkeypatch: pytest.MonkeyPatch) -> HeldTokenizer:
    held = HeldTokenizer()
    monkeypatch.setattr(gw.services.fine_tuning, "tokenizer", held)
    return held


@pytest.fixture
async def tenant(gw: Gw, tokenizer: HeldTokenizer) -> tuple[str, dict[str, str]]:
    key = await gw.new_tenant("acme")
    return "acme", gw.headers("acme", key)


async def job_status(gw: Gw, headers: dict[str, str], job_id: str) -> dict[str, Any]:
    r = await gw.client.get(f"{JOBS}/{job_id}", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def wait_for_status(gw: Gw, headers: dict[str, str], job_id: str,
                          status: str) -> dict[str, Any]:
    async def reached() -> bool:
        return (await job_status(gw, headers, job_id))["status"] == status

    await wait_until(reached, f"job {job_id} to be {status}")
    return await job_status(gw, headers, job_id)


async def event_messages(gw: Gw, headers: dict[str, str], job_id: str,
                         warnings: bool = False) -> list[str]:
    """Oldest first; the recipe's warnings (tests/unit/test_recipe_guardrails.py) only if
    asked for (these tests' tiny files always get one)."""
    r = await gw.client.get(f"{JOBS}/{job_id}/events", headers=headers)
    assert r.status_code == 200, r.text
    return [e["message"] for e in reversed(r.json()["data"])
            if warnings or e["level"] != "warn"]


async def upload(gw: Gw, headers: dict[str, str], data: bytes,
                 purpose: str = "fine-tune") -> httpx.Response:
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
    gw.expect_error(await upload(gw, headers, dataset(), purpose="assistants"), 400,
                    contains="fine-tune")
    gw.expect_error(await gw.client.post(FILES, headers=headers, json={"x": 1}), 400)


async def test_missing_multipart_parts_are_400s_naming_the_part(gw: Gw, tenant) -> None:
    _, headers = tenant
    r = await gw.client.post(FILES, headers=headers, data={"purpose": "fine-tune"},
                             files={"other": ("x.jsonl", dataset(), "application/jsonl")})
    assert gw.expect_error(r, 400)["param"] == "file"
    r = await gw.client.post(FILES, headers=headers,
                             files={"file": ("train.jsonl", dataset(), "application/jsonl")})
    assert gw.expect_error(r, 400)["param"] == "purpose"
    r = await gw.client.post(FILES, headers={**headers, "Content-Type": "text/plain"},
                             content=b"not a form")
    gw.expect_error(r, 400)
    assert (await gw.client.get(FILES, headers=headers)).json()["data"] == []


async def test_job_creation_checks_the_cheap_things_at_once(gw: Gw, tenant) -> None:
    _, headers = tenant
    file_id = (await upload(gw, headers, dataset())).json()["id"]
    cases = [
        ({"model": "gpt-4o", "training_file": file_id}, "model"),
        ({"model": BASE_MODEL, "training_file": "file-nope"}, "file-nope"),
        ({"model": BASE_MODEL, "training_file": file_id, "validation_file": "file-gone"},
         "file-gone"),
        ({"model": BASE_MODEL, "training_file": file_id, "method": {"type": "dpo"}},
         "supervised"),
        ({"model": BASE_MODEL, "training_file": file_id, "lora": {"use_dora": True}}, "DoRA"),
        ({"model": BASE_MODEL, "training_file": file_id,
          "lora": {"modules_to_save": ["lm_head"]}}, "modules_to_save"),
        ({"model": BASE_MODEL, "training_file": file_id,
          "lora": {"target_modules": ["nope_proj"]}}, "nope_proj"),
        ({"model": BASE_MODEL, "training_file": file_id, "lora": {"r": 64}},
         "raise LORAPLEX_MAX_LORA_RANK"),
        ({"model": BASE_MODEL, "training_file": file_id, "lora": {"bogus": 1}}, "bogus"),
        ({"model": BASE_MODEL, "training_file": file_id, "suffix": "../x"}, "suffix"),
        ({"model": BASE_MODEL, "training_file": file_id,
          "hyperparameters": {"n_epochs": "many"}}, "n_epochs"),
        ({"model": BASE_MODEL, "training_file": file_id,
          "hyperparameters": {"batch_size": 0}}, "batch_size"),
        ({"model": BASE_MODEL, "training_file": file_id, "lora": {"learning_rate": 0.5},
          "hyperparameters": {"learning_rate_multiplier": 4}}, "below 1"),
        ({"model": BASE_MODEL, "training_file": file_id, "surprise": True}, "surprise"),
    ]
    for body, needle in cases:
        r = await gw.client.post(JOBS, headers=headers, json=body)
        assert r.status_code in (400, 404), (body, r.text)
        gw.expect_error(r, r.status_code, contains=needle)
    assert (await gw.client.get(JOBS, headers=headers)).json()["data"] == []


async def test_job_bodies_are_read_after_the_key_and_whatever_the_content_type(
        gw: Gw, tenant) -> None:
    _, headers = tenant
    r = await gw.client.post(JOBS, headers={"X-Tenant-ID": "acme"}, content=b"{oops")
    gw.expect_error(r, 401)
    r = await gw.client.post(JOBS, headers=headers, content=b"{oops")
    gw.expect_error(r, 400, contains="not valid JSON", code="invalid_json")
    file_id = (await upload(gw, headers, dataset())).json()["id"]
    body = json.dumps({"model": BASE_MODEL, "training_file": file_id}).encode()
    for content_type in (None, "application/x-www-form-urlencoded"):  # curl -d sends the latter
        extra = {"Content-Type": content_type} if content_type else {}
        r = await gw.client.post(JOBS, headers={**headers, **extra}, content=body)
        assert r.status_code == 200 and r.json()["status"] == "validating_files", r.text


async def test_invalid_datasets_fail_the_job_in_the_background(gw: Gw, tenant) -> None:
    _, headers = tenant
    file_id = (await upload(gw, headers, dataset())).json()["id"]
    few = (await upload(gw, headers, dataset(3))).json()["id"]
    empty_ok = (await upload(gw, headers, b"")).json()["id"]  # a valid file of 0 examples
    for body, param in (
            ({"training_file": few}, "training_file"),
            ({"training_file": file_id, "validation_file": empty_ok}, "validation_file")):
        r = await gw.client.post(JOBS, headers=headers, json={"model": BASE_MODEL, **body})
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "validating_files" and r.json()["error"] is None
        job = await wait_for_status(gw, headers, r.json()["id"], "failed")
        error = job["error"]
        assert error["code"] == f"invalid_{param}" and error["param"] == param, error
        assert "at least" in error["message"] and param in error["message"], error
        assert job["finished_at"] is not None
        events = await event_messages(gw, headers, job["id"])
        assert events[0] == "Validating training file"
        assert events[-1].startswith("Job failed: invalid") and len(events) == 2, events
    few_job = (await gw.client.get(JOBS, headers=headers)).json()["data"][-1]
    assert "10" in few_job["error"]["message"]
    r = await gw.client.post(f"{JOBS}/{few_job['id']}/cancel", headers=headers)
    gw.expect_error(r, 409)  # failed is final


async def test_job_lifecycle_without_a_worker(gw: Gw, tenant) -> None:
    _, headers = tenant
    file_id = (await upload(gw, headers, dataset())).json()["id"]
    r = await gw.client.post(JOBS, headers=headers, json={
        "model": BASE_MODEL, "training_file": file_id, "suffix": "pirate",
        "hyperparameters": {"n_epochs": 2, "learning_rate_multiplier": 0.5},
        "lora": {"r": 8, "use_rslora": True}})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["object"] == "fine_tuning.job" and job["status"] == "validating_files"
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": 4,
                                      "learning_rate_multiplier": 0.5}
    assert job["method"] == {"type": "supervised",
                             "supervised": {"hyperparameters": job["hyperparameters"]}}
    assert job["lora"]["r"] == 8 and job["lora"]["use_rslora"] is True
    assert (await wait_for_status(gw, headers, job["id"], "queued"))["error"] is None
    assert await event_messages(gw, headers, job["id"]) == [
        "Validating training file", "Files validated; job queued"]
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


async def test_validating_files_is_observable_and_never_claimed(gw: Gw, tenant,
                                                                tokenizer: HeldTokenizer) -> None:
    _, headers = tenant
    file_id = (await upload(gw, headers, dataset())).json()["id"]
    tokenizer.release.clear()  # the dataset check waits for the tokenizer
    job = (await gw.client.post(JOBS, headers=headers, json={
        "model": BASE_MODEL, "training_file": file_id})).json()
    await wait_until(lambda: tokenizer.calls == 1, "the dataset check to start")
    assert (await job_status(gw, headers, job["id"]))["status"] == "validating_files"
    assert await gw.services.jobs.claim("w1", 30) is None  # workers take queued jobs only
    tokenizer.release.set()
    await wait_for_status(gw, headers, job["id"], "queued")
    claimed = await gw.services.jobs.claim("w1", 30)
    assert claimed is not None and claimed.id == job["id"]


async def test_a_cancel_during_validation_wins(gw: Gw, tenant, tokenizer: HeldTokenizer) -> None:
    _, headers = tenant
    file_id = (await upload(gw, headers, dataset())).json()["id"]
    few = (await upload(gw, headers, dataset(3))).json()["id"]
    tokenizer.release.clear()
    ids = [(await gw.client.post(JOBS, headers=headers, json={
        "model": BASE_MODEL, "training_file": f})).json()["id"] for f in (file_id, few)]
    await wait_until(lambda: tokenizer.calls == 2, "both dataset checks to start")
    for job_id in ids:
        r = await gw.client.post(f"{JOBS}/{job_id}/cancel", headers=headers)
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    tokenizer.release.set()
    await gw.settle()  # both checks ended: neither "queued" (valid) nor "failed" (too few)
    for job_id in ids:
        job = await job_status(gw, headers, job_id)
        assert job["status"] == "cancelled" and job["error"] is None, job
        assert await event_messages(gw, headers, job_id) == [
            "Validating training file", "Job cancelled"]


async def test_jobs_left_validating_by_a_dead_gateway_are_resumed(gw: Gw, tenant) -> None:
    _, headers = tenant
    ok = (await upload(gw, headers, dataset())).json()["id"]
    few = (await upload(gw, headers, dataset(3))).json()["id"]
    jobs = gw.services.jobs
    # What a gateway that died right after committing leaves behind: rows, no check running.
    left = [await jobs.create_job("acme", model=BASE_MODEL, training_file=f,
                                  recipe=TrainingRecipe()) for f in (ok, few)]
    await gw.services.fine_tuning.resume_validation()
    await gw.services.fine_tuning.resume_validation()  # again (another gateway): no effect
    good, bad = [await job_status(gw, headers, j.id) for j in left]
    assert good["status"] == "queued"
    assert bad["status"] == "failed" and bad["error"]["code"] == "invalid_training_file"
    assert await event_messages(gw, headers, left[0].id) == [
        "Validating training file", "Files validated; job queued"]
    assert len(await event_messages(gw, headers, left[1].id)) == 2
    assert await jobs.job_ids(JobStatus.VALIDATING_FILES) == []


async def test_openapi_documents_bodies_responses_and_errors(gw: Gw) -> None:
    spec = (await gw.client.get("/openapi.json")).json()
    paths, schemas = spec["paths"], spec["components"]["schemas"]
    create = paths["/v1/fine_tuning/jobs"]["post"]
    body = create["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/JobCreate"}
    assert schemas["JobCreate"]["additionalProperties"] is False
    assert "lora" in schemas["JobCreate"]["properties"]
    upload_op = paths["/v1/files"]["post"]
    form = upload_op["requestBody"]["content"]["multipart/form-data"]["schema"]
    form = schemas[form["$ref"].rsplit("/", 1)[1]] if "$ref" in form else form
    assert set(form["required"]) == {"file", "purpose"}
    documented = {
        ("/v1/files", "post"): "FileObject", ("/v1/files", "get"): "FileList",
        ("/v1/files/{file_id}", "get"): "FileObject",
        ("/v1/files/{file_id}", "delete"): "FileDeleted",
        ("/v1/fine_tuning/jobs", "post"): "FineTuningJob",
        ("/v1/fine_tuning/jobs", "get"): "JobList",
        ("/v1/fine_tuning/jobs/{job_id}", "get"): "FineTuningJob",
        ("/v1/fine_tuning/jobs/{job_id}/cancel", "post"): "FineTuningJob",
        ("/v1/fine_tuning/jobs/{job_id}/events", "get"): "EventList",
        ("/v1/fine_tuning/jobs/{job_id}/checkpoints", "get"): "CheckpointList",
    }
    for (path, method), model in documented.items():
        responses = paths[path][method]["responses"]
        ok = responses["200"]["content"]["application/json"]["schema"]
        assert ok == {"$ref": f"#/components/schemas/{model}"}, (path, method, ok)
        for status in ("400", "404"):
            error = responses[status]["content"]["application/json"]["schema"]
            assert error == {"$ref": "#/components/schemas/ErrorResponse"}, (path, method)
    status = schemas["FineTuningJob"]["properties"]["status"]
    assert set(schemas[status["$ref"].rsplit("/", 1)[1]]["enum"]) == {s.value for s in JobStatus}


# -- the queue -------------------------------------------------------------------------------

@pytest.fixture
async def queue(tmp_path: Path):
    registry = Registry(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}")
    await registry.create_schema()
    await registry.create_tenant("acme")
    jobs = JobStore(registry, LocalStore(tmp_path / "store"))
    f = await jobs.create_file("acme", "t.jsonl", "fine-tune", dataset())
    yield jobs, f.id
    await registry.close()


async def _new_job(jobs: JobStore, file_id: str) -> FineTuneJob:
    job = await jobs.create_job("acme", model=BASE_MODEL, training_file=file_id,
                                adapter_name="x", recipe=TrainingRecipe())
    assert await jobs.files_validated(job.id)
    return job


async def test_status_moves_are_compare_and_set(queue) -> None:
    jobs, file_id = queue
    job = await jobs.create_job("acme", model=BASE_MODEL, training_file=file_id,
                                recipe=TrainingRecipe())
    assert job.status == JobStatus.VALIDATING_FILES and job.adapter_name.startswith("ft-")
    assert await jobs.claim("w1", 30) is None
    await jobs.cancel_job("acme", job.id)
    assert await jobs.files_validated(job.id) is False
    assert await jobs.files_invalid(job.id, {"code": "x", "param": None, "message": "m"}) is False
    assert (await jobs.get_job("acme", job.id)).status == JobStatus.CANCELLED
    assert await jobs.claim("w1", 30) is None


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
    assert await jobs.finish(job.id, "w1", JobStatus.SUCCEEDED, "late") is False
    assert await jobs.finish(job.id, "w2", JobStatus.SUCCEEDED, "done") is True
    with pytest.raises(Conflict):  # a finished job cannot be cancelled
        await jobs.cancel_job("acme", job.id)


async def test_cancel_stops_lease_renewal(queue) -> None:
    jobs, file_id = queue
    job = await _new_job(jobs, file_id)
    await jobs.claim("w1", 30)
    await jobs.cancel_job("acme", job.id)
    assert await jobs.renew(job.id, "w1", 30) is False
    assert (await jobs.get_job("acme", job.id)).status == "cancelled"


async def test_uploads_are_not_read_for_strangers(gw: Gw, monkeypatch) -> None:
    """Without a valid key the form is never parsed: 401 before any byte is buffered."""
    from starlette.requests import Request

    parsed = []
    real_form = Request.form

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        parsed.append(self.url.path)
        return real_form(self, *args, **kwargs)

    monkeypatch.setattr(Request, "form", spy)
    r = await gw.client.post(FILES, data={"purpose": "fine-tune"},
                             files={"file": ("train.jsonl", dataset(), "application/jsonl")})
    gw.expect_error(r, 401)
    assert parsed == []
