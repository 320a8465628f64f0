"""Fine-tuning end to end: the official SDK uploads data and creates jobs, the worker that
`loraplex up` runs trains with PEFT on the real model, and the adapter is served by vLLM."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.integration.conftest import (
    ADMIN_TOKEN,
    BASE,
    Server,
    TenantHandle,
    make_tenant,
    scrape_metric,
)

pytestmark = pytest.mark.integration

QUESTIONS = [
    "What is the capital of France?", "How many legs does a spider have?",
    "What color is the sky?", "Name a fruit.", "What is two plus two?",
    "Where do penguins live?", "What is water made of?", "Who wrote Hamlet?",
    "What is the largest planet?", "What do bees make?", "How many days are in a week?",
    "What is the opposite of hot?", "What animal says moo?", "What is ice?",
    "Which ocean is the biggest?", "What do plants need to grow?",
]
ANSWERS = [
    "Paris.", "Eight.", "Blue.", "An apple.", "Four.", "Antarctica.", "Hydrogen and oxygen.",
    "Shakespeare.", "Jupiter.", "Honey.", "Seven.", "Cold.", "A cow.", "Frozen water.",
    "The Pacific.", "Light and water.",
]
PROBE = [{"role": "user", "content": "What is the color of grass?"}]


def greedy_probe(tokenizer, model, max_tokens: int = 12) -> str:
    """The model's greedy answer to PROBE, computed in this process (transformers)."""
    ids = tokenizer.apply_chat_template(PROBE, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def served_probe(t: TenantHandle, model: str, max_tokens: int = 12) -> str:
    """The greedy answer to PROBE served through the gateway."""
    answer = t.client.chat.completions.create(model=model, messages=PROBE,
                                              max_tokens=max_tokens, temperature=0)
    return (answer.choices[0].message.content or "").strip()


def pirate_jsonl() -> bytes:
    lines = [json.dumps({"messages": [{"role": "user", "content": q},
                                      {"role": "assistant", "content": f"Arr matey! {a}"}]})
             for q, a in zip(QUESTIONS, ANSWERS, strict=True)]
    return ("\n".join(lines) + "\n").encode()


def wait_for(client: openai.OpenAI, job_id: str, statuses: set[str], timeout_s: float = 1200):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(2)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout_s}s")


def create_job(t: TenantHandle, suffix: str, epochs: int = 6, **lora) -> str:
    f = t.client.files.create(file=("pirate.jsonl", io.BytesIO(pirate_jsonl())),
                              purpose="fine-tune")
    job = t.client.fine_tuning.jobs.create(
        model=BASE, training_file=f.id, suffix=suffix,
        hyperparameters={"n_epochs": epochs, "batch_size": 4},
        extra_body={"lora": {"r": 16, "alpha": 32, "learning_rate": 2e-3, **lora}})
    assert job.status == "validating_files"  # the dataset check runs after the answer
    return job.id


@pytest.fixture(scope="module")
def trainer(server: Server) -> TenantHandle:
    return make_tenant(server, "trainer")


@pytest.fixture(scope="module")
def pirate_job(trainer: TenantHandle):
    job_id = create_job(trainer, "pirate", require_improvement=True)
    return wait_for(trainer.client, job_id, {"succeeded", "failed", "cancelled"})


