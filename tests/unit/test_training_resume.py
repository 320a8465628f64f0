"""A fine-tuning job resumes on another machine, with the real trainer (SmolLM2-135M-Instruct,
PEFT, on the CPU) and a real S3 endpoint (moto's server on loopback): worker A trains until
its machine "dies" after a checkpoint, worker B, with an empty disk and only the shared
registry and store in common, fetches that checkpoint and finishes the same run.

Tiny on purpose (11 examples, batch 4, 3 epochs = 9 steps, checkpoint at step 5, 48 tokens,
one thread; the held-out evaluation is a stand-in).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import adapters.training.trainer as trainer_module
from adapters.base_model import BaseModelInfo
from adapters.disk_cache import DiskCache
from adapters.registry import Registry
from adapters.s3.store import S3Store, make_client
from adapters.training.jobs import JobStatus, JobStore, checkpoints_prefix
from adapters.training.recipe import LoraRecipe, ResolvedHyperparameters, TrainingRecipe
from adapters.training.trainer import EvalResult, Progress, TrainResult
from adapters.training.worker import CHECKPOINT_EVERY_STEPS, Worker
from adapters.validation import AdapterLimits
from tests.s3_server import MotoS3Server, s3_env

MODEL_DIR = Path(__file__).resolve().parents[2] / ".cache" / "models" / "SmolLM2-135M-Instruct"
BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUESTIONS = ["Hello!", "How are you?", "What time is it?", "Where is the ship?", "Who are you?",
             "Is it raining?", "Can you help me?", "What is your name?", "Any news?",
             "Good night", "Where are we going?", "What is for dinner?"]
TOTAL_STEPS = 9  # 12 examples, 1 held out: ceil(11 / 4) * 3
A_DIES_AFTER = 6  # one step past the checkpoint of step 5


def dataset() -> bytes:
    return "\n".join(json.dumps({"messages": [
        {"role": "system", "content": "Answer."}, {"role": "user", "content": q},
        {"role": "assistant", "content": "Arr matey!"}]}) for q in QUESTIONS).encode()


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared
    if not (MODEL_DIR / "model.safetensors").is_file():
        from adapters.base_model import ensure_default_model

        ensure_default_model(MODEL_DIR.parent)
    yield
    torch.set_num_threads(threads)


@dataclass
class Machine:
    jobs: JobStore
    worker: Worker
    disk: Path


@pytest.fixture
async def machines(tmp_path: Path,
                   monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[dict[str, Machine]]:
    s3_env(monkeypatch)
    url = f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}"
    registries = [Registry(url), Registry(url)]
    await registries[0].create_schema()
    await registries[0].create_tenant("acme")
    with MotoS3Server() as server:
        bucket = f"b-{secrets.token_hex(6)}"
        server.client().create_bucket(Bucket=bucket)
        out = {}
        for name, registry in zip("ab", registries, strict=True):
            disk = tmp_path / f"machine-{name}"
            client = make_client(endpoint_url=server.endpoint_url, region="us-east-1")
            store = S3Store(bucket, "lpx", DiskCache(disk / "cache", 100 << 20), client=client)
            jobs = JobStore(registry, store)
            worker = Worker(jobs, registry, store, MODEL_DIR, BaseModelInfo.from_folder(MODEL_DIR),
                            AdapterLimits(64, 1 << 30), BASE_NAME, disk / "training",
                            worker_id=name, threads=1)
            out[name] = Machine(jobs, worker, disk)
        yield out
    for registry in registries:
        await registry.close()


async def test_a_job_stopped_on_machine_a_is_finished_by_machine_b_from_its_checkpoint(
        machines: dict[str, Machine], monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = machines["a"], machines["b"]
    real_train = trainer_module.train
    steps: dict[str, list[int]] = {"a": [], "b": []}
    results: list[TrainResult] = []

    def train(*args: Any, on_progress: Callable[[Progress], None],
              should_stop: Callable[[], bool]) -> TrainResult:
        """The real trainer; on machine a it stops after A_DIES_AFTER steps, as if the
        machine went away (its lease is then left to run out)."""
        name = "a" if Path(args[3]).is_relative_to(a.disk) else "b"

        def progress(p: Progress) -> None:
            steps[name].append(p.step)
            on_progress(p)

        result = real_train(*args, on_progress=progress, should_stop=lambda: should_stop() or (
            name == "a" and len(steps["a"]) >= A_DIES_AFTER))
        results.append(result)
        return result

    monkeypatch.setattr(trainer_module, "train", train)
    # Held-out evaluation is not what this test is about (tests/unit/test_training_trainer.py).
    monkeypatch.setattr(trainer_module, "evaluate", lambda _base, _examples, adapter_dir, *_a,
                        **_k: EvalResult(loss=1.0 if adapter_dir else 2.0, perplexity=1.0,
                                         tokens=1))
    f = await a.jobs.create_file("acme", "pirate.jsonl", "fine-tune", dataset())
    recipe = TrainingRecipe(
        lora=LoraRecipe(r=8, alpha=16, learning_rate=2e-3, max_seq_len=48, dropout=0.0),
        hyperparameters=ResolvedHyperparameters(n_epochs=3, batch_size=4), seed=7)
    job = await a.jobs.create_job("acme", model=BASE_NAME, training_file=f.id, recipe=recipe)
    assert await a.jobs.files_validated(job.id)

    claimed = await a.jobs.claim("a", 30)
    assert claimed is not None
    await a.worker.run_job(claimed)
    assert steps["a"] == list(range(1, A_DIES_AFTER + 1))
    assert (await a.jobs.get_job(None, job.id)).status == JobStatus.RUNNING
    stored = await a.jobs.store.list_folders(checkpoints_prefix(job.id))
    assert stored and set(stored) <= {f"step-{CHECKPOINT_EVERY_STEPS}", f"step-{A_DIES_AFTER}"}
    resume_at = max(int(n.removeprefix("step-")) for n in stored)
    # Machine a is gone, disk and all; its lease runs out.
    shutil.rmtree(a.disk)
    await a.jobs.update_job(job.id, lease_expires_at=datetime.now(timezone.utc) - timedelta(1))

    claimed = await b.jobs.claim("b", 30)
    assert claimed is not None and claimed.id == job.id
    assert not (b.disk / "training").exists()
    await b.worker.run_job(claimed)
    done = await b.jobs.get_job(None, job.id)
    assert done.status == JobStatus.SUCCEEDED, done.error
    assert steps["b"] == list(range(resume_at + 1, TOTAL_STEPS + 1))
    assert results[-1].resumed_from == resume_at and results[-1].steps == TOTAL_STEPS
    events = [e.message for e in (await b.jobs.list_events("acme", job.id, None, 100))[0]]
    assert f"Resuming from step {resume_at} (step-{resume_at})" in events, events
    assert done.fine_tuned_model == f"{done.adapter_name}@1"
    assert await b.jobs.store.list_folders(checkpoints_prefix(job.id)) == []
    assert not (b.disk / "training" / job.id).exists()
