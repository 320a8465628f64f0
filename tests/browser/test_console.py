"""The web console in a real headless Chromium against the real gateway (stand-in engine):
every page as an operator and as a tenant, the key shown once, an upload, the playground's
streamed side-by-side answers, a job's loss chart, live engine and usage charts, escaping of
what tenants control, and no cross-site request acting for a logged-in user."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.by import By

from adapters.training.evaluation import EvaluationReport
from adapters.training.jobs import JobStatus
from adapters.training.recipe import TrainingRecipe
from tests.browser.conftest import (
    ADAPTER_PIECES,
    ADMIN_TOKEN,
    BASE_PIECES,
    HOSTILE,
    ConsoleServer,
    Page,
)
from tests.unit.conftest import BASE_MODEL, write_adapter

ADAPTER_TEXT = "".join(ADAPTER_PIECES)
BASE_TEXT = "".join(BASE_PIECES)


# -- state made through the API, for the tests that are not about making it -----------------

def ensure_tenant(console: ConsoleServer, tenant: str) -> str:
    """The tenant exists; returns a fresh key of it."""
    console.admin.post("/admin/tenants", json={"id": tenant})  # 409 if it exists: fine
    resp = console.admin.post(f"/admin/tenants/{tenant}/keys", json={"name": "test"})
    assert resp.status_code == 201, resp.text
    return str(resp.json()["key"])


def ensure_adapter(console: ConsoleServer, tenant: str, name: str, folder: Path) -> None:
    if console.admin.get(f"/admin/tenants/{tenant}/adapters/{name}").status_code == 200:
        return
    write_adapter(folder)
    files = [(p.name, (p.name, p.read_bytes())) for p in sorted(folder.iterdir())]
    resp = console.admin.post(f"/admin/tenants/{tenant}/adapters/{name}/versions", files=files)
    assert resp.status_code == 201, resp.text


def keys_of(console: ConsoleServer, tenant: str) -> list[dict[str, Any]]:
    return list(console.admin.get(f"/admin/tenants/{tenant}/keys").json()["data"])


# -- login, tenants and keys ------------------------------------------------------------------

def test_login_refuses_a_wrong_token_and_keeps_the_right_one_out_of_urls(page: Page) -> None:
    page.logout()
    page.open()
    assert not page.find("#login-tenant").is_displayed()  # the operator needs no tenant id
    page.type("#login-token", "not-the-token")
    page.find("#login-submit").click()
    assert "invalid admin token" in page.wait_text("#login-out", "Not accepted").text
    assert page.driver.execute_script("return sessionStorage.length") == 0
    page.screenshot("01-login-refused")
    page.login_admin()
    assert [a.text for a in page.all("#nav a")] == [
        "Tenants", "Adapters", "Engine", "Fine-tuning", "Usage", "Playground"]
    assert ADMIN_TOKEN not in page.driver.current_url
    assert page.driver.get_cookies() == []  # nothing a cross-site request could carry
    page.click_button("Log out")
    page.find("#login-token")
    assert page.driver.execute_script("return sessionStorage.length") == 0


def test_operator_creates_a_tenant_and_a_key_shown_once_then_revokes_it(
        page: Page, console: ConsoleServer) -> None:
    page.login_admin("tenants")
    page.type("#new-tenant", "acme")
    page.find("#create-tenant button").click()
    page.wait_text("#tenants-out", "Created tenant acme")
    page.wait_text("#tenant-list td", "acme")
    page.type("#new-key-name", HOSTILE)  # a label is free text: it must show as text
    page.find("#create-key button").click()
    key = page.find("#new-key-value").text
    assert key.startswith("lpx-")
    page.secrets.append(key)
    assert console.admin.get("/healthz").status_code == 200
    resp = console.admin.get("/v1/models", headers={"Authorization": f"Bearer {key}",
                                                    "X-Tenant-ID": "acme"})
    assert resp.status_code == 200, resp.text  # the key shown works
    page.wait_text("#keys td", HOSTILE)  # the hostile label, as literal text
    assert not page.all("#keys img") and not page.all("#keys script")
    page.screenshot("02-tenants-new-key")

    # Shown once: leaving the page and coming back shows no key, only its prefix.
    page.go("engine")
    page.find("#engine")
    page.go("tenants")
    page.click_button("Keys", "#tenant-list")
    page.wait_text("#keys td", HOSTILE)
    assert key not in page.driver.page_source and not page.all("#new-key-value")
    assert key not in json.dumps(page.driver.execute_script("return {...sessionStorage}"))

    page.driver.execute_script("window.confirm = () => true")
    page.click_button("Revoke", "#keys")
    page.wait(lambda d: not any(b.text == "Revoke" for b in
                                d.find_elements(By.CSS_SELECTOR, "#keys button")),
              "the key to be revoked")
    resp = console.admin.get("/v1/models", headers={"Authorization": f"Bearer {key}",
                                                    "X-Tenant-ID": "acme"})
    assert resp.status_code == 401

    # Limits: set two, the rest unlimited; a bad one is refused with the API's message.
    page.type('#limits [data-limit="requests_per_minute"]', "60")
    page.type('#limits [data-limit="weight"]', "2")
    page.find("#limits button").click()
    page.wait_text("#limits-out", "Limits saved.")
    limits = console.admin.get("/admin/tenants/acme/limits").json()
    assert limits["requests_per_minute"] == 60 and limits["weight"] == 2
    assert limits["tokens_per_minute"] is None
    assert console.admin.put("/admin/tenants/acme/limits", json={}).status_code == 200

    # Delete a tenant (after the confirmation).
    page.type("#new-tenant", "doomed")
    page.find("#create-tenant button").click()
    page.wait_text("#tenant-list td", "doomed")
    row = page.wait_text("#tenant-list tr", "doomed")
    next(b for b in row.find_elements(By.TAG_NAME, "button") if b.text == "Delete").click()
    page.wait_text("#tenants-out", "Deleted tenant doomed")
    assert console.admin.get("/admin/tenants/doomed").status_code == 404


def test_a_wrong_tenant_is_refused_with_the_apis_message(page: Page) -> None:
    page.login_admin("tenants")
    page.type("#new-tenant", "no spaces allowed")
    page.find("#create-tenant button").click()
    message = page.wait(lambda d: d.find_element(By.ID, "tenants-out").text or None,
                        "an error message")
    assert "error" in page.find("#tenants-out").get_attribute("class")
    assert message and "no spaces allowed" not in [t.text for t in page.all("#tenant-list td")]


# -- adapters: upload, aliases, pins ----------------------------------------------------------

def test_operator_uploads_a_peft_folder_sets_an_alias_and_pins_it(
        page: Page, console: ConsoleServer, tmp_path: Path) -> None:
    ensure_tenant(console, "acme")
    folder = write_adapter(tmp_path / "support-bot", r=8, targets=("q_proj", "v_proj"))
    page.login_admin("adapters/acme")
    page.type("#upload-name", "support-bot")
    page.find("#upload-files").send_keys("\n".join(str(p) for p in sorted(folder.iterdir())))
    page.find("#upload button[type=submit]").click()
    page.wait_text("#upload-out", "Registered support-bot@")
    block = '[data-adapter="support-bot"]'
    page.wait_text(f"{block} td", "support-bot@1")
    version = console.admin.get("/admin/tenants/acme/adapters/support-bot").json()
    assert version["latest_version"] >= 1

    page.type(f"{block} .alias-name", "prod")
    page.find(f"{block} .alias-form button").click()
    page.wait_text(f"{block} .badge", "prod → v")
    page.click_button("Pin", block)
    page.wait_text(f"{block} button", "Unpin")
    adapter = console.admin.get("/admin/tenants/acme/adapters/support-bot").json()
    assert "prod" in adapter["aliases"] and any(v["pinned"] for v in adapter["versions"])
    page.screenshot("03-adapters")

    # Not an adapter (a pickle and no config): the server's message, nothing registered.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    before = len(adapter["versions"])
    page.type("#upload-name", "support-bot")
    page.find("#upload-files").send_keys(str(bad / "adapter_model.bin"))
    page.find("#upload button[type=submit]").click()
    page.wait(lambda d: "error" in d.find_element(By.ID, "upload-out").get_attribute("class"),
              "the upload to be refused")
    assert "pickle" in page.text_of("#upload-out").lower() or "bin" in page.text_of("#upload-out")
    after = console.admin.get("/admin/tenants/acme/adapters/support-bot").json()
    assert len(after["versions"]) == before
    page.click_button("Unpin", block)  # leave it unpinned for the engine test
    page.wait_text(f"{block} button", "Pin")


def test_a_hostile_adapter_name_is_refused_and_shown_as_text(
        page: Page, console: ConsoleServer, tmp_path: Path) -> None:
    ensure_tenant(console, "acme")
    folder = write_adapter(tmp_path / "x")
    page.login_admin("adapters/acme")
    page.type("#upload-name", HOSTILE)
    page.find("#upload-files").send_keys("\n".join(str(p) for p in sorted(folder.iterdir())))
    page.find("#upload button[type=submit]").click()
    page.wait(lambda d: "error" in d.find_element(By.ID, "upload-out").get_attribute("class"),
              "the name to be refused")
    assert not page.all("#upload-out img") and not page.all("#upload-out script")
    page.screenshot("04-hostile-adapter-name")


# -- the playground ---------------------------------------------------------------------------

def test_playground_streams_the_adapter_and_the_base_model_side_by_side(
        page: Page, console: ConsoleServer, tmp_path: Path) -> None:
    ensure_tenant(console, "acme")
    ensure_adapter(console, "acme", "support-bot", tmp_path / "support-bot")
    page.login_admin("playground/acme")
    page.select("#pg-model", "support-bot@prod" if console.admin.get(
        "/admin/tenants/acme/adapters/support-bot").json()["aliases"] else "support-bot")
    page.type("#pg-prompt", "What is the capital of France?")
    console.engine.release.clear()  # hold both streams after their first piece
    try:
        page.find("#pg-send").click()
        # Streamed: the first pieces are on screen while the engine still holds the rest.
        page.wait(lambda d: _text(d, "answer-adapter") == ADAPTER_PIECES[0]
                  and _text(d, "answer-base") == BASE_PIECES[0], "the first pieces of both answers")
        page.screenshot("05-playground-streaming")
        temporary = [k for k in keys_of(console, "acme") if k["name"] == "console-playground"
                     and k["revoked_at"] is None]
        assert len(temporary) == 1  # the operator's temporary key, live while streaming
    finally:
        console.engine.release.set()
    page.wait(lambda d: d.find_element(By.ID, "answer-adapter").get_attribute("data-done")
              == "true" and d.find_element(By.ID, "answer-base").get_attribute("data-done")
              == "true", "both answers to end")
    page.wait_text("#pg-out", "Done.")
    adapter = page.find("#answer-adapter")
    assert adapter.get_attribute("textContent") == ADAPTER_TEXT  # markup shown as text
    assert page.find("#answer-base").get_attribute("textContent") == BASE_TEXT
    assert not page.all("#answer-adapter *")  # no element made from model output
    page.wait_text("main h2", "Adapter: support-bot")
    page.wait_text("main h2", f"Base model: {BASE_MODEL}")
    page.screenshot("05-playground")
    # The temporary key is revoked once both answers ended.
    assert all(k["revoked_at"] is not None for k in keys_of(console, "acme")
               if k["name"] == "console-playground")
    sent = [r["body"] for r in console.engine.requests[-2:]]
    assert {b["model"] for b in sent} >= {BASE_MODEL} and all(b["stream"] for b in sent)


def _text(driver: Any, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).get_attribute("textContent"))


def test_tenant_view_lists_its_models_and_chats_with_its_own_key(
        page: Page, console: ConsoleServer, tmp_path: Path) -> None:
    key = ensure_tenant(console, "acme")
    ensure_adapter(console, "acme", "support-bot", tmp_path / "support-bot")
    page.login_tenant("acme", key)
    assert [a.text for a in page.all("#nav a")] == ["Models", "Fine-tuning", "Playground"]
    page.wait_text("main td", "support-bot")
    page.screenshot("06-tenant-models")
    before = len(keys_of(console, "acme"))
    page.go("playground")
    page.select("#pg-model", "support-bot")
    page.type("#pg-prompt", "Hi")
    page.find("#pg-send").click()
    page.wait(lambda d: d.find_element(By.ID, "answer-base").get_attribute("data-done")
              == "true" and d.find_element(By.ID, "answer-adapter").get_attribute("data-done")
              == "true", "both answers to end")
    assert page.find("#answer-adapter").get_attribute("textContent") == ADAPTER_TEXT
    assert len(keys_of(console, "acme")) == before  # a tenant uses its own key: none made
    page.screenshot("07-tenant-playground")
    # The tenant cannot use the operator's pages: the admin API refuses its key.
    resp = console.admin.get("/admin/tenants", headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 401
    # A key revoked while in use: the next call sends the tenant back to the login page.
    key_id = next(k["id"] for k in keys_of(console, "acme") if key.startswith(k["prefix"])
                  and k["revoked_at"] is None)
    assert console.admin.delete(f"/admin/tenants/acme/keys/{key_id}").status_code == 200
    page.go("models")
    page.wait_text("#login-out", "invalid API key")
    assert page.driver.execute_script("return sessionStorage.length") == 0


# -- engine, live ------------------------------------------------------------------------------

def test_engine_page_shows_resident_adapters_and_updates_live(
        page: Page, console: ConsoleServer, tmp_path: Path) -> None:
    key = ensure_tenant(console, "acme")
    ensure_adapter(console, "acme", "support-bot", tmp_path / "support-bot")
    ensure_adapter(console, "acme", "other-bot", tmp_path / "other-bot")
    page.login_admin("engine")
    loads = page.wait(lambda d: _card(d, "loads"), "the loads card")
    headers = {"Authorization": f"Bearer {key}", "X-Tenant-ID": "acme"}
    resp = console.admin.post("/v1/chat/completions", headers=headers, json={
        "model": "other-bot", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200, resp.text
    # No reload: the page polls and shows the new load and the adapter now resident.
    page.wait(lambda d: int(_card(d, "loads") or 0) > int(loads), "the loads count to grow")
    page.wait_text("#engine .engine-name", "acme/other-bot@1")
    page.screenshot("08-engine")


def _card(driver: Any, label: str) -> str | None:
    for card in driver.find_elements(By.CSS_SELECTOR, "#engine .card"):
        value, _, name = card.text.partition("\n")
        if name == label:
            return str(value)
    return None


# -- fine-tuning jobs ---------------------------------------------------------------------------

async def _finished_job(console: ConsoleServer, tenant: str, steps: int) -> str:
    """A job as the training worker leaves it: metrics events per step, a checkpoint, the
    held-out evaluation, succeeded; plus a hostile event message."""
    assert console.services is not None
    jobs = console.services.jobs
    data = "\n".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                              {"role": "assistant", "content": f"a{i}"}]})
                     for i in range(12)).encode()
    f = await jobs.create_file(tenant, "train.jsonl", "fine-tune", data)
    job = await jobs.create_job(tenant, model=BASE_MODEL, training_file=f.id,
                                recipe=TrainingRecipe(), suffix="pirate", adapter_name="pirate")
    assert await jobs.files_validated(job.id)
    claimed = await jobs.claim("console-test", 30)
    assert claimed is not None and claimed.id == job.id
    for step in range(1, steps + 1):
        loss = 2.5 / step + 0.3
        await jobs.add_event(job.id, f"Step {step}/{steps}: training loss={loss:.4f}",
                             type_="metrics", data={"step": step, "total_steps": steps,
                                                    "epoch": 1, "loss": loss,
                                                    "tokens_per_s": 100.0})
        if step % 4 == 0:
            await jobs.add_checkpoint(job.id, step, {"train_loss": loss})
    await jobs.add_event(job.id, f"Line 3 of the file: {HOSTILE}", level="warn")
    figures = {"base_loss": 2.1, "base_perplexity": 8.17, "adapter_loss": 0.9,
               "adapter_perplexity": 2.46, "prompted_loss": 1.7, "holdout_examples": 2,
               "improved": True}
    await jobs.add_event(job.id, "Held-out loss: base 2.1000, prompted 1.7000, adapter 0.9000",
                         type_="metrics", data=figures)
    models = {"base": {"model": BASE_MODEL, "kind": "base", "loss": 2.1, "f1": 0.2},
              "prompted": {"model": BASE_MODEL, "kind": "prompted", "loss": 1.7, "f1": 0.4},
              "pirate@1": {"model": "pirate@1", "kind": "adapter", "loss": 0.9, "f1": 0.8}}
    report = EvaluationReport.model_validate({
        "examples": 2, "metric": "loss", "models": models, "best": "pirate@1",
        "improved": True, "samples": [{
            "prompt": [{"role": "user", "content": "Where is Paris?"}], "reference": "France",
            "outputs": {"base": "In France.", "prompted": "France, matey.",
                        "pirate@1": f"Arr, France {HOSTILE}"}}]})
    assert await jobs.finish(job.id, "console-test", JobStatus.SUCCEEDED, "Job succeeded",
                             fine_tuned_model="pirate@1", trained_tokens=4321,
                             result={"eval": figures, "run": {}},
                             evaluation=report.model_dump())
    return job.id


def test_a_job_shows_its_loss_chart_evaluation_and_events(
        page: Page, console: ConsoleServer, tmp_path: Path) -> None:
    key = ensure_tenant(console, "acme")
    steps = 12
    job_id = console.run(_finished_job(console, "acme", steps))
    page.login_admin("jobs")
    page.wait_text("#job-list a.job-link", job_id).click()
    page.wait_text("#job-status", "succeeded")
    line = page.find('#loss-chart polyline[data-name="training loss"]')
    points = line.get_attribute("points").split()
    assert len(points) == steps
    ys = [float(p.split(",")[1]) for p in points]
    assert ys == sorted(ys)  # SVG y grows downwards: the loss falls step by step
    refs = {e.get_attribute("data-name") for e in page.all("#loss-chart line.ref")}
    assert refs == {"held-out loss: base model", "held-out loss: prompted baseline",
                    "held-out loss: adapter"}
    evaluation = page.text_of("#job-eval")
    assert all(f in evaluation for f in ("2.1000", "1.7000", "0.9000", "best"))
    page.wait_text("#job-eval", "beats the base model and the prompted baseline")
    page.wait_text("#job-eval td", f"Arr, France {HOSTILE}")  # a model's output, as text
    hostile = page.wait_text("#job .event-message", "Line 3 of the file")
    assert hostile.text.endswith(HOSTILE) and not page.all("#job img")
    page.screenshot("09-job-operator")

    page.login_tenant("acme", key)
    page.go(f"jobs/{job_id}")
    page.wait_text("#job-status", "succeeded")
    assert len(page.find('#loss-chart polyline[data-name="training loss"]')
               .get_attribute("points").split()) == steps
    page.screenshot("10-job-tenant")

    # The tenant starts a job of its own: the dataset uploaded, the job created, its page shown.
    dataset = tmp_path / "train.jsonl"
    dataset.write_text("\n".join(json.dumps({"messages": [
        {"role": "user", "content": f"question {i}"},
        {"role": "assistant", "content": f"Arr matey! answer {i}"}]}) for i in range(12)))
    page.go("jobs")
    page.find("#ft-file").send_keys(str(dataset))
    page.type("#ft-suffix", "parrot")
    page.type("#ft-epochs", "1")
    page.find("#new-job button[type=submit]").click()
    page.wait(lambda d: re.search(r"#/jobs/ftjob-", d.current_url), "the new job's page")
    new_id = page.driver.current_url.rsplit("/", 1)[1]
    page.wait_text("#job h2", new_id)
    job = console.admin.get(f"/admin/fine_tuning/jobs/{new_id}").json()
    assert job["suffix"] == "parrot" and job["organization_id"] == "acme"
    assert job["hyperparameters"]["n_epochs"] == 1
    page.screenshot("11-job-new")

    # The operator cancels it (no worker runs in this console's server: it stays unclaimed).
    page.login_admin(f"jobs/{new_id}")
    page.wait_text("#job button", "Cancel job").click()
    page.wait_text("#job-status", "cancelled")
    assert console.admin.get(f"/admin/fine_tuning/jobs/{new_id}").json()["status"] == "cancelled"
    assert not [b for b in page.all("#job button") if b.text == "Cancel job"]


# -- usage ---------------------------------------------------------------------------------------

def test_usage_page_charts_tokens_per_tenant_and_per_adapter(
        page: Page, console: ConsoleServer, tmp_path: Path) -> None:
    key = ensure_tenant(console, "acme")
    ensure_adapter(console, "acme", "support-bot", tmp_path / "support-bot")
    headers = {"Authorization": f"Bearer {key}", "X-Tenant-ID": "acme"}
    resp = console.admin.post("/v1/chat/completions", headers=headers, json={
        "model": "support-bot", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200

    def metered() -> bool:
        data = console.admin.get("/admin/tenants/acme/usage",
                                 params={"group_by": "adapter"}).json()["data"]
        return any(e["adapter"] == "support-bot" for e in data)
    page.wait(lambda _d: metered(), "the usage to be flushed")
    page.login_admin("usage")
    page.find('#usage-chart polyline[data-name="acme"]')
    page.screenshot("12-usage-all")
    page.select("#usage-tenant", "acme")
    page.find("main form button[type=submit]").click()
    page.find('#usage-chart polyline[data-name="support-bot"]')
    page.wait_text("#usage td", "support-bot")
    page.screenshot("13-usage-acme")


# -- CSRF: another site cannot act for a logged-in operator ----------------------------------

class _Hostile(BaseHTTPRequestHandler):
    target = ""

    def do_GET(self) -> None:
        if self.path == "/frame":
            self._send(f'<!doctype html><iframe src="{self.target}/console"></iframe>')
            return
        page = f"""<!doctype html><title>evil</title>