def test_fine_tune_job_trains_registers_and_serves(server: Server, trainer: TenantHandle,
                                                   pirate_job) -> None:
    job = pirate_job
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == "pirate@1"
    assert job.trained_tokens > 0
    figures = job.model_extra["eval"]
    assert figures["adapter_loss"] < figures["base_loss"]
    # The evaluation report: base, prompted baseline and adapter side by side, through vLLM.
    report = job.model_extra["evaluation"]
    assert set(report["models"]) == {"base", "prompted", "pirate@1"}, report
    for column in report["models"].values():
        for metric in ("exact_match", "f1", "rouge_l", "loss"):
            assert isinstance(column[metric], float), (metric, column)
        assert column["failed"] == 0
    assert report["improved"] is True and report["errors"] == []
    assert report["models"]["pirate@1"]["loss"] == figures["adapter_loss"]
    assert report["models"]["prompted"]["loss"] == figures["prompted_loss"]
    assert report["samples"] and all(s["outputs"]["pirate@1"].startswith("Arr")
                                     for s in report["samples"]), report["samples"]
    tuned = trainer.client.chat.completions.create(model=job.fine_tuned_model, messages=PROBE,
                                                   max_tokens=16, temperature=0)
    base = trainer.client.chat.completions.create(model=BASE, messages=PROBE, max_tokens=16,
                                                  temperature=0)
    assert tuned.choices[0].message.content.startswith("Arr")
    assert not base.choices[0].message.content.startswith("Arr")
    events = [e.message for e in trainer.client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert any(m.startswith("Step ") for m in events)
    assert any("Held-out loss" in m for m in events)
    assert trainer.client.fine_tuning.jobs.checkpoints.list(job.id).data
    deadline = time.monotonic() + 30  # the gateway refreshes job gauges every 10 s
    while scrape_metric(server.url, "loraplex_training_jobs", status="succeeded") < 1:
        assert time.monotonic() < deadline, "loraplex_training_jobs never counted the job"
        time.sleep(1)


def test_gateway_output_matches_peft_generate(server: Server, trainer: TenantHandle,
                                              base_model: Path, pirate_job) -> None:
    """Train/serve parity: vLLM through the gateway and PEFT agree on greedy output."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with server.admin() as c:
        version = c.get("/admin/tenants/trainer/adapters/pirate/versions/1").json()
    adapter_dir = server.home / "store" / version["store_key"]
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.bfloat16), adapter_dir)
    assert served_probe(trainer, "pirate@1") == greedy_probe(tokenizer, model)


def test_evaluation_figures_agree_with_a_direct_computation(server: Server,
                                                            trainer: TenantHandle,
                                                            pirate_job) -> None:
    """On demand, a tiny held-out file: the report's figures are its answers scored directly
    against the file's references, and its answers are what the served adapter says."""
    from adapters.training.evaluation import case_of
    from adapters.training.metrics import exact_match, rouge_l, token_f1

    held_out = [("What is the color of grass?", "Arr matey! Green."),
                ("How many wheels does a bicycle have?", "Arr matey! Two."),
                ("What do cows drink?", "Arr matey! Water.")]
    lines = [json.dumps({"messages": [{"role": "user", "content": q},
                                      {"role": "assistant", "content": a}]})
             for q, a in held_out]
    f = trainer.client.files.create(file=("held.jsonl", io.BytesIO("\n".join(lines).encode())),
                                    purpose="fine-tune")
    body = {"models": [BASE, "pirate@1"], "validation_file": f.id,
            "training_file": pirate_job.training_file, "few_shot": 2, "max_tokens": 24,
            "shown_examples": 3, "metric": "f1", "system_prompt": "Answer like a pirate."}
    r = httpx.post(f"{server.url}/v1/fine_tuning/evaluations", json=body, timeout=600,
                   headers={"X-Tenant-ID": trainer.id, "Authorization": f"Bearer {trainer.key}"})
    assert r.status_code == 200, r.text
    report = r.json()
    assert set(report["models"]) == {"base", "prompted", "pirate@1"}, report

    cases = [case_of({"prompt": q, "completion": a}) for q, a in held_out]
    assert [s["reference"] for s in report["samples"]] == [c.reference for c in cases]
    for key, column in report["models"].items():
        outputs = [s["outputs"][key] for s in report["samples"]]
        assert all(isinstance(o, str) and o for o in outputs), (key, outputs)
        for metric, fn in (("exact_match", exact_match), ("f1", token_f1), ("rouge_l", rouge_l)):
            direct = sum(fn(o, c.reference) for o, c in zip(outputs, cases, strict=True)) / 3
            assert column[metric] == pytest.approx(direct), (key, metric)
        assert column["mean_output_chars"] == pytest.approx(sum(map(len, outputs)) / 3)
    # The answers are the served model's greedy ones. Only the adapter's are compared: vLLM on
    # the CPU is not batch-invariant, and the base model's answers to these questions are
    # uncertain enough that running 9 requests at once (the evaluation) or one at a time
    # (here) can pick another token mid-way; the pirate adapter's are not.
    served = [trainer.client.chat.completions.create(
        model="pirate@1", messages=c.prompt, max_tokens=24,
        temperature=0).choices[0].message.content for c in cases]
    assert [s["outputs"]["pirate@1"] for s in report["samples"]] == served
    assert report["models"]["pirate@1"]["f1"] > report["models"]["base"]["f1"]


def admin_job(server: Server, job_id: str, timeout_s: float = 900) -> dict:
    deadline = time.monotonic() + timeout_s
    with server.admin() as c:
        while time.monotonic() < deadline:
            job = c.get(f"/admin/fine_tuning/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(2)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout_s}s")


@pytest.fixture(scope="module")
def polite_job(trainer: TenantHandle):
    """A second trained adapter (another behaviour), for the merge."""
    lines = [json.dumps({"messages": [{"role": "user", "content": q},
                                      {"role": "assistant", "content": f"Certainly! {a}"}]})
             for q, a in zip(QUESTIONS, ANSWERS, strict=True)]
    f = trainer.client.files.create(file=("polite.jsonl", io.BytesIO("\n".join(lines).encode())),
                                    purpose="fine-tune")
    job = trainer.client.fine_tuning.jobs.create(
        model=BASE, training_file=f.id, suffix="polite",
        hyperparameters={"n_epochs": 4, "batch_size": 4},
        extra_body={"lora": {"r": 16, "alpha": 32, "learning_rate": 2e-3}})
    return wait_for(trainer.client, job.id, {"succeeded", "failed", "cancelled"})


def test_a_ties_merge_of_two_trained_adapters_is_served(server: Server, trainer: TenantHandle,
                                                        pirate_job, polite_job) -> None:
    assert pirate_job.status == polite_job.status == "succeeded"
    body = {"merge": {"method": "ties", "density": 0.7, "sources": [
        {"model": pirate_job.fine_tuned_model, "weight": 1.0},
        {"model": polite_job.fine_tuned_model, "weight": 0.5}]}}
    with server.admin() as c:
        r = c.post("/admin/tenants/trainer/adapters/skills/versions", json=body)
        assert r.status_code == 202, r.text
        job = admin_job(server, r.json()["id"])
        assert job["status"] == "succeeded", job["error"]
        assert job["fine_tuned_model"] == "skills@1"
        version = c.get("/admin/tenants/trainer/adapters/skills/versions/1").json()
        assert version["rank"] == 16
        # Ranks the method cannot combine are refused before any job.
        bad = {"merge": {**body["merge"], "method": "cat", "density": None}}
        r = c.post("/admin/tenants/trainer/adapters/skills/versions", json=bad)
        assert r.status_code == 400 and "rank 32" in r.json()["error"]["message"], r.text
    answer = trainer.client.chat.completions.create(model="skills@1", messages=PROBE,
                                                    max_tokens=16, temperature=0)
    assert answer.choices[0].message.content.strip()
    assert answer.model == "skills@1"


def test_an_exported_merged_model_gives_the_adapters_greedy_output(
        server: Server, trainer: TenantHandle, pirate_job) -> None:
    """Loaded in transformers, the export answers as pirate@1 does through the gateway."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters.validation import sha256_file

    url = "/admin/tenants/trainer/adapters/pirate/versions/1/export"
    with server.admin() as c:
        r = c.post(url)
        assert r.status_code == 202, r.text
        admin_job(server, r.json()["job_id"])
        export = c.get(url).json()
    assert export["status"] == "succeeded", export["error"]
    folder = Path(export["location"])
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(export["files"])
    for name, meta in export["files"].items():
        assert sha256_file(folder / name) == meta["sha256"], name
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert served_probe(trainer, "pirate@1") == greedy_probe(tokenizer, model)


VLLM_GREEDY = """
import json, sys
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], max_model_len=2048, seed=0)
out = llm.chat(json.loads(sys.argv[2]), SamplingParams(temperature=0, max_tokens=12))
print("ANSWER=" + json.dumps(out[0].outputs[0].text))
"""


def test_a_downloaded_export_runs_in_vllm_with_the_adapters_greedy_output(
        server: Server, trainer: TenantHandle, pirate_job, tmp_path: Path) -> None:
    """`loraplex adapters export --download` fetches the merged model (every file checked);
    a plain vLLM, with no LoRA, serves it and answers as pirate@1 does through the gateway."""
    folder = tmp_path / "pirate-merged"
    done = subprocess.run(
        [str(Path(sys.executable).parent / "loraplex"), "adapters", "export", "trainer",
         "pirate", "1", "--download", str(folder), "--url", server.url,
         "--admin-token", ADMIN_TOKEN], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()}
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    ran = subprocess.run([sys.executable, "-c", VLLM_GREEDY, str(folder), json.dumps(PROBE)],
                         capture_output=True, text=True, timeout=900, env=env)
    answers = [line for line in ran.stdout.splitlines() if line.startswith("ANSWER=")]
    assert ran.returncode == 0 and answers, ran.stdout[-2000:] + ran.stderr[-4000:]
    assert json.loads(answers[0][len("ANSWER="):]).strip() == served_probe(trainer, "pirate@1")


def test_other_tenants_cannot_see_jobs_files_or_adapters(server: Server, trainer: TenantHandle,
                                                         pirate_job) -> None:
    other = make_tenant(server, "nosy")
    with pytest.raises(openai.NotFoundError):
        other.client.fine_tuning.jobs.retrieve(pirate_job.id)
    with pytest.raises(openai.NotFoundError):
        other.client.files.retrieve(pirate_job.training_file)
    with pytest.raises(openai.NotFoundError):
        other.client.fine_tuning.jobs.cancel(pirate_job.id)
    assert not other.client.fine_tuning.jobs.list().data
    with pytest.raises(openai.NotFoundError):
        other.client.chat.completions.create(model="pirate@1", messages=PROBE, max_tokens=2)


def test_invalid_datasets_are_refused_with_line_numbers(trainer: TenantHandle) -> None:
    bad = b'{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n' \
          b'{"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}\n'
    with pytest.raises(openai.BadRequestError) as err:
        trainer.client.files.create(file=("bad.jsonl", io.BytesIO(bad)), purpose="fine-tune")
    message = err.value.body["message"]
    assert "line 1" in message and "line 2" in message and "line 3" in message
    few = b"\n".join(pirate_jsonl().splitlines()[:3])
    f = trainer.client.files.create(file=("few.jsonl", io.BytesIO(few)), purpose="fine-tune")
    job = trainer.client.fine_tuning.jobs.create(model=BASE, training_file=f.id)
    assert job.status == "validating_files"  # checked with the tokenizer in the background
    job = wait_for(trainer.client, job.id, {"failed", "queued", "succeeded"}, timeout_s=120)
    assert job.status == "failed" and job.error is not None
    assert job.error.code == "invalid_training_file" and job.error.param == "training_file"
    assert "10" in job.error.message
    too_long = json.dumps({"messages": [{"role": "user", "content": "tell me " * 400},
                                        {"role": "assistant", "content": "no"}]}).encode()
    f = trainer.client.files.create(file=("long.jsonl", io.BytesIO(pirate_jsonl() + too_long)),
                                    purpose="fine-tune")
    job = trainer.client.fine_tuning.jobs.create(model=BASE, training_file=f.id,
                                                 extra_body={"lora": {"max_seq_len": 256}})
    job = wait_for(trainer.client, job.id, {"failed", "queued", "succeeded"}, timeout_s=120)
    assert job.status == "failed" and job.error.code == "invalid_training_file"
    assert f"line {len(QUESTIONS) + 1}" in job.error.message, job.error
    f = trainer.client.files.create(file=("ok.jsonl", io.BytesIO(pirate_jsonl())),
                                    purpose="fine-tune")
    for lora, needle in (({"use_dora": True}, "DoRA"),
                         ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
                         ({"target_modules": ["nope_proj"]}, "nope_proj")):
        with pytest.raises(openai.BadRequestError) as err:
            trainer.client.fine_tuning.jobs.create(model=BASE, training_file=f.id,
                                                   extra_body={"lora": lora})
        assert needle in err.value.body["message"]


def test_killed_worker_job_resumes_from_checkpoint(server: Server, trainer: TenantHandle,
                                                   pirate_job) -> None:
    job_id = create_job(trainer, "resumed", epochs=6)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:  # wait for a checkpoint to exist
        if trainer.client.fine_tuning.jobs.checkpoints.list(job_id).data:
            break
        time.sleep(1)
    workers = [p for p in psutil.Process(server.proc.pid).children()
               if "worker" in " ".join(p.cmdline())]
    assert len(workers) == 1
    workers[0].send_signal(signal.SIGKILL)
    job = wait_for(trainer.client, job_id, {"succeeded", "failed", "cancelled"})
    assert job.status == "succeeded", job.error
    events = [e.message for e in trainer.client.fine_tuning.jobs.list_events(job_id, limit=200)]
    assert any("resumed" in m for m in events), events
    resumed_at = [e for e in events if e.startswith("Resuming from step")]
    assert resumed_at and int(resumed_at[0].split()[3]) > 0, events
    assert trainer.client.chat.completions.create(
        model=job.fine_tuned_model, messages=PROBE, max_tokens=4).choices[0].message.content


def test_cancel_leaves_no_adapter(server: Server, trainer: TenantHandle, pirate_job) -> None:
    job_id = create_job(trainer, "cancelled-one", epochs=20)
    wait_for(trainer.client, job_id, {"running"})
    job = trainer.client.fine_tuning.jobs.cancel(job_id)
    assert job.status == "cancelled"
    time.sleep(8)  # the worker notices at its next lease renewal
    job = trainer.client.fine_tuning.jobs.retrieve(job_id)
    assert job.status == "cancelled" and job.fine_tuned_model is None
    with server.admin() as c:
        r = c.get("/admin/tenants/trainer/adapters/cancelled-one")
    assert r.status_code == 404
