"""The `loraplex` admin commands against a running server: the real gateway under uvicorn on
a loopback port with the stand-in engine (tests/live_gateway.py). Commands run in-process
through `server.cli.main` (output through capsys), and a few as the installed `loraplex`
script in a child process. Each command's success and its error paths: a wrong token,
unknown names, a folder that is not an adapter, a server that is down or broken.

One server serves the whole module; each test works on tenants of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from adapters.training.jobs import JobStatus
from adapters.training.recipe import TrainingRecipe
from server.admin_cli.errors import (
    INTERRUPTED,
    JOB_NOT_SUCCEEDED,
    OK,
    REFUSED,
    UNREACHABLE,
    USAGE,
)
from server.cli import main
from server.settings import Settings
from tests.live_gateway import (
    LiveGateway,
    free_port,
    live_gateway,
    make_peft_adapter,
    serve,
    wait_for,
)
from tests.s3_server import MotoS3Server, s3_env
from tests.unit.conftest import ADMIN_TOKEN, BASE_MODEL, FakeEngine, write_adapter

LORAPLEX = Path(sys.executable).parent / "loraplex"


# -- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def live(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    root = tmp_path_factory.mktemp("cli-gateway")
    allowed = root / "allowed"
    allowed.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):  # a developer's LORAPLEX_* must not reach the server
            if name.upper().startswith("LORAPLEX_"):
                mp.delenv(name)
        settings = Settings(home=root / "home", admin_token=ADMIN_TOKEN,
                            engine_url="http://fake-engine", max_resident_adapters=2,
                            max_loras=1, max_lora_rank=16, local_source_allowlist=[allowed],
                            engine_health_poll_s=3600.0)
    with live_gateway(settings, base_model_dir, FakeEngine()) as gw:
        yield gw


@pytest.fixture(scope="module")
def peft_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real PEFT adapter folder (saved by peft, README.md included)."""
    return make_peft_adapter(tmp_path_factory.mktemp("peft") / "support-bot")


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


Cli = Callable[..., Result]


@pytest.fixture
def cli(live: LiveGateway, capsys: pytest.CaptureFixture[str]) -> Cli:
    """`cli(*args, token=..., url=...)`: `loraplex ARGS --url <live> --admin-token <token>`
    in-process; token=None sends none."""
    capsys.readouterr()

    def run(*args: str, token: str | None = ADMIN_TOKEN, url: str | None = None) -> Result:
        argv = [*args, "--url", url or live.url]
        if token is not None:
            argv += ["--admin-token", token]
        code = main(argv)
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


