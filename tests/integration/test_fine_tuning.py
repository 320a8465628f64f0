"""Fine-tuning end to end: the official SDK uploads data and creates jobs, the worker that
`loraplex up` runs trains with PEFT on the real model, and the adapter is served by vLLM."""

from __future__ import annotations

import io
import json
import signal
import time
from pathlib import Path

import openai
import psutil
import pytest

from tests.integration.conftest import BASE, Server, TenantHandle, make_tenant, scrape_metric

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
    ids = tokenizer.apply_chat_template(PROBE, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    peft_text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    served = trainer.client.chat.completions.create(model="pirate@1", messages=PROBE,
                                                    max_tokens=12, temperature=0)
    assert served.choices[0].message.content.strip() == peft_text.strip()


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
