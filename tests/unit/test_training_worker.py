"""The training worker around the trainer: the recipe it trains with, the errors it shows,
and its checkpoints in the store (a job resumes on another machine).

The trainer's `train` is replaced by a stand-in (it records its config and fails as a test
asks, or follows the real trainer's checkpoint protocol), so no model is loaded (torch is
imported, as the worker does). tests/unit/test_training_resume.py does it with the real one.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import torch

import adapters.training.trainer as trainer_module
from adapters.base_model import BaseModelInfo
from adapters.disk_cache import DiskCache
from adapters.errors import AdapterInvalid, Unavailable
from adapters.registry import Registry
from adapters.s3.store import S3Store
from adapters.store import AdapterStore, LocalStore
from adapters.training.jobs import JobStatus, JobStore, checkpoints_prefix
from adapters.training.recipe import (
    BASE_LEARNING_RATE,
    LoraRecipe,
    ResolvedHyperparameters,
    TrainingRecipe,
)
from adapters.training.trainer import (
    EvalResult,
    Progress,
    TrainConfig,
    TrainingStopped,
    TrainResult,
)
from adapters.training.worker import Worker
from adapters.validation import AdapterLimits
from tests.s3_server import MotoS3Server, s3_env
from tests.unit.conftest import BASE_MODEL, write_adapter


def dataset(n: int = 12) -> bytes:
    return "\n".join(json.dumps({"messages": [
        {"role": "user", "content": f"question {i}"},
        {"role": "assistant", "content": f"answer {i}"}]}) for i in range(n)).encode()


@dataclass
class Rig:
    jobs: JobStore
    worker: Worker
    file_id: str
    configs: list[TrainConfig] = field(default_factory=list)
    fail_with: BaseException = field(default_factory=lambda: RuntimeError("stopped by the test"))

    async def run(self, recipe: TrainingRecipe) -> dict[str, Any]:
        """Create, validate, claim and run a job; its error object."""
        job = await self.jobs.create_job("acme", model=BASE_MODEL, training_file=self.file_id,
                                         recipe=recipe)
        assert await self.jobs.files_validated(job.id)
        claimed = await self.jobs.claim(self.worker.worker_id, 30)
        assert claimed is not None and claimed.id == job.id
        await self.worker.run_job(claimed)
        done = await self.jobs.get_job("acme", job.id)
        assert done.status == JobStatus.FAILED and done.error is not None
        return done.error


@pytest.fixture
async def rig(tmp_path: Path, base_model_dir: Path,
              monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    registry = Registry(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}")
    await registry.create_schema()
    await registry.create_tenant("acme")
    jobs = JobStore(registry, LocalStore(tmp_path / "store"))
    f = await jobs.create_file("acme", "t.jsonl", "fine-tune", dataset())
    worker = Worker(jobs, registry, LocalStore(tmp_path / "store"), base_model_dir,
                    BaseModelInfo.from_folder(base_model_dir), AdapterLimits(16, 10**9),
                    BASE_MODEL, tmp_path / "work", worker_id="w1",
                    threads=torch.get_num_threads())
    rig = Rig(jobs, worker, f.id)

    def fake_train(_base: Path, _examples: list[dict[str, Any]], config: TrainConfig,
                   _work_dir: Path, **_callbacks: Callable[..., Any]) -> Any:
        rig.configs.append(config)
        raise rig.fail_with

    monkeypatch.setattr(trainer_module, "train", fake_train)
    yield rig
    await registry.close()


def recipe(learning_rate: float | None = None, multiplier: float = 1.0) -> TrainingRecipe:
    return TrainingRecipe(
        lora=LoraRecipe(r=8, alpha=16, learning_rate=learning_rate),
        hyperparameters=ResolvedHyperparameters(n_epochs=2, batch_size=2,
                                                learning_rate_multiplier=multiplier),
        seed=7)


async def test_the_multiplier_scales_the_chosen_learning_rate(rig: Rig) -> None:
    await rig.run(recipe(multiplier=0.5))
    await rig.run(recipe(learning_rate=1e-3, multiplier=0.5))
    await rig.run(recipe(learning_rate=1e-3))
    rates = [c.learning_rate for c in rig.configs]
    assert rates == pytest.approx([BASE_LEARNING_RATE * 0.5, 1e-3 * 0.5, 1e-3])


async def test_the_worker_trains_the_recipe_of_the_job(rig: Rig) -> None:
    await rig.run(recipe(learning_rate=1e-3, multiplier=2))
    config = rig.configs[0]
    assert (config.r, config.alpha, config.epochs, config.batch_size, config.seed) == \
        (8, 16, 2, 2, 7)
    assert config.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert config.base_model_name == BASE_MODEL


@pytest.mark.parametrize(("exc", "code", "message"), [
    (RuntimeError("shapes do not match"), "training_error", "shapes do not match"),
    (KeyError("input_ids"), "training_error", "'input_ids'"),
    (ValueError(), "training_error", "training failed"),
    (MemoryError(), "out_of_memory", "out of memory"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), "out_of_memory",
     "Tried to allocate 2 GiB"),
    (AdapterInvalid(["rank 32 is over 16"]), "invalid_adapter", "rank 32 is over 16"),
])
async def test_failed_jobs_show_stable_codes_not_class_names(
        rig: Rig, exc: BaseException, code: str, message: str) -> None:
    rig.fail_with = exc
    error = await rig.run(recipe())
    assert error["code"] == code and error["param"] is None, error
    assert message in error["message"], error
    assert type(exc).__name__ not in error["message"], error
    assert "Traceback" not in error["message"]


# -- checkpoints in the store: a job resumes on another machine ---------------------------------
#
# The trainer is a stand-in that follows the real one's checkpoint protocol (report a step,
# then write `checkpoints/step-N/` under a temporary name and rename it, keep the newest
# KEEP_CHECKPOINTS, resume from the latest one in its work folder), so only the worker's part
# is under test: uploading, fetching on another machine, deleting at the end.


@dataclass
class Machine:
    """One worker with its own disk (work folder) and its own Registry and store objects."""

    jobs: JobStore
    worker: Worker
    work_root: Path
    steps: list[int] = field(default_factory=list)  # steps its trainer ran
    resumed_from: list[int] = field(default_factory=list)


@dataclass
class Cluster:
    machines: list[Machine]
    file_id: str
    stop_after: dict[str, int] = field(default_factory=dict)  # worker id -> "dies" after step
    total_steps: int = 12
    step_s: float = 0.01  # how long a step takes: the worker's loop runs meanwhile

    def machine(self, worker_id: str) -> Machine:
        return next(m for m in self.machines if m.worker.worker_id == worker_id)

    async def new_job(self) -> str:
        jobs = self.machines[0].jobs
        job = await jobs.create_job("acme", model=BASE_MODEL, training_file=self.file_id,
                                    recipe=recipe())
        assert await jobs.files_validated(job.id)
        return job.id

    async def run_on(self, worker_id: str, job_id: str) -> None:
        machine = self.machine(worker_id)
        claimed = await machine.jobs.claim(worker_id, 30)
        assert claimed is not None and claimed.id == job_id
        await machine.worker.run_job(claimed)

    async def stored(self, job_id: str) -> list[str]:
        return await self.machines[0].jobs.store.list_folders(checkpoints_prefix(job_id))


def _save_checkpoint(work_dir: Path, step: int) -> Path:
    root = work_dir / "checkpoints"
    staging = root / f".step-{step}.partial"
    staging.mkdir(parents=True, exist_ok=True)
    (staging / trainer_module.STATE_FILE).write_text(json.dumps({"step": step}))
    (staging / trainer_module.ADAPTER_FILES[1]).write_bytes(b"w" * 1000 + bytes([step]))
    final = root / f"step-{step}"
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    for old in trainer_module.checkpoints(work_dir)[:-trainer_module.KEEP_CHECKPOINTS]:
        shutil.rmtree(old)
    return final


@pytest.fixture(scope="module")
def s3() -> Iterator[MotoS3Server]:
    with MotoS3Server() as server:
        yield server


@pytest.fixture(params=["local", "s3"])
async def cluster(request: pytest.FixtureRequest, tmp_path: Path, base_model_dir: Path,
                  monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    """Two machines, "a" and "b": one registry database and one store, each its own disk."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}"
    registries = [Registry(url), Registry(url)]
    await registries[0].create_schema()
    await registries[0].create_tenant("acme")
    if request.param == "s3":
        s3_env(monkeypatch)
        server: MotoS3Server = request.getfixturevalue("s3")
        bucket = server.new_bucket()
        client = server.store_client()

    machines = []
    for name, registry in zip("ab", registries, strict=True):
        disk = tmp_path / f"machine-{name}"
        store: AdapterStore = (
            LocalStore(tmp_path / "shared-store") if request.param == "local" else
            S3Store(bucket, "lpx", DiskCache(disk / "cache", 10 << 20), client=client))
        jobs = JobStore(registry, store)
        worker = Worker(jobs, registry, store, base_model_dir,
                        BaseModelInfo.from_folder(base_model_dir), AdapterLimits(16, 10**9),
                        BASE_MODEL, disk / "training", worker_id=name,
                        threads=torch.get_num_threads())
        machines.append(Machine(jobs, worker, disk / "training"))
    f = await machines[0].jobs.create_file("acme", "t.jsonl", "fine-tune", dataset())
    rig = Cluster(machines, f.id)

    def fake_train(_base: Path, _examples: list[dict[str, Any]], config: TrainConfig,
                   work_dir: Path, *, on_progress: Callable[[Progress], None],
                   should_stop: Callable[[], bool]) -> TrainResult:
        machine = next(m for m in machines if work_dir.parent == m.work_root)
        latest = trainer_module.latest_checkpoint(work_dir)
        start = int(latest.name.removeprefix("step-")) if latest else 0
        machine.resumed_from.append(start)
        total, dies_after = rig.total_steps, rig.stop_after.get(machine.worker.worker_id)
        for step in range(start + 1, total + 1):
            time.sleep(rig.step_s)
            machine.steps.append(step)
            on_progress(Progress(step=step, total_steps=total, epoch=1, loss=1.0,
                                 tokens_per_s=1.0))
            if step == total:
                break
            if step % config.checkpoint_every_steps == 0:
                _save_checkpoint(work_dir, step)
            if should_stop() or step == dies_after:
                raise TrainingStopped(step, _save_checkpoint(work_dir, step))
        adapter = write_adapter(work_dir / "adapter")
        return TrainResult(adapter_dir=adapter, steps=total, train_loss=0.5,
                           trained_tokens=10 * total, tokens_per_s=1.0, seconds=1.0,
                           resumed_from=start)

    def fake_evaluate(_base: Path, _examples: list[dict[str, Any]], adapter_dir: Path | None,
                      _max_seq_len: int = 512, **_: Any) -> EvalResult:
        return EvalResult(loss=1.0 if adapter_dir else 2.0, perplexity=1.0, tokens=10)

    monkeypatch.setattr(trainer_module, "train", fake_train)
    monkeypatch.setattr(trainer_module, "evaluate", fake_evaluate)
    yield rig
    for registry in registries:
        await registry.close()