def api(live: LiveGateway, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """The admin API directly, to check what a command did."""
    return httpx.request(method, live.url + path, timeout=30,
                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, **kwargs)


def api_error(live: LiveGateway, method: str, path: str, **kwargs: Any) -> str:
    """The message of the API's error answer to this call."""
    resp = api(live, method, path, **kwargs)
    assert 400 <= resp.status_code < 500, resp.text
    return str(resp.json()["error"]["message"])


def refused(result: Result, message: str) -> None:
    """The command exited 1 and showed the API's message as is, on stderr, no traceback."""
    assert result.code == REFUSED, result
    assert message in result.err, (message, result.err)
    assert "Traceback" not in result.err + result.out


def tenant_with_key(live: LiveGateway, tenant: str) -> str:
    assert api(live, "POST", "/admin/tenants", json={"id": tenant}).status_code == 201
    resp = api(live, "POST", f"/admin/tenants/{tenant}/keys")
    return str(resp.json()["key"])


# -- help and the installed script ------------------------------------------------------------

def test_help_lists_the_admin_commands_and_their_exit_codes() -> None:
    done = subprocess.run([str(LORAPLEX), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for command in ("tenants", "keys", "adapters", "jobs", "engine"):
        assert f"    {command} " in done.stdout, done.stdout
    with pytest.raises(SystemExit) as exited:
        main(["adapters", "push", "--help"])
    assert exited.value.code == 0
    with pytest.raises(SystemExit) as exited:
        main(["tenants", "frobnicate"])
    assert exited.value.code == USAGE


def test_help_epilog_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["jobs", "follow", "--help"])
    out = capsys.readouterr().out
    for line in ("exit codes:", "1    refused", "2    usage", "3    the server is unreachable",
                 "4    jobs follow", "LORAPLEX_URL", "LORAPLEX_ADMIN_TOKEN"):
        assert line in out, out


def test_installed_script_takes_url_and_token_from_the_environment(live: LiveGateway,
                                                                   tmp_path: Path) -> None:
    assert api(live, "POST", "/admin/tenants", json={"id": "env-co"}).status_code == 201
    env = {**os.environ, "LORAPLEX_URL": live.url, "LORAPLEX_ADMIN_TOKEN": ADMIN_TOKEN,
           "LORAPLEX_HOME": str(tmp_path)}
    done = subprocess.run([str(LORAPLEX), "tenants", "list", "--json"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert listed["object"] == "list" and "env-co" in [t["id"] for t in listed["data"]]

    # No token in flags or environment: the one `loraplex up` stored in the data folder.
    (tmp_path / "admin_token").write_text(ADMIN_TOKEN + "\n")
    env.pop("LORAPLEX_ADMIN_TOKEN")
    done = subprocess.run([str(LORAPLEX), "tenants", "list"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "env-co" in done.stdout and "tenant" in done.stdout  # a table

    env["LORAPLEX_ADMIN_TOKEN"] = "wrong"
    done = subprocess.run([str(LORAPLEX), "tenants", "list", "--json"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == REFUSED and done.stdout == ""
    assert "HTTP 401" in done.stderr and "LORAPLEX_ADMIN_TOKEN" in done.stderr


def test_installed_script_with_the_server_down_prints_one_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = subprocess.run([str(LORAPLEX), "tenants", "list", "--url", url, "--admin-token",
                           "x"], capture_output=True, text=True, timeout=60)
    assert done.returncode == UNREACHABLE
    assert done.stdout == ""
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "cannot reach the loraplex server at " + url in done.stderr


# -- tenants and keys -------------------------------------------------------------------------

def test_tenants_create_list_delete(live: LiveGateway, cli: Cli) -> None:
    created = cli("tenants", "create", "t-acme")
    assert created.code == OK and "Created tenant t-acme" in created.out
    as_json = cli("tenants", "create", "t-globex", "--json")
    assert as_json.code == OK and as_json.json()["id"] == "t-globex"

    listed = cli("tenants", "list", "--json")
    assert {"t-acme", "t-globex"} <= {t["id"] for t in listed.json()["data"]}
    table = cli("tenants", "list")
    assert table.code == OK and "t-acme" in table.out and "created" in table.out

    again = cli("tenants", "create", "t-acme")
    refused(again, api_error(live, "POST", "/admin/tenants", json={"id": "t-acme"}))
    assert "HTTP 409" in again.err
    bad = cli("tenants", "create", "bad name!")
    refused(bad, api_error(live, "POST", "/admin/tenants", json={"id": "bad name!"}))

    # Deleting asks first: without --yes and no terminal, nothing is deleted.
    unconfirmed = cli("tenants", "delete", "t-globex")
    assert unconfirmed.code == USAGE and "--yes" in unconfirmed.err
    assert api(live, "GET", "/admin/tenants/t-globex").status_code == 200
    deleted = cli("tenants", "delete", "t-globex", "--yes")
    assert deleted.code == OK and "Deleted tenant t-globex" in deleted.out
    assert api(live, "GET", "/admin/tenants/t-globex").status_code == 404
    refused(cli("tenants", "delete", "t-globex", "--yes"),
            api_error(live, "DELETE", "/admin/tenants/t-globex"))
    # Names that would change the URL are refused before anything is sent.
    dots = cli("tenants", "delete", "..", "--yes")
    assert dots.code == REFUSED and "invalid name" in dots.err
    assert api(live, "GET", "/admin/tenants/t-acme").status_code == 200


def test_keys_create_list_revoke(live: LiveGateway, cli: Cli) -> None:
    assert cli("tenants", "create", "k-acme").code == OK
    created = cli("keys", "create", "k-acme", "--name", "ci")
    assert created.code == OK
    secret = created.out.strip()  # the secret alone on stdout; the rest on stderr
    assert secret.startswith("lpx-") and "\n" not in secret
    assert "shown once" in created.err
    headers = {"X-Tenant-ID": "k-acme", "Authorization": f"Bearer {secret}"}
    assert httpx.get(f"{live.url}/v1/models", headers=headers).status_code == 200

    listed = cli("keys", "list", "k-acme", "--json").json()["data"]
    assert [k["name"] for k in listed] == ["ci"] and secret not in json.dumps(listed)
    table = cli("keys", "list", "k-acme")
    assert listed[0]["id"] in table.out and secret not in table.out

    revoked = cli("keys", "revoke", "k-acme", listed[0]["id"], "--json")
    assert revoked.code == OK and revoked.json()["revoked_at"] is not None
    assert httpx.get(f"{live.url}/v1/models", headers=headers).status_code == 401

    refused(cli("keys", "create", "k-nobody"),
            api_error(live, "POST", "/admin/tenants/k-nobody/keys"))
    refused(cli("keys", "list", "k-nobody"), api_error(live, "GET", "/admin/tenants/k-nobody/keys"))
    refused(cli("keys", "revoke", "k-acme", "key-nope"),
            api_error(live, "DELETE", "/admin/tenants/k-acme/keys/key-nope"))


def test_a_wrong_or_missing_token_is_refused_with_a_hint(live: LiveGateway, cli: Cli) -> None:
    for args in (("tenants", "list"), ("tenants", "create", "w-acme"), ("keys", "list", "w"),
                 ("adapters", "list", "w"), ("jobs", "list"), ("engine",)):
        for token in ("wrong-token", None):
            result = cli(*args, token=token)
            assert result.code == REFUSED, (args, result)
            assert "HTTP 401" in result.err and "--admin-token" in result.err
            assert result.out == ""
    assert api(live, "GET", "/admin/tenants/w-acme").status_code == 404


# -- adapters ---------------------------------------------------------------------------------

def test_push_a_peft_folder_then_manage_versions(live: LiveGateway, cli: Cli,
                                                 peft_folder: Path) -> None:
    tenant_with_key(live, "a-acme")
    pushed = cli("adapters", "push", "a-acme", "bot", str(peft_folder))
    assert pushed.code == OK, pushed
    assert "Registered a-acme/bot@1 (rank 8" in pushed.out
    assert "Uploading support-bot" in pushed.err  # the progress bar, on stderr
    second = cli("adapters", "push", "a-acme", "bot", str(peft_folder), "--json")
    assert second.code == OK and second.json()["model"] == "bot@2"
    assert "Uploading" not in second.err  # no bar for scripts
    stored = api(live, "GET", "/admin/tenants/a-acme/adapters/bot").json()
    assert [v["version"] for v in stored["versions"]] == [1, 2]
    assert stored["versions"][0]["sha256"] == second.json()["sha256"]  # the same files

    assert cli("adapters", "alias", "a-acme", "bot", "prod", "1").code == OK
    versions = cli("adapters", "versions", "a-acme", "bot")
    assert versions.code == OK
    row1 = next(line for line in versions.out.splitlines() if "bot@1" in line)
    assert "prod" in row1 and "q_proj,v_proj" in row1
    assert cli("adapters", "versions", "a-acme", "bot", "--json").json()["aliases"] == {"prod": 1}

    pinned = cli("adapters", "pin", "a-acme", "bot", "2")
    assert pinned.code == OK and "bot@2 is pinned" in pinned.out
    wait_for(lambda: any(r["pinned"] for r in api(live, "GET", "/admin/engine").json()
                         ["adapters"]["resident"]), "the pinned version to be loaded")
    listed = cli("adapters", "list", "a-acme")
    row = next(line for line in listed.out.splitlines() if "bot" in line)
    assert "prod->1" in row and " 2 " in row  # aliases, pinned version
    unpinned = cli("adapters", "unpin", "a-acme", "bot", "2", "--json")
    assert unpinned.code == OK and unpinned.json()["pinned"] is False

    # A version an alias points at is not deleted: the API's 409, as is.
    aliased = cli("adapters", "delete", "a-acme", "bot", "--version", "1", "--yes")
    refused(aliased, api_error(live, "DELETE", "/admin/tenants/a-acme/adapters/bot/versions/1"))
    assert "HTTP 409" in aliased.err
    gone = cli("adapters", "alias", "a-acme", "bot", "prod", "--delete")
    assert gone.code == OK and "Deleted alias bot@prod" in gone.out
    assert api(live, "GET", "/admin/tenants/a-acme/adapters/bot").json()["aliases"] == {}
    deleted = cli("adapters", "delete", "a-acme", "bot", "--version", "1", "--yes")
    assert deleted.code == OK and "Deleted version 1 of adapter 'bot'" in deleted.out
    remaining = api(live, "GET", "/admin/tenants/a-acme/adapters/bot").json()["versions"]
    assert [v["version"] for v in remaining] == [2]
    assert cli("adapters", "delete", "a-acme", "bot").code == USAGE  # not confirmed
    assert cli("adapters", "delete", "a-acme", "bot", "--yes").code == OK
    assert cli("adapters", "list", "a-acme", "--json").json()["data"] == []


def test_adapter_commands_show_the_apis_errors(live: LiveGateway, cli: Cli,
                                               peft_folder: Path) -> None:
    tenant_with_key(live, "e-acme")
    assert cli("adapters", "push", "e-acme", "bot", str(peft_folder)).code == OK
    base = "/admin/tenants/e-acme/adapters"
    refused(cli("adapters", "list", "e-nobody"), api_error(live, "GET",
                                                           "/admin/tenants/e-nobody/adapters"))
    refused(cli("adapters", "versions", "e-acme", "nope"), api_error(live, "GET", f"{base}/nope"))
    refused(cli("adapters", "pin", "e-acme", "bot", "9"),
            api_error(live, "PUT", f"{base}/bot/versions/9/pin"))
    refused(cli("adapters", "unpin", "e-acme", "nope", "1"),
            api_error(live, "DELETE", f"{base}/nope/versions/1/pin"))
    refused(cli("adapters", "alias", "e-acme", "bot", "prod", "7"),
            api_error(live, "PUT", f"{base}/bot/aliases/prod", json={"version": 7}))
    refused(cli("adapters", "alias", "e-acme", "bot", "42", "1"),
            api_error(live, "PUT", f"{base}/bot/aliases/42", json={"version": 1}))
    refused(cli("adapters", "delete", "e-acme", "nope", "--yes"),
            api_error(live, "DELETE", f"{base}/nope"))
    both = cli("adapters", "alias", "e-acme", "bot", "prod", "1", "--delete")
    assert both.code == USAGE
    assert cli("adapters", "alias", "e-acme", "bot", "prod").code == USAGE
    # Nothing of that changed the adapter.
    assert [v["version"] for v in api(live, "GET", f"{base}/bot").json()["versions"]] == [1]


def test_push_refuses_a_folder_that_is_not_an_adapter_before_sending(
        live: LiveGateway, cli: Cli, tmp_path: Path, peft_folder: Path) -> None:
    tenant_with_key(live, "n-acme")
    versions = "/admin/tenants/n-acme/adapters/bot/versions"
    posts = live.served.count("POST", versions)

    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("adapters", "push", "n-acme", "bot", str(empty))
    assert result.code == REFUSED and "is not a PEFT LoRA adapter folder" in result.err
    assert "missing adapter_config.json" in result.err and "missing adapter_model.safetensors" \
        in result.err

    pickled = tmp_path / "pickled"
    shutil.copytree(peft_folder, pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    result = cli("adapters", "push", "n-acme", "bot", str(pickled))
    assert result.code == REFUSED and "pickle weights are refused" in result.err

    broken = write_adapter(tmp_path / "broken", config_text="{not json")
    result = cli("adapters", "push", "n-acme", "bot", str(broken))
    assert result.code == REFUSED and "adapter_config.json is not valid JSON" in result.err

    truncated = write_adapter(tmp_path / "truncated", truncate_bytes=10**6)
    result = cli("adapters", "push", "n-acme", "bot", str(truncated))
    assert result.code == REFUSED and "not a readable safetensors file" in result.err

    result = cli("adapters", "push", "n-acme", "bot", str(tmp_path / "nowhere"))
    assert result.code == REFUSED and "does not exist" in result.err
    assert live.served.count("POST", versions) == posts  # nothing was sent

    # Locally plausible, refused by the server (rank over LORAPLEX_MAX_LORA_RANK): its 400.
    big = write_adapter(tmp_path / "big", r=32)
    result = cli("adapters", "push", "n-acme", "bot", str(big))
    files = [(p.name, (p.name, p.read_bytes())) for p in sorted(big.iterdir())]
    refused(result, api_error(live, "POST", versions, files=files))
    assert "HTTP 400" in result.err
    assert api(live, "GET", "/admin/tenants/n-acme/adapters").json()["data"] == []


def test_push_from_s3_and_from_a_server_folder(live: LiveGateway, cli: Cli,
                                               peft_folder: Path) -> None:
    tenant_with_key(live, "s-acme")
    url = "/admin/tenants/s-acme/adapters/bot/versions"
    # This server has no S3 store: the server's own refusal, as is.
    s3 = cli("adapters", "push", "s-acme", "bot", "s3://bucket/adapters/bot/")
    refused(s3, api_error(live, "POST", url, json={"source": "s3://bucket/adapters/bot/"}))
    assert "s3" in s3.err.lower()
    # A folder on the server: only under LORAPLEX_LOCAL_SOURCE_ALLOWLIST.
    outside = cli("adapters", "push", "s-acme", "bot", str(peft_folder), "--server-path")
    refused(outside, api_error(live, "POST", url, json={"path": str(peft_folder)}))
    inside = live.settings.local_source_allowlist[0] / "bot"
    shutil.copytree(peft_folder, inside)
    done = cli("adapters", "push", "s-acme", "bot", str(inside), "--server-path", "--json")
    assert done.code == OK and done.json()["model"] == "bot@1"
    assert done.json()["source"] == f"file://{inside.resolve()}"


def test_push_from_an_allowed_s3_prefix(base_model_dir: Path, peft_folder: Path,
                                        capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    """A gateway whose store is S3 (moto on loopback) registers from s3:// sources under
    LORAPLEX_S3_SOURCE_ALLOWLIST: the command sends the URI, the server reads the files."""
    s3_env(monkeypatch)
    with MotoS3Server() as s3:
        bucket = s3.new_bucket()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            s3.client().upload_file(str(peft_folder / name), bucket, f"team/bot/{name}")
        settings = Settings(home=tmp_path / "home", admin_token=ADMIN_TOKEN,
                            engine_url="http://fake-engine", max_lora_rank=16,
                            store=f"s3://{bucket}/store", s3_endpoint_url=s3.endpoint_url,
                            s3_source_allowlist=[f"s3://{bucket}/team"],
                            engine_health_poll_s=3600.0)
        with live_gateway(settings, base_model_dir, FakeEngine()) as gw:
            tenant_with_key(gw, "s3-acme")
            flags = ["--url", gw.url, "--admin-token", ADMIN_TOKEN]
            code = main(["adapters", "push", "s3-acme", "bot", f"s3://{bucket}/team/bot/",
                         "--json", *flags])
            out, err = capsys.readouterr()
            assert code == OK, err
            assert json.loads(out)["source"] == f"s3://{bucket}/team/bot/"
            versions = api(gw, "GET", "/admin/tenants/s3-acme/adapters/bot").json()["versions"]
            assert [v["version"] for v in versions] == [1]

            outside = f"s3://{bucket}/elsewhere/bot/"
            code = main(["adapters", "push", "s3-acme", "bot", outside, *flags])
            result = Result(code, *capsys.readouterr())
            refused(result, api_error(gw, "POST", "/admin/tenants/s3-acme/adapters/bot/versions",
                                      json={"source": outside}))
            assert "HTTP 403" in result.err
            missing = f"s3://{bucket}/team/nothing/"
            code = main(["adapters", "push", "s3-acme", "bot", missing, *flags])
            result = Result(code, *capsys.readouterr())
            refused(result, api_error(gw, "POST", "/admin/tenants/s3-acme/adapters/bot/versions",
                                      json={"source": missing}))
            versions = api(gw, "GET", "/admin/tenants/s3-acme/adapters/bot").json()["versions"]
            assert [v["version"] for v in versions] == [1]  # nothing half-registered


def test_installed_script_pushes_with_a_progress_bar(live: LiveGateway,
                                                     peft_folder: Path) -> None:
    tenant_with_key(live, "p-acme")
    done = subprocess.run([str(LORAPLEX), "adapters", "push", "p-acme", "bot", str(peft_folder),
                           "--url", live.url, "--admin-token", ADMIN_TOKEN],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Registered p-acme/bot@1" in done.stdout
    assert "Uploading support-bot" in done.stderr and "kB" in done.stderr


# -- engine -----------------------------------------------------------------------------------

def test_engine_shows_resident_adapters_loads_and_hits(live: LiveGateway, cli: Cli,
                                                       peft_folder: Path) -> None:
    key = tenant_with_key(live, "g-acme")
    assert cli("adapters", "push", "g-acme", "bot", str(peft_folder)).code == OK
    before = cli("engine", "--json").json()["adapters"]["stats"]
    headers = {"X-Tenant-ID": "g-acme", "Authorization": f"Bearer {key}"}
    body = {"model": "bot", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(2):
        resp = httpx.post(f"{live.url}/v1/chat/completions", json=body, headers=headers,
                          timeout=30)
        assert resp.status_code == 200, resp.text
    shown = cli("engine")
    assert shown.code == OK
    after = cli("engine", "--json").json()["adapters"]
    assert after["stats"]["loads"] == before["loads"] + 1
    assert after["stats"]["hits"] >= before["hits"] + 1
    engine_name = next(r["engine_name"] for r in after["resident"]
                       if r["engine_name"].startswith("g-acme/bot@1"))
    assert engine_name in shown.out
    fields = {line.split(":", 1)[0]: line.split(":", 1)[1].strip()
              for line in shown.out.splitlines() if ":" in line and "│" not in line}
    assert fields["loads"] == str(after["stats"]["loads"])
    assert fields["hits"] == str(after["stats"]["hits"])
    assert fields["evictions"] == str(after["stats"]["evictions"])
    assert fields["ready"] == "yes" and "resident adapters" in shown.out


# -- fine-tuning jobs -------------------------------------------------------------------------

def dataset(n: int = 12) -> bytes:
    return "\n".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"})
                     for i in range(n)).encode()


def new_job(live: LiveGateway, tenant: str) -> str:
    """A queued job, made in the server's job store (on its event loop)."""
    jobs = live.services.jobs

    async def make() -> str:
        f = await jobs.create_file(tenant, "t.jsonl", "fine-tune", dataset())
        job = await jobs.create_job(tenant, model=BASE_MODEL, training_file=f.id, suffix="pirate",
                                    adapter_name="pirate", recipe=TrainingRecipe())
        assert await jobs.files_validated(job.id)
        return job.id

    return live.call(make())


class StandInWorker(threading.Thread):
    """Plays a training worker for one job, one step per poll of the job by `jobs follow`:
    running, `steps` metrics events (the worker's own shape), then `ending`."""

    def __init__(self, live: LiveGateway, job_id: str, steps: int, ending: JobStatus) -> None:
        super().__init__(daemon=True)
        self.live, self.job_id, self.steps, self.ending = live, job_id, steps, ending
        self.failure: BaseException | None = None

    def polls(self) -> int:
        return self.live.served.count("GET", f"/admin/fine_tuning/jobs/{self.job_id}")

    def next_poll(self) -> None:
        seen = self.polls()
        wait_for(lambda: self.polls() > seen, "the next poll of the job")

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 (reported by the test)
            self.failure = exc

    def _run(self) -> None:
        jobs, job_id = self.live.services.jobs, self.job_id
        self.next_poll()
        self.live.call(jobs.update_job(job_id, status=JobStatus.RUNNING.value, worker_id="w"))
        self.live.call(jobs.add_event(job_id, "Job started"))
        for step in range(1, self.steps + 1):
            self.next_poll()
            loss = 2.0 - 0.25 * step
            self.live.call(jobs.add_event(
                job_id, f"Step {step}/{self.steps}: training loss={loss:.4f}", type_="metrics",
                data={"step": step, "total_steps": self.steps, "epoch": 1, "loss": loss,
                      "tokens_per_s": 100.0}))
        self.next_poll()
        if self.ending == JobStatus.CANCELLED:
            self.live.call(jobs.cancel_job("f-acme", job_id))
        elif self.ending == JobStatus.FAILED:
            self.live.call(jobs.finish(job_id, "w", JobStatus.FAILED, "Job failed: out of memory",
                                       error={"code": "out_of_memory", "param": None,
                                              "message": "the training ran out of memory"}))
        else:
            evaluation = {"base_loss": 2.0, "adapter_loss": 1.1, "improved": True}
            self.live.call(jobs.finish(job_id, "w", JobStatus.SUCCEEDED,
                                       "New fine-tuned model created: pirate@1",
                                       fine_tuned_model="pirate@1",
                                       result={"eval": evaluation}))


@pytest.fixture(scope="module")
def jobs_tenant(live: LiveGateway) -> str:
    tenant_with_key(live, "f-acme")
    return "f-acme"


def follow(cli: Cli, live: LiveGateway, job_id: str, ending: JobStatus,
           *extra: str) -> Result:
    worker = StandInWorker(live, job_id, 4, ending)
    worker.start()
    result = cli("jobs", "follow", job_id, "--interval", "0.02", *extra)
    worker.join(30)
    assert worker.failure is None, worker.failure
    return result


def test_jobs_follow_until_succeeded(live: LiveGateway, cli: Cli, jobs_tenant: str) -> None:
    job_id = new_job(live, jobs_tenant)
    result = follow(cli, live, job_id, JobStatus.SUCCEEDED)
    assert result.code == OK, result
    lines = result.out.splitlines()
    for step in range(1, 5):  # every step seen, in order, with its loss
        assert sum(f"Step {step}/4: training loss={2.0 - 0.25 * step:.4f}" in line
                   for line in lines) == 1, result.out
    assert result.out.index("Step 1/4") < result.out.index("Step 4/4")
    assert "4/4" in result.out and "loss 1.0000" in result.out  # the bar's last state
    assert f"Job {job_id} succeeded: f-acme can call model pirate@1" in result.out
    assert "adapter 1.1000, base model 2.0000 (better than the base model)" in result.out


def test_jobs_follow_failed_or_cancelled_exits_4(live: LiveGateway, cli: Cli,
                                                 jobs_tenant: str) -> None:
    failed = follow(cli, live, new_job(live, jobs_tenant), JobStatus.FAILED)
    assert failed.code == JOB_NOT_SUCCEEDED, failed
    assert "failed: out_of_memory: the training ran out of memory" in failed.out
    cancelled = follow(cli, live, new_job(live, jobs_tenant), JobStatus.CANCELLED, "--json")
    assert cancelled.code == JOB_NOT_SUCCEEDED, cancelled
    documents = [json.loads(line) for line in cancelled.out.splitlines()]
    assert [d["object"] for d in documents[:-1]] == ["fine_tuning.job.event"] * (len(documents) - 1)
    assert [d["data"]["step"] for d in documents if d.get("type") == "metrics"] == [1, 2, 3, 4]
    assert documents[-1]["object"] == "fine_tuning.job" and documents[-1]["status"] == "cancelled"


def test_jobs_follow_rides_out_a_server_restart(live: LiveGateway, cli: Cli,
                                                jobs_tenant: str) -> None:
    job_id = new_job(live, jobs_tenant)
    poll = ("GET", f"/admin/fine_tuning/jobs/{job_id}")
    failure: list[BaseException] = []

    def restart() -> None:
        try:
            wait_for(lambda: live.served.count(*poll) >= 2, "following to start")
            live.served.down = True
            seen = live.served.count(*poll, prefix=True)
            wait_for(lambda: live.served.count(*poll, prefix=True) >= seen + 2,
                     "two refused requests")
            live.call(live.services.jobs.update_job(job_id, status="running", worker_id="w"))
            live.call(live.services.jobs.finish(job_id, "w", JobStatus.SUCCEEDED, "Done",
                                                fine_tuned_model="pirate@9"))
        except BaseException as exc:  # noqa: BLE001 (reported below)
            failure.append(exc)
        finally:
            live.served.down = False

    thread = threading.Thread(target=restart, daemon=True)
    thread.start()
    try:
        result = cli("jobs", "follow", job_id, "--interval", "0.02")
    finally:
        live.served.down = False
        thread.join(30)
    assert not failure, failure
    assert result.code == OK, result
    assert "HTTP 503" in result.err and "retrying" in result.err
    assert "pirate@9" in result.out and "Done" in result.out


def test_installed_script_stops_following_on_ctrl_c(live: LiveGateway, jobs_tenant: str) -> None:
    job_id = new_job(live, jobs_tenant)  # stays queued: nothing ends it
    poll = ("GET", f"/admin/fine_tuning/jobs/{job_id}")
    proc = subprocess.Popen([str(LORAPLEX), "jobs", "follow", job_id, "--interval", "0.02",
                             "--url", live.url, "--admin-token", ADMIN_TOKEN],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: live.served.count(*poll) >= 3, "following to start")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == INTERRUPTED, (out, err)
    assert f"Stopped following {job_id}; the job goes on." in err
    assert "Traceback" not in err
    assert "Files validated; job queued" in out
    status = api(live, "GET", f"/admin/fine_tuning/jobs/{job_id}").json()["status"]
    assert status == "queued"


def test_jobs_list_show_events(live: LiveGateway, cli: Cli, jobs_tenant: str) -> None:
    job_id = new_job(live, jobs_tenant)
    listed = cli("jobs", "list", "--tenant", jobs_tenant, "--status", "queued", "--json")
    assert listed.code == OK and job_id in [j["id"] for j in listed.json()["data"]]
    assert {j["status"] for j in listed.json()["data"]} == {"queued"}
    table = cli("jobs", "list", "--tenant", jobs_tenant)
    assert job_id in table.out and "queued" in table.out
    page = cli("jobs", "list", "--limit", "1")
    assert page.code == OK and "more: loraplex jobs list --after" in page.err

    shown = cli("jobs", "show", job_id)
    assert shown.code == OK
    for text in (job_id, "tenant:", jobs_tenant, "queued", "Files validated; job queued",
                 "pirate"):
        assert text in shown.out, shown.out
    assert cli("jobs", "show", job_id, "--json").json() == api(
        live, "GET", f"/admin/fine_tuning/jobs/{job_id}").json()
    events = cli("jobs", "events", job_id, "--json").json()
    assert [e["message"] for e in reversed(events["data"])] == [
        "Validating training file", "Files validated; job queued"]
    assert "Validating training file" in cli("jobs", "events", job_id).out

    for args in (("jobs", "show", "ftjob-nope"), ("jobs", "events", "ftjob-nope"),
                 ("jobs", "follow", "ftjob-nope")):
        refused(cli(*args), api_error(live, "GET", "/admin/fine_tuning/jobs/ftjob-nope"))
    refused(cli("jobs", "list", "--tenant", "f-nobody"),
            api_error(live, "GET", "/admin/fine_tuning/jobs", params={"tenant": "f-nobody"}))
    refused(cli("jobs", "list", "--limit", "500"),
            api_error(live, "GET", "/admin/fine_tuning/jobs", params={"limit": 500}))
    with pytest.raises(SystemExit) as exited:
        main(["jobs", "list", "--status", "sleeping"])
    assert exited.value.code == USAGE


def test_jobs_cancel(live: LiveGateway, cli: Cli, jobs_tenant: str) -> None:
    job_id = new_job(live, jobs_tenant)
    unconfirmed = cli("jobs", "cancel", job_id)  # not a terminal and no --yes: nothing sent
    assert unconfirmed.code == USAGE and "--yes" in unconfirmed.err
    assert api(live, "GET", f"/admin/fine_tuning/jobs/{job_id}").json()["status"] == "queued"
    done = cli("jobs", "cancel", job_id, "--yes")
    assert done.code == OK, done
    assert f"Job {job_id} of {jobs_tenant} cancelled" in done.out
    assert api(live, "GET", f"/admin/fine_tuning/jobs/{job_id}").json()["status"] == "cancelled"
    assert cli("jobs", "cancel", job_id, "--yes", "--json").json()["status"] == "cancelled"
    refused(cli("jobs", "cancel", "ftjob-nope", "--yes"),
            api_error(live, "POST", "/admin/fine_tuning/jobs/ftjob-nope/cancel"))


# -- servers that are down, broken, or not loraplex --------------------------------------------

def test_every_command_reports_a_server_that_is_down(cli: Cli, peft_folder: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for args in (("tenants", "list"), ("tenants", "create", "x"), ("keys", "create", "x"),
                 ("adapters", "push", "x", "bot", str(peft_folder)), ("adapters", "list", "x"),
                 ("jobs", "list"), ("jobs", "follow", "ftjob-x", "--interval", "0.01"),
                 ("engine",)):
        result = cli(*args, url=url)
        assert result.code == UNREACHABLE, (args, result)
        assert "cannot reach the loraplex server" in result.err
        assert "Traceback" not in result.err and result.out == ""


def _broken_app(release: asyncio.Event) -> Starlette:
    async def fail(_request: Request) -> Response:
        return JSONResponse({"error": {"message": "database is on fire", "type": "server_error",
                                       "param": None, "code": None}}, status_code=500)

    async def html(_request: Request) -> Response:
        return PlainTextResponse("<html>Not Found</html>", status_code=404)

    async def not_json(_request: Request) -> Response:
        return PlainTextResponse("hello")

    async def hang(_request: Request) -> Response:
        await release.wait()
        return PlainTextResponse("too late")

    return Starlette(routes=[Route("/admin/tenants", fail, methods=["GET", "POST"]),
                             Route("/admin/engine", not_json),
                             Route("/admin/fine_tuning/jobs", hang),
                             Route("/admin/tenants/{rest:path}", html, methods=["GET"])])


def test_a_broken_server_or_not_loraplex_is_exit_3(cli: Cli) -> None:
    release = asyncio.Event()
    with serve(_broken_app(release)) as broken:
        try:
            hung = cli("jobs", "list", "--timeout", "0.3", url=broken.url)
        finally:
            broken.loop.call_soon_threadsafe(release.set)
        assert hung.code == UNREACHABLE and "no answer from" in hung.err
        five = cli("tenants", "list", url=broken.url)
        assert five.code == UNREACHABLE and "HTTP 500" in five.err
        assert "database is on fire" in five.err
        other = cli("keys", "list", "acme", url=broken.url)
        assert other.code == UNREACHABLE and "not a loraplex admin API answer" in other.err
        plain = cli("engine", url=broken.url)
        assert plain.code == UNREACHABLE and "without JSON" in plain.err


def test_a_bad_setting_is_a_usage_error(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAPLEX_PORT", "not-a-port")
    result = cli("tenants", "list")
    assert result.code == USAGE and "LORAPLEX_PORT" in result.err


# -- adapters export ---------------------------------------------------------------------------

class ExportWorker(threading.Thread):
    """Plays the training worker for the export of `tenant`'s `adapter`@1 once it is queued
    (only that job: other tests leave jobs queued): the real Worker, with the merge itself a
    stand-in (test_recipe_merging.py runs the real one)."""

    def __init__(self, live: LiveGateway, base_model_dir: Path, work: Path, tenant: str,
                 adapter: str) -> None:
        super().__init__(daemon=True)
        self.live, self.base_model_dir, self.work = live, base_model_dir, work
        self.tenant, self.adapter = tenant, adapter
        self.failure: BaseException | None = None

    def run(self) -> None:
        from adapters.base_model import BaseModelInfo
        from adapters.training.worker import Worker
        from adapters.validation import AdapterLimits

        try:
            services = self.live.services
            worker = Worker(services.jobs, services.registry, services.store,
                            self.base_model_dir, BaseModelInfo.from_folder(self.base_model_dir),
                            AdapterLimits(16, 10**9), BASE_MODEL, self.work, worker_id="w-x")
            jobs = services.jobs
            job = None
            for _ in range(600):
                job = self.live.call(jobs.latest_task(self.tenant, "export", self.adapter))
                if job is not None:
                    break
                threading.Event().wait(0.05)
            assert job is not None, "no export job was queued"
            self.live.call(jobs.update_job(job.id, status="running", worker_id="w-x"))
            self.live.call(worker.run_job(self.live.call(jobs.get_job(self.tenant, job.id))))
        except BaseException as exc:  # noqa: BLE001 (reported by the test)
            self.failure = exc


def test_adapters_export_waits_downloads_checked_and_refuses_what_it_should(
        live: LiveGateway, cli: Cli, peft_folder: Path, base_model_dir: Path,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import adapters.training.export as export_module
    from adapters.validation import sha256_file

    files = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"w" * 300_000,
             "tokenizer/tokenizer.json": b"{}"}

    def fake_export(base: Path, adapter: Path, out: Path, info: dict[str, Any],
                    dtype: str) -> dict[str, dict[str, Any]]:
        for rel, data in files.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(data)
        return {rel: {"size": len(d), "sha256": sha256_file(out / rel)} for rel, d in files.items()}

    monkeypatch.setattr(export_module, "export_merged", fake_export)
    tenant_with_key(live, "x-acme")
    assert cli("adapters", "push", "x-acme", "bot", str(peft_folder)).code == OK

    worker = ExportWorker(live, base_model_dir, tmp_path / "work", "x-acme", "bot")
    worker.start()
    dest = tmp_path / "merged"
    result = cli("adapters", "export", "x-acme", "bot", "1", "--download", str(dest),
                 "--interval", "0.05")
    worker.join(60)
    assert worker.failure is None, worker.failure
    assert result.code == OK, result
    got = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert got == files
    assert "succeeded" in result.out and "tokenizer/tokenizer.json" in result.out
    assert "downloaded to" in result.out and str(dest) in result.out
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")] == []

    shown = cli("adapters", "export", "x-acme", "bot", "1", "--json")  # done: the same export
    assert shown.code == OK and shown.json()["status"] == "succeeded"
    assert shown.json()["job_id"] in result.out
    refused(cli("adapters", "export", "x-acme", "bot", "1", "--download", str(dest)),
            "already exists")
    refused(cli("adapters", "export", "x-acme", "bot", "9"), "version 9")

    # A stored file changed under the store: the download breaks off and nothing is kept.
    stored = Path(shown.json()["location"]) / "model.safetensors"
    stored.write_bytes(b"x" * 300_000)
    broken = cli("adapters", "export", "x-acme", "bot", "1", "--download",
                 str(tmp_path / "again"))
    assert broken.code == UNREACHABLE, broken
    assert "broke off" in broken.err or "did not download intact" in broken.err, broken.err
    assert not (tmp_path / "again").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".again")] == []


def test_ctrl_c_while_an_export_is_followed_stops_and_downloads_nothing(
        live: LiveGateway, cli: Cli, peft_folder: Path, tmp_path: Path) -> None:
    tenant_with_key(live, "y-acme")
    assert cli("adapters", "push", "y-acme", "bot", str(peft_folder)).code == OK
    dest = tmp_path / "merged"
    proc = subprocess.Popen([str(LORAPLEX), "adapters", "export", "y-acme", "bot", "1",
                             "--download", str(dest), "--interval", "0.02", "--url", live.url,
                             "--admin-token", ADMIN_TOKEN],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # no worker runs it: the export job stays queued while it is followed
        wait_for(lambda: sum(live.served.count("GET", f"/admin/fine_tuning/jobs/{j}")
                             for j in _export_jobs(live, "y-acme")) >= 3, "following to start")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == INTERRUPTED, (out, err)
    assert "Stopped following" in err and "the job goes on" in err and "Traceback" not in err
    assert not dest.exists()
    export_ = api(live, "GET", "/admin/tenants/y-acme/adapters/bot/versions/1/export").json()
    assert export_["status"] == "queued"


def _export_jobs(live: LiveGateway, tenant: str) -> list[str]:
    job = live.call(live.services.jobs.latest_task(tenant, "export", "bot"))
    return [job.id] if job is not None else []