<form id=f method=POST action="{self.target}/admin/tenants" enctype="text/plain">
<input name='{{"id":"evil","x":"' value='"}}'></form>
<script>
fetch("{self.target}/admin/tenants", {{method: "POST", credentials: "include",
  headers: {{"Content-Type": "application/json"}}, body: JSON.stringify({{id: "evil2"}})}})
  .then(r => {{ document.title = "fetch:" + r.status; }},
        () => {{ document.title = "fetch:blocked"; }})
  .finally(() => document.getElementById("f").submit());
</script>"""
        self._send(page)

    def _send(self, page: str) -> None:
        body = page.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def hostile_site(console: ConsoleServer) -> Any:
    handler = type("Handler", (_Hostile,), {"target": console.url})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_another_site_cannot_make_state_changing_calls(
        page: Page, console: ConsoleServer, hostile_site: str) -> None:
    page.login_admin("tenants")  # a logged-in operator in this browser
    page.driver.get(hostile_site)
    # The form post lands on the gateway without the header: refused, nothing created.
    page.wait(lambda d: "Authorization" in d.find_element(By.TAG_NAME, "body").text,
              "the cross-site form post's answer")
    body = json.loads(page.driver.find_element(By.TAG_NAME, "body").text)
    assert body["error"]["type"] == "authentication_error"
    tenants = {t["id"] for t in console.admin.get("/admin/tenants").json()["data"]}
    assert not tenants & {"evil", "evil2"}
    page.screenshot("14-csrf-refused")
    page.driver.get_log("browser")  # the hostile page's own refusals are expected noise


def test_the_console_cannot_be_framed_and_loads_nothing_from_elsewhere(
        page: Page, hostile_site: str) -> None:
    page.driver.get(hostile_site + "frame")
    page.wait(lambda d: any("frame-ancestors" in e["message"] for e in d.get_log("browser")),
              "the browser to refuse to frame the console")
    page.driver.get_log("performance")  # the hostile site's own requests
    page.login_admin("tenants")
    page.find("#tenant-list")
    page.check_health()
    # Trusted Types are enforced: an HTML string given to innerHTML throws, nothing is parsed.
    outcome = page.driver.execute_script(
        "try { document.getElementById('main').innerHTML = '<img src=x>'; return 'parsed'; }"
        " catch (e) { return e.name; }")
    assert outcome == "TypeError" and not page.all("#main img")
    page.driver.get_log("browser")  # the refusal is logged: expected
    origin = page.server.url
    assert page.requested and all(
        u.startswith(origin) or u.startswith("data:") for u in page.requested), page.requested
    assert all(re.match(rf"{re.escape(origin)}/(console|admin|v1)\b", u)
               for u in page.requested if u.startswith(origin))