async def _expire_lease(jobs: JobStore, job_id: str) -> None:
    """Machine a is gone: its lease runs out (and nothing on its disk can be read)."""
    await jobs.update_job(job_id, lease_expires_at=datetime.now(timezone.utc) - timedelta(1))


async def test_a_job_checkpointed_on_one_machine_resumes_on_another(cluster: Cluster) -> None:
    a, b = cluster.machine("a"), cluster.machine("b")
    job_id = await cluster.new_job()
    cluster.stop_after["a"] = 7  # a checkpoint at step 5; the machine dies after step 7
    await cluster.run_on("a", job_id)
    assert a.steps == [1, 2, 3, 4, 5, 6, 7]
    job = await a.jobs.get_job(None, job_id)
    assert job.status == JobStatus.RUNNING  # a's lease will run out; the job is not lost
    stored = await cluster.stored(job_id)
    # step-5 is uploaded while a trains, step-7 (written as it stopped) if a's loop catches
    # it before the end (a machine that dies has no last word; a slow upload skips to the
    # newest): either way the store has a checkpoint to resume from.
    assert stored and set(stored) <= {"step-5", "step-7"}, stored
    resume_at = max(int(n.removeprefix("step-")) for n in stored)
    shutil.rmtree(a.work_root)

    await _expire_lease(a.jobs, job_id)
    await cluster.run_on("b", job_id)
    assert b.resumed_from == [resume_at]
    assert b.steps == list(range(resume_at + 1, cluster.total_steps + 1))
    job = await b.jobs.get_job(None, job_id)
    assert job.status == JobStatus.SUCCEEDED, job.error
    events = [e.message for e in (await b.jobs.list_events("acme", job_id, None, 100))[0]]
    assert f"Resuming from step {resume_at} (step-{resume_at})" in events, events
    assert job.fine_tuned_model == f"{job.adapter_name}@1"
    # The job ended: its checkpoints are gone from the store and from b's disk.
    assert await cluster.stored(job_id) == []
    assert not (b.work_root / job_id).exists()


