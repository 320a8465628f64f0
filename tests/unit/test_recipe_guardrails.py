"""Recipe guard rails: warnings at job creation, in the answer and as job events, never a
refusal (adapters/training/guardrails.py through POST /v1/fine_tuning/jobs)."""

from __future__ import annotations

import json
from typing import Any

from adapters.training.guardrails import (
    LONG_RUN_STEPS,
    MIN_EXAMPLES,
    data_warnings,
    estimated_steps,
    rank_warnings,
)
from adapters.training.recipe import LoraRecipe, ResolvedHyperparameters, TrainingRecipe
from tests.unit.conftest import BASE_MODEL, Gw
from tests.unit.test_fine_tuning_api import JOBS, event_messages, upload
from tests.unit.test_fine_tuning_api import tenant as tenant  # a fixture
from tests.unit.test_fine_tuning_api import tokenizer as tokenizer  # a fixture


def lines(pairs: list[tuple[str, str]]) -> bytes:
    return "\n".join(json.dumps({"messages": [{"role": "user", "content": q},
                                              {"role": "assistant", "content": a}]})
                     for q, a in pairs).encode()


def dataset(n: int, start: int = 0) -> bytes:
    return lines([(f"question {i}", f"answer {i}") for i in range(start, start + n)])


def recipe(r: int = 16, epochs: int = 3, batch_size: int = 4,
           general: float = 0.0) -> TrainingRecipe:
    return TrainingRecipe(lora=LoraRecipe(r=r, general_data_ratio=general),
                          hyperparameters=ResolvedHyperparameters(n_epochs=epochs,
                                                                  batch_size=batch_size))


def codes(warnings: list[dict[str, Any]]) -> list[str]:
    return [w["code"] for w in warnings]


def test_few_examples_warns_below_the_threshold_only() -> None:
    assert codes(data_warnings(recipe(), dataset(MIN_EXAMPLES - 1), None)) == ["few_examples"]
    assert "499 examples" in data_warnings(recipe(), dataset(499), None)[0]["message"]
    assert data_warnings(recipe(epochs=1), dataset(MIN_EXAMPLES), None) == []


def test_rank_above_64_warns() -> None:
    assert rank_warnings(recipe(r=64)) == []
    [warning] = rank_warnings(recipe(r=128))
    assert warning["code"] == "high_rank" and warning["param"] == "lora.r"
    assert "128" in warning["message"]


def test_a_long_run_without_general_data_warns() -> None:
    # 600 examples, batch 1: 600 steps an epoch; two epochs pass LONG_RUN_STEPS.
    data = dataset(600)
    assert estimated_steps(recipe(epochs=2, batch_size=1), 600) == 1200 >= LONG_RUN_STEPS
    assert codes(data_warnings(recipe(epochs=1, batch_size=1), data, None)) == []
    assert codes(data_warnings(recipe(epochs=2, batch_size=1), data, None)) == ["no_general_data"]
    assert codes(data_warnings(recipe(epochs=2, batch_size=1, general=0.1), data, None)) == []


def test_validation_prompts_seen_in_training_warn() -> None:
    training = dataset(MIN_EXAMPLES)
    clean = dataset(5, start=MIN_EXAMPLES)
    assert data_warnings(recipe(epochs=1), training, clean) == []
    # Same questions with other answers (and other spacing) still leak the prompt.
    leaky = lines([("question  3", "something else"), ("question 7", "answer 7"),
                   ("brand new", "fine")])
    [warning] = data_warnings(recipe(epochs=1), training, leaky)
    assert warning["code"] == "validation_overlap" and warning["param"] == "validation_file"
    assert warning["message"].startswith("2 of 3 validation examples")


async def test_warnings_are_in_the_answer_and_the_events_and_never_refuse(gw: Gw,
                                                                          tenant) -> None:
    _, headers = tenant
    train = (await upload(gw, headers, dataset(20))).json()["id"]
    valid = (await upload(gw, headers, dataset(3, start=18))).json()["id"]
    r = await gw.client.post(JOBS, headers=headers, json={
        "model": BASE_MODEL, "training_file": train, "validation_file": valid,
        "hyperparameters": {"n_epochs": 50, "batch_size": 1}})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "validating_files"
    assert codes(job["warnings"]) == ["few_examples", "no_general_data", "validation_overlap"]
    assert all(w["message"] for w in job["warnings"])
    # Kept on the job, and told as events at the warn level.
    again = (await gw.client.get(f"{JOBS}/{job['id']}", headers=headers)).json()
    assert again["warnings"] == job["warnings"]
    events = (await gw.client.get(f"{JOBS}/{job['id']}/events", headers=headers)).json()["data"]
    warned = [e for e in events if e["level"] == "warn"]
    assert sorted(e["data"]["warning"] for e in warned) == sorted(codes(job["warnings"]))
    assert (await event_messages(gw, headers, job["id"]))[0] == "Validating training file"


async def test_a_clean_recipe_has_no_warnings(gw: Gw, tenant, monkeypatch) -> None:
    import adapters.training.guardrails as guardrails

    monkeypatch.setattr(guardrails, "MIN_EXAMPLES", 10)
    _, headers = tenant
    train = (await upload(gw, headers, dataset(12))).json()["id"]
    r = await gw.client.post(JOBS, headers=headers,
                             json={"model": BASE_MODEL, "training_file": train})
    assert r.status_code == 200, r.text
    assert r.json()["warnings"] == []
