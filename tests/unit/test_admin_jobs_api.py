"""The admin view of fine-tuning jobs: every tenant's, filtered and paged, in the tenant API's
shapes, behind the admin token."""

from __future__ import annotations

import json

from adapters.training.jobs import JobStatus
from adapters.training.recipe import TrainingRecipe
from tests.unit.conftest import BASE_MODEL, Gw

JOBS = "/admin/fine_tuning/jobs"


def dataset(n: int = 12) -> bytes:
    return "\n".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"})
                     for i in range(n)).encode()


async def new_job(gw: Gw, tenant: str, *, queued: bool = True) -> str:
    """A job made straight in the store (no background validation to race with)."""
    jobs = gw.services.jobs
    f = await jobs.create_file(tenant, "t.jsonl", "fine-tune", dataset())
    job = await jobs.create_job(tenant, model=BASE_MODEL, training_file=f.id,
                                adapter_name="bot", recipe=TrainingRecipe())
    if queued:
        assert await jobs.files_validated(job.id)
    return job.id


async def test_lists_every_tenants_jobs_filtered_and_paged(gw: Gw) -> None:
    acme_key = await gw.new_tenant("acme")
    await gw.new_tenant("globex")
    acme = [await new_job(gw, "acme") for _ in range(3)]
    globex = [await new_job(gw, "globex", queued=False)]

    r = await gw.admin("GET", JOBS)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["has_more"] is False
    assert {j["id"] for j in body["data"]} == set(acme + globex)

    r = await gw.admin("GET", JOBS, params={"tenant": "acme"})
    assert {j["id"] for j in r.json()["data"]} == set(acme)
    assert {j["organization_id"] for j in r.json()["data"]} == {"acme"}
    r = await gw.admin("GET", JOBS, params={"status": "validating_files"})
    assert [j["id"] for j in r.json()["data"]] == globex

    # Pages of 2 then 1 cover all of acme's jobs, newest first, no repeats.
    page1 = (await gw.admin("GET", JOBS, params={"tenant": "acme", "limit": 2})).json()
    assert len(page1["data"]) == 2 and page1["has_more"] is True
    page2 = (await gw.admin("GET", JOBS, params={"tenant": "acme", "limit": 2,
                                                  "after": page1["data"][-1]["id"]})).json()
    assert page2["has_more"] is False
    ids = [j["id"] for j in page1["data"] + page2["data"]]
    assert sorted(ids) == sorted(acme) and len(set(ids)) == 3

    # The same object as the tenant API answers.
    tenant_view = await gw.client.get(f"/v1/fine_tuning/jobs/{acme[0]}",
                                      headers=gw.headers("acme", acme_key))
    admin_view = await gw.admin("GET", f"{JOBS}/{acme[0]}")
    assert admin_view.status_code == 200 and admin_view.json() == tenant_view.json()


async def test_job_and_its_events(gw: Gw) -> None:
    await gw.new_tenant("acme")
    job_id = await new_job(gw, "acme")
    await gw.services.jobs.add_event(job_id, "Step 1/4: training loss=2.5000", type_="metrics",
                                     data={"step": 1, "total_steps": 4, "loss": 2.5})
    r = await gw.admin("GET", f"{JOBS}/{job_id}")
    assert r.json()["status"] == JobStatus.QUEUED.value
    events = (await gw.admin("GET", f"{JOBS}/{job_id}/events")).json()
    assert events["object"] == "list"
    assert [e["message"] for e in reversed(events["data"])] == [
        "Validating training file", "Files validated; job queued",
        "Step 1/4: training loss=2.5000"]
    assert events["data"][0]["data"] == {"step": 1, "total_steps": 4, "loss": 2.5}
    page = (await gw.admin("GET", f"{JOBS}/{job_id}/events", params={"limit": 1})).json()
    assert len(page["data"]) == 1 and page["has_more"] is True


async def test_errors_are_openai_shaped(gw: Gw) -> None:
    await gw.new_tenant("acme")
    job_id = await new_job(gw, "acme")
    for path in (JOBS, f"{JOBS}/{job_id}", f"{JOBS}/{job_id}/events"):
        gw.expect_error(await gw.client.get(path), 401)
        gw.expect_error(await gw.client.get(path, headers={"Authorization": "Bearer nope"}),
                        401)
    gw.expect_error(await gw.admin("GET", JOBS, params={"tenant": "nobody"}), 404)
    assert gw.expect_error(await gw.admin("GET", JOBS, params={"status": "sleeping"}),
                           400)["param"] == "status"
    for limit in ("0", "101", "x"):
        assert gw.expect_error(await gw.admin("GET", JOBS, params={"limit": limit}),
                               400)["param"] == "limit"
    assert gw.expect_error(await gw.admin("GET", JOBS, params={"after": "ftjob-nope"}),
                           400)["param"] == "after"
    gw.expect_error(await gw.admin("GET", f"{JOBS}/ftjob-nope"), 404, code="job_not_found")
    gw.expect_error(await gw.admin("GET", f"{JOBS}/ftjob-nope/events"), 404)
    gw.expect_error(await gw.admin("GET", f"{JOBS}/{job_id}/events",
                                   params={"limit": "5000"}), 400)


async def test_an_operator_cancels_any_tenants_job_once(gw: Gw) -> None:
    acme_key = await gw.new_tenant("acme")
    job_id = await new_job(gw, "acme")
    assert (await gw.client.post(f"{JOBS}/{job_id}/cancel")).status_code == 401  # admin only
    r = await gw.admin("POST", f"{JOBS}/{job_id}/cancel")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "cancelled" and r.json()["organization_id"] == "acme"
    tenant_view = await gw.client.get(f"/v1/fine_tuning/jobs/{job_id}",
                                      headers=gw.headers("acme", acme_key))
    assert tenant_view.json()["status"] == "cancelled"
    assert await gw.services.jobs.claim("w1", 30) is None  # never runs
    again = await gw.admin("POST", f"{JOBS}/{job_id}/cancel")  # as the tenant API: idempotent
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    done = await new_job(gw, "acme")
    await gw.services.jobs.update_job(done, status=JobStatus.SUCCEEDED.value)
    gw.expect_error(await gw.admin("POST", f"{JOBS}/{done}/cancel"), 409, code="job_finished")
    gw.expect_error(await gw.admin("POST", f"{JOBS}/ftjob-nope/cancel"), 404)