async def test_the_store_keeps_the_newest_checkpoints_and_a_newer_local_one_wins(
        cluster: Cluster) -> None:
    a = cluster.machine("a")
    cluster.total_steps = 40
    job_id = await cluster.new_job()
    cluster.stop_after["a"] = 22  # checkpoints at 5, 10, 15, 20 (and 22, as it stops)
    await cluster.run_on("a", job_id)
    # The newest (step-20 was written before the last step, step-22 as it stopped: a machine
    # that dies may not have uploaded it), and one older at most: the store keeps what the
    # work folder keeps. An upload that takes long skips to the newest checkpoint.
    assert len(stored := await cluster.stored(job_id)) <= trainer_module.KEEP_CHECKPOINTS
    assert stored[-1] in ("step-20", "step-22"), stored
    # The same machine takes the job again: its own disk holds step-22, newer than the store
    # (or as new), and it resumes from there.
    await _expire_lease(a.jobs, job_id)
    cluster.stop_after["a"] = 26
    await cluster.run_on("a", job_id)
    assert a.resumed_from == [0, 22]
    assert a.steps[22:] == [23, 24, 25, 26]
    stored = await cluster.stored(job_id)
    assert len(stored) <= trainer_module.KEEP_CHECKPOINTS and stored[-1] in ("step-25", "step-26")


