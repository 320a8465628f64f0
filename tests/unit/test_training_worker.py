"""The training worker around the trainer: the recipe it trains with and the errors it shows.

The trainer's `train` is replaced by a stand-in that records its config and then fails as a
test asks, so no model is loaded (torch is imported, as the worker does).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import adapters.training.trainer as trainer_module
from adapters.base_model import BaseModelInfo
from adapters.errors import AdapterInvalid
from adapters.registry import Registry
from adapters.store import LocalStore
from adapters.training.jobs import JobStatus, JobStore
from adapters.training.recipe import (
    BASE_LEARNING_RATE,
    LoraRecipe,
    ResolvedHyperparameters,
    TrainingRecipe,
)
from adapters.training.trainer import TrainConfig
from adapters.training.worker import Worker
from adapters.validation import AdapterLimits
from tests.unit.conftest import BASE_MODEL


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