async def test_a_cancelled_job_leaves_no_checkpoints(cluster: Cluster) -> None:
    a, b = cluster.machine("a"), cluster.machine("b")
    job_id = await cluster.new_job()
    cluster.stop_after["a"] = 7
    await cluster.run_on("a", job_id)
    assert await cluster.stored(job_id)
    await _expire_lease(a.jobs, job_id)
    cancelled_at_step = 9
    cluster.total_steps, cluster.step_s = 40, 0.05

    async def cancel_midway() -> None:
        while len(b.steps) < 1 or b.steps[-1] < cancelled_at_step:
            await asyncio.sleep(0.005)
        await b.jobs.cancel_job("acme", job_id)

    b.worker.lease_s = 0.3  # the worker learns of the cancel at its next lease renewal
    canceller = asyncio.create_task(cancel_midway())
    await cluster.run_on("b", job_id)
    await canceller
    job = await b.jobs.get_job(None, job_id)
    assert job.status == JobStatus.CANCELLED and job.fine_tuned_model is None
    assert b.steps[-1] < cluster.total_steps
    assert await cluster.stored(job_id) == []
    assert not (b.work_root / job_id).exists()


async def test_a_store_that_fails_does_not_fail_the_job(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Uploads that fail are retried at the next checkpoint; a fetch that fails means
    training from what the machine's own disk has (a fresh start at worst)."""
    a, b = cluster.machine("a"), cluster.machine("b")
    job_id = await cluster.new_job()
    cluster.stop_after["a"] = 7
    await cluster.run_on("a", job_id)
    await _expire_lease(a.jobs, job_id)

    async def down(*_args: Any, **_kwargs: Any) -> Any:
        raise Unavailable("store down", code="store_unavailable")

    monkeypatch.setattr(b.jobs.store, "list_folders", down)
    monkeypatch.setattr(b.jobs.store, "put_folder", down)
    await cluster.run_on("b", job_id)
    assert b.resumed_from == [0]
    job = await b.jobs.get_job(None, job_id)
    assert job.status == JobStatus.SUCCEEDED, job.error
